"""Prometheus metrics of the LLM service, in a registry of their own.

NOTE: each process keeps its own counters. Behind several daphne processes,
Prometheus must scrape every process and sum the series; prometheus-client's
multiprocess mode is not used.
"""

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

# Chat requests take from well under a second (cache hits) to minutes (long
# generations), so the buckets span both ends.
_LATENCY_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "llm_requests",
    "Chat requests served, by endpoint, model and HTTP status.",
    ["endpoint", "model", "status"],
    registry=REGISTRY,
)
REQUEST_LATENCY = Histogram(
    "llm_request_latency_seconds",
    "Time from receiving a chat request to its last byte, by endpoint and model.",
    ["endpoint", "model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_LATENCY = Histogram(
    "llm_upstream_latency_seconds",
    "Duration of model provider calls that returned a whole answer, by model.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
CACHE_LOOKUPS = Counter(
    "llm_cache_lookups",
    "Response cache lookups by tier (l1, l2) and result (hit, miss, error, skipped).",
    ["tier", "result"],
    registry=REGISTRY,
)
TOKENS = Counter(
    "llm_tokens",
    "Tokens the model providers reported for answers they generated (cache hits "
    "are not counted), by model and kind (prompt, completion).",
    ["model", "kind"],
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "llm_upstream_errors",
    "Failed model provider calls by error code.",
    ["code"],
    registry=REGISTRY,
)


def request_record(*, endpoint: str, model: str, status: int, seconds: float) -> None:
    """Count one served chat request and observe its latency."""
    REQUESTS.labels(endpoint=endpoint, model=model, status=str(status)).inc()
    REQUEST_LATENCY.labels(endpoint=endpoint, model=model).observe(seconds)


def metrics_exposition() -> tuple[bytes, str]:
    """Return the Prometheus text exposition and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
