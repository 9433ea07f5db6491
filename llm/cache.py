"""Two-tier cache of complete model responses.

L1 is a bounded in-process locmem cache (alias ``l1``), read directly from async
code because a lookup is a dict access. L2 is Redis through django-redis (alias
``l2``, present only when REDIS_URL is set), shared by every gateway process.
django-redis is synchronous, so every L2 call runs in a small thread pool and a
slow Redis never blocks the event loop. A failing Redis turns into cache misses:
after a failure L2 is skipped for CACHE_L2_RETRY_SECONDS, so requests do not
each pay the connect timeout, and a warning is logged at most once per
CACHE_L2_WARNING_INTERVAL_SECONDS.

Both tiers store JSON (the response text, model, finish reason and usage), never
pickles, and a value that does not decode is treated as a miss.
"""

import asyncio
import hashlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from django.conf import settings
from django.core.cache import caches
from django_redis.exceptions import ConnectionInterrupted
from redis.exceptions import RedisError

from llm.metrics import CACHE_LOOKUPS
from llm.providers.base import GenerationRequest, Usage

logger = logging.getLogger(__name__)

# Part of every key: bump it when the key material or the stored value changes
# shape, so old entries are never read back in the wrong format.
CACHE_KEY_VERSION = 1

L1_ALIAS = "l1"
L2_ALIAS = "l2"

# Upper bound on concurrent Redis calls of this process. Each call is bounded
# by REDIS_TIMEOUT_SECONDS, and a failure pauses L2, so a dead Redis cannot
# queue work here for long.
_L2_THREADS = 8
_l2_executor = ThreadPoolExecutor(
    max_workers=_L2_THREADS, thread_name_prefix="llm-cache-l2"
)


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    model: str
    finish_reason: str
    usage: Usage


def cache_key(
    request: GenerationRequest, provider: str, scope: str | None = None
) -> str:
    """Return the cache key of everything that changes a model's response.

    Float parameters are normalised, so 0, 0.0 and 0.00 share a key, while
    None (the provider's default) stays distinct from 0. A ``scope`` (an API
    key's id, say) keeps its entries apart from every other scope's.
    """
    material = {
        "version": CACHE_KEY_VERSION,
        "scope": scope,
        "provider": provider,
        "model": request.model,
        "system": request.system,
        "prompt": request.prompt,
        "temperature": _float_or_none(request.temperature),
        "max_tokens": _int_or_none(request.max_tokens),
        "top_p": _float_or_none(request.top_p),
        "top_k": _int_or_none(request.top_k),
    }
    # ensure_ascii keeps the encoding deterministic and safe for lone surrogates
    # that a JSON body may contain.
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return "chat:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def _int_or_none(value: int | None) -> int | None:
    return None if value is None else int(value)


async def cache_get(key: str) -> tuple[CachedAnswer | None, str | None]:
    """Look ``key`` up in L1, then L2; return the cached response and its tier.

    An L2 hit is copied into L1. Returns ``(None, None)`` on a miss, which
    includes an unreachable Redis and an unreadable value.
    """
    answer = _l1_get(key)
    if answer is not None:
        CACHE_LOOKUPS.labels(tier="l1", result="hit").inc()
        _log_lookup(key, "l1")
        return answer, "l1"
    CACHE_LOOKUPS.labels(tier="l1", result="miss").inc()

    answer, expires_at = await _l2_get(key)
    if answer is not None:
        _l1_set(key, answer, expires_at=expires_at)
        _log_lookup(key, "l2")
        return answer, "l2"

    _log_lookup(key, None)
    return None, None


async def cache_set(key: str, answer: CachedAnswer) -> None:
    """Store a complete response in both tiers."""
    expires_at = time.time() + settings.CACHE_TTL_SECONDS
    _l1_set(key, answer, expires_at=expires_at)
    if not _redis_tier.usable():
        return
    value = {**_answer_to_dict(answer), "expires_at": expires_at}
    try:
        await _run_in_l2_thread(caches[L2_ALIAS].set, key, value)
    except (ConnectionInterrupted, RedisError, OSError) as error:
        _redis_tier.failed("write", error)
    else:
        _redis_tier.succeeded()


def _l1_get(key: str) -> CachedAnswer | None:
    text = caches[L1_ALIAS].get(key)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        value = None
    return _answer_from_value(value, key=key, tier="l1")


def _l1_set(key: str, answer: CachedAnswer, *, expires_at: float | None) -> None:
    # An L2 entry copied into L1 keeps the L2 expiry time, so the copy expires
    # no later than the Redis entry (an eviction by Redis is not seen here).
    timeout = settings.CACHE_L1_TTL_SECONDS
    if expires_at is not None:
        timeout = min(timeout, math.floor(expires_at - time.time()))
        if timeout <= 0:
            return
    text = json.dumps(_answer_to_dict(answer), separators=(",", ":"))
    caches[L1_ALIAS].set(key, text, timeout=timeout)


