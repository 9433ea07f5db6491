import pytest
from django.test import AsyncClient
from prometheus_client.parser import text_string_to_metric_families

from tests.chat_support import post_json, read_events, with_api_key
from tests.fake_gemini import Reply

# /metrics and the chat endpoints require a gateway API key.
pytestmark = pytest.mark.usefixtures("gateway_key")


async def scrape() -> dict[tuple[str, tuple], float]:
    """Return every sample of GET /metrics keyed by (name, sorted labels)."""
    response = await AsyncClient().get("/metrics", headers=with_api_key())
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_metrics_serves_prometheus_text():
    response = await AsyncClient().get("/metrics", headers=with_api_key())

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    text = response.content.decode()
    assert "# TYPE llm_requests_total counter" in text
    assert "# TYPE llm_request_latency_seconds histogram" in text


async def test_metrics_count_chat_requests(fake_gemini):
    model = "gemini-3.5-flash"
    before = await scrape()

    await post_json("/chat", {"prompt": "Count me."})
    await post_json("/chat", {"prompt": "Count me."})
    after = await scrape()

    requests = "llm_requests_total"
    assert (
        delta(before, after, requests, endpoint="chat", model=model, status="200") == 2
    )
    latency = "llm_request_latency_seconds_count"
    assert delta(before, after, latency, endpoint="chat", model=model) == 2
    lookups = "llm_cache_lookups_total"
    assert delta(before, after, lookups, tier="l1", result="miss") == 1
    assert delta(before, after, lookups, tier="l2", result="miss") == 1
    assert delta(before, after, lookups, tier="l1", result="hit") == 1
    tokens = "llm_tokens_total"
    assert delta(before, after, tokens, model=model, kind="prompt") == 5
    assert delta(before, after, tokens, model=model, kind="completion") == 3
    upstream = "llm_upstream_latency_seconds_count"
    assert delta(before, after, upstream, model=model) == 1


async def test_metrics_count_errors(fake_gemini):
    fake_gemini.default_reply = Reply(status=401)
    before = await scrape()

    await post_json("/chat", {"prompt": "Fail."})
    await post_json("/chat", {"prompt": ""})
    after = await scrape()

    errors = "llm_upstream_errors_total"
    assert delta(before, after, errors, code="upstream_auth_failed") == 1
    requests = "llm_requests_total"
    assert (
        delta(
            before,
            after,
            requests,
            endpoint="chat",
            model="gemini-3.5-flash",
            status="502",
        )
        == 1
    )
    # The invalid body never named a valid model.
    assert delta(before, after, requests, endpoint="chat", model="-", status="400") == 1


async def test_metrics_count_streams(fake_gemini):
    fake_gemini.enqueue(Reply(), Reply(drop_after_chunks=1))
    before = await scrape()

    await read_events(await post_json("/chat/stream", {"prompt": "One"}))
    await read_events(await post_json("/chat/stream", {"prompt": "Two"}))
    after = await scrape()

    requests = "llm_requests_total"
    labels = {"endpoint": "chat_stream", "model": "gemini-3.5-flash"}
    assert delta(before, after, requests, status="200", **labels) == 1
    assert delta(before, after, requests, status="503", **labels) == 1
    errors = "llm_upstream_errors_total"
    assert delta(before, after, errors, code="upstream_unavailable") == 1


async def test_metrics_rejects_post():
    response = await AsyncClient().post("/metrics")

    assert response.status_code == 405
    assert response["Allow"] == "GET"
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_metrics_rejects_post_with_405():
    client = AsyncClient(enforce_csrf_checks=True)

    response = await client.post("/metrics", headers=with_api_key())

    assert response.status_code == 405
    assert response["Allow"] == "GET"
    assert response.json()["error"]["code"] == "method_not_allowed"