async def _l2_get(key: str) -> tuple[CachedAnswer | None, float | None]:
    """Return the L2 entry for ``key`` and the time it expires there."""
    if L2_ALIAS not in settings.CACHES:
        return None, None
    if not _redis_tier.usable():
        CACHE_LOOKUPS.labels(tier="l2", result="skipped").inc()
        return None, None

    try:
        value = await _run_in_l2_thread(caches[L2_ALIAS].get, key)
    except (ConnectionInterrupted, RedisError, OSError) as error:
        CACHE_LOOKUPS.labels(tier="l2", result="error").inc()
        _redis_tier.failed("lookup", error)
        return None, None
    except ValueError:
        # django-redis raises the JSON decoder's error for a value that is not
        # JSON; Redis itself answered, so L2 stays in use.
        _redis_tier.succeeded()
        CACHE_LOOKUPS.labels(tier="l2", result="miss").inc()
        logger.warning("Ignoring an L2 cache value that is not JSON (key %s)", key)
        return None, None
    _redis_tier.succeeded()

    answer = None if value is None else _answer_from_value(value, key=key, tier="l2")
    if answer is None:
        CACHE_LOOKUPS.labels(tier="l2", result="miss").inc()
        return None, None
    CACHE_LOOKUPS.labels(tier="l2", result="hit").inc()
    expires_at = value.get("expires_at")
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        expires_at = None
    return answer, expires_at


async def _run_in_l2_thread(function, *args):
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_l2_executor, function, *args)


def _answer_to_dict(answer: CachedAnswer) -> dict:
    return {
        "text": answer.text,
        "model": answer.model,
        "finish_reason": answer.finish_reason,
        "usage": asdict(answer.usage),
    }


def _answer_from_value(value: object, *, key: str, tier: str) -> CachedAnswer | None:
    """Build an answer from a decoded cache value, or log and return None."""
    try:
        usage = value["usage"]
        answer = CachedAnswer(
            text=value["text"],
            model=value["model"],
            finish_reason=value["finish_reason"],
            usage=Usage(
                prompt_tokens=usage["prompt_tokens"],
                completion_tokens=usage["completion_tokens"],
                total_tokens=usage["total_tokens"],
            ),
        )
    except (TypeError, KeyError):
        answer = None
    if answer is None or not _answer_is_well_formed(answer):
        logger.warning(
            "Ignoring a malformed %s cache value (key %s)", tier.upper(), key
        )
        return None
    return answer


def _answer_is_well_formed(answer: CachedAnswer) -> bool:
    texts = (answer.text, answer.model, answer.finish_reason)
    counts = (
        answer.usage.prompt_tokens,
        answer.usage.completion_tokens,
        answer.usage.total_tokens,
    )
    return all(isinstance(text, str) for text in texts) and all(
        isinstance(count, int) and not isinstance(count, bool) for count in counts
    )


def _log_lookup(key: str, tier: str | None) -> None:
    # The key is a hash, so it identifies the entry without revealing the prompt.
    logger.info(
        "cache_lookup hit=%s tier=%s",
        tier is not None,
        tier or "none",
        extra={
            "event": "cache_lookup",
            "cache_hit": tier is not None,
            "cache_tier": tier,
            "cache_key": key,
        },
    )


class _RedisTier:
    """Health of L2: skip Redis for a while after a failure, warn at a set rate.

    Only the event loop thread touches this state, so it needs no lock.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._retry_at = 0.0
        self._warned_at: float | None = None
        self._failures_since_warning = 0
        self._failing = False

    def usable(self) -> bool:
        return L2_ALIAS in settings.CACHES and time.monotonic() >= self._retry_at

    def failed(self, operation: str, error: Exception) -> None:
        now = time.monotonic()
        self._failing = True
        self._retry_at = now + settings.CACHE_L2_RETRY_SECONDS
        self._failures_since_warning += 1
        interval = settings.CACHE_L2_WARNING_INTERVAL_SECONDS
        if self._warned_at is not None and now - self._warned_at < interval:
            return
        logger.warning(
            "Redis cache %s failed (%s); responses are served from L1 and the "
            "provider, and Redis is retried in %.1f s (%d failures since the last "
            "warning)",
            operation,
            error,
            settings.CACHE_L2_RETRY_SECONDS,
            self._failures_since_warning,
        )
        self._warned_at = now
        self._failures_since_warning = 0

    def succeeded(self) -> None:
        if self._failing:
            logger.info("Redis cache is reachable again")
            self.reset()


_redis_tier = _RedisTier()


def redis_tier_reset() -> None:
    """Forget past Redis failures and log messages, so Redis is tried at once."""
    _redis_tier.reset()
