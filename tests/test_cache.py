import asyncio
import json
import logging
import time

import pytest
from django.core.cache import caches

from llm.cache import CACHE_KEY_VERSION, cache_key, redis_tier_reset
from llm.providers.base import GenerationRequest
from llm.services import chat_complete
from tests.chat_support import post_json, read_events, request_id_filter
from tests.fake_gemini import Reply

# Every request authenticates with a gateway API key, as clients must.
pytestmark = pytest.mark.usefixtures("gateway_key")

BASE_BODY = {
    "prompt": "Name a colour.",
    "system": "Answer in one word.",
    "temperature": 0.5,
    "max_tokens": 100,
    "top_p": 0.9,
    "top_k": 40,
}


@pytest.fixture(autouse=True)
def _fresh_redis_tier():
    # A test that stops Redis leaves L2 paused; the next test starts clean.
    redis_tier_reset()
    yield
    redis_tier_reset()


def redis_key(key: str) -> str:
    return caches["l2"].make_key(key)


def key_of(body: dict) -> str:
    request = GenerationRequest(
        model=body.get("model", "gemini-3.5-flash"),
        prompt=body["prompt"],
        system=body.get("system"),
        temperature=body.get("temperature"),
        max_tokens=body.get("max_tokens"),
        top_p=body.get("top_p"),
        top_k=body.get("top_k"),
    )
    return cache_key(request, "gemini")


def test_cache_key_is_versioned_sha256():
    key = key_of(BASE_BODY)

    assert CACHE_KEY_VERSION == 1
    assert key.startswith("chat:")
    assert len(key.removeprefix("chat:")) == 64


def test_cache_key_normalises_numbers():
    assert key_of({"prompt": "p", "temperature": 0}) == key_of(
        {"prompt": "p", "temperature": 0.0}
    )
    assert key_of({"prompt": "p", "top_p": 1}) == key_of({"prompt": "p", "top_p": 1.0})
    assert key_of({"prompt": "p"}) != key_of({"prompt": "p", "temperature": 0})


def test_cache_key_depends_on_provider():
    request = GenerationRequest(model="m", prompt="p")

    assert cache_key(request, "gemini") != cache_key(request, "local")


def test_cache_key_depends_on_scope():
    request = GenerationRequest(model="m", prompt="p")

    assert cache_key(request, "gemini") != cache_key(request, "gemini", "key:1")
    assert cache_key(request, "gemini", "key:1") != cache_key(
        request, "gemini", "key:2"
    )


async def test_cache_scope_separates_entries(fake_gemini):
    request = GenerationRequest(model="gemini-3.5-flash", prompt="Scoped.")
    await chat_complete(request, cache_scope="key:1")

    other = await chat_complete(request, cache_scope="key:2")
    same = await chat_complete(request, cache_scope="key:1")

    assert other.cache_status == "miss"
    assert same.cache_status == "hit-l1"
    assert fake_gemini.call_count == 2


async def test_repeated_request_is_served_from_l1(fake_gemini):
    first = await post_json("/chat", BASE_BODY)
    second = await post_json("/chat", BASE_BODY)

    assert first.status_code == 200
    assert first["X-Cache"] == "miss"
    assert first.json()["cached"] is False
    assert second.status_code == 200
    assert second["X-Cache"] == "hit-l1"
    assert second.json()["cached"] is True
    assert second.json()["response"] == first.json()["response"]
    assert second.json()["usage"] == first.json()["usage"]
    assert fake_gemini.call_count == 1


@pytest.mark.parametrize(
    "change",
    [
        {"model": "gemini-other"},
        {"system": "Answer in two words."},
        {"prompt": "Name a fruit."},
        {"temperature": 0.7},
        {"max_tokens": 101},
        {"top_p": 0.8},
        {"top_k": 41},
    ],
    ids=lambda change: next(iter(change)),
)
async def test_parameter_change_is_a_miss(fake_gemini, settings, change):
    settings.LLM_MODELS = {
        **settings.LLM_MODELS,
        "gemini-other": {"provider": "gemini", "max_tokens": 8192},
    }
    await post_json("/chat", BASE_BODY)

    response = await post_json("/chat", {**BASE_BODY, **change})

    assert response.status_code == 200
    assert response["X-Cache"] == "miss"
    assert fake_gemini.call_count == 2


@pytest.mark.parametrize("same", ["0.0", "0.00", "0e0"])
async def test_zero_temperature_spellings_share_entry(fake_gemini, same):
    await post_json("/chat", '{"prompt": "Hi", "temperature": 0}')

    response = await post_json("/chat", f'{{"prompt": "Hi", "temperature": {same}}}')

    assert response["X-Cache"] == "hit-l1"
    assert fake_gemini.call_count == 1


async def test_missing_temperature_differs_from_zero(fake_gemini):
    await post_json("/chat", {"prompt": "Hi", "temperature": 0})

    response = await post_json("/chat", {"prompt": "Hi"})

    assert response["X-Cache"] == "miss"
    assert fake_gemini.call_count == 2


async def test_l2_hit_after_l1_is_cleared(fake_gemini):
    first = await post_json("/chat", BASE_BODY)
    caches["l1"].clear()

    from_l2 = await post_json("/chat", BASE_BODY)
    from_l1 = await post_json("/chat", BASE_BODY)

    assert from_l2["X-Cache"] == "hit-l2"
    assert from_l2.json()["response"] == first.json()["response"]
    assert from_l1["X-Cache"] == "hit-l1"
    assert fake_gemini.call_count == 1


async def test_l2_stores_json_not_pickle(fake_gemini):
    await post_json("/chat", BASE_BODY)

    raw = caches["l2"].client.get_client().get(redis_key(key_of(BASE_BODY)))

    stored = json.loads(raw)
    assert stored.pop("expires_at") > time.time()
    assert stored == {
        "text": "Hello from the fake",
        "model": "gemini-3.5-flash",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


async def test_l1_copy_keeps_l2_expiry(fake_gemini):
    value = {
        "text": "Stored in Redis",
        "model": "gemini-3.5-flash",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        # Less than a second left in Redis: too little for an L1 copy.
        "expires_at": time.time() + 0.5,
    }
    caches["l2"].set(key_of(BASE_BODY), value)

    first = await post_json("/chat", BASE_BODY)
    second = await post_json("/chat", BASE_BODY)

    assert first["X-Cache"] == "hit-l2"
    assert first.json()["response"] == "Stored in Redis"
    assert second["X-Cache"] == "hit-l2"
    assert fake_gemini.call_count == 0


@pytest.mark.parametrize(
    "stored",
    [b"not json {", b'{"text": 5}', b"[1, 2]", b"42"],
    ids=["not-json", "wrong-types", "array", "number"],
)
async def test_malformed_l2_value_is_a_miss(fake_gemini, caplog, stored):
    caches["l2"].client.get_client().set(redis_key(key_of(BASE_BODY)), stored)

    with caplog.at_level(logging.WARNING, logger="llm.cache"):
        response = await post_json("/chat", BASE_BODY)

    assert response.status_code == 200
    assert response["X-Cache"] == "miss"
    assert fake_gemini.call_count == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "L2 cache value" in warnings[0].getMessage()


async def test_malformed_l1_value_is_a_miss(fake_gemini, caplog):
    caches["l1"].set(key_of(BASE_BODY), '{"text": "no other fields"}')

    with caplog.at_level(logging.WARNING, logger="llm.cache"):
        response = await post_json("/chat", BASE_BODY)

    assert response["X-Cache"] == "miss"
    assert fake_gemini.call_count == 1
    assert "malformed L1 cache value" in caplog.records[0].getMessage()


async def test_redis_stopped_still_answers(fake_gemini, redis_server):
    redis_server.stop()

    first = await post_json("/chat", BASE_BODY)
    second = await post_json("/chat", BASE_BODY)

    assert first.status_code == 200
    assert first["X-Cache"] == "miss"
    assert second.status_code == 200
    assert second["X-Cache"] == "hit-l1"
    assert fake_gemini.call_count == 1


async def test_redis_failures_warn_once_per_interval(
    fake_gemini, redis_server, settings, caplog
):
    settings.CACHE_L2_RETRY_SECONDS = 0
    redis_server.stop()

    with caplog.at_level(logging.WARNING, logger="llm.cache"):
        for index in range(3):
            response = await post_json("/chat", {"prompt": f"Question {index}"})
            assert response.status_code == 200

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage().startswith("Redis cache lookup failed")


async def test_redis_failure_pauses_l2(fake_gemini, redis_server, settings):
    settings.CACHE_L2_RETRY_SECONDS = 60
    redis_server.stop()
    await post_json("/chat", {"prompt": "First"})
    redis_server.start()
    caches["l1"].clear()

    response = await post_json("/chat", {"prompt": "Second"})
    await post_json("/chat", {"prompt": "Second"})
    caches["l1"].clear()
    again = await post_json("/chat", {"prompt": "Second"})

    assert response["X-Cache"] == "miss"
    # Redis was up, but L2 was paused, so the answer was not written there.
    assert again["X-Cache"] == "miss"
    assert fake_gemini.call_count == 3


async def test_cache_recovers_after_redis_restart(fake_gemini, redis_server, settings):
    settings.CACHE_L2_RETRY_SECONDS = 0.05
    redis_server.stop()
    await post_json("/chat", BASE_BODY)
    redis_server.start()

    # L2 is retried once the pause is over: poll until an answer is written
    # to Redis and read back from it.
    deadline = time.monotonic() + 10
    attempt = 0
    while True:
        attempt += 1
        body = {"prompt": f"After restart {attempt}"}
        await post_json("/chat", body)
        caches["l1"].clear()
        response = await post_json("/chat", body)
        if response["X-Cache"] == "hit-l2" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)

    assert response["X-Cache"] == "hit-l2"


@pytest.mark.parametrize(
    "reply",
    [
        Reply(status=500),
        Reply(status=400, message="Bad request."),
        Reply(block_reason="SAFETY"),
        Reply(chunks=[], finish_reason="SAFETY"),
        Reply(finish_reason="MAX_TOKENS"),
        Reply(finish_reason="OTHER"),
        Reply(chunks=[], finish_reason="STOP"),
        Reply(chunks=[" ", "\n"], finish_reason="STOP"),
    ],
    ids=[
        "error-500",
        "error-400",
        "blocked",
        "withheld",
        "truncated",
        "other",
        "empty",
        "whitespace",
    ],
)
async def test_incomplete_answer_is_not_cached(fake_gemini, reply):
    fake_gemini.default_reply = reply
    await post_json("/chat", BASE_BODY)
    calls_before = fake_gemini.call_count
    fake_gemini.default_reply = Reply()

    response = await post_json("/chat", BASE_BODY)

    assert response.status_code == 200
    assert response["X-Cache"] == "miss"
    assert fake_gemini.call_count == calls_before + 1


@pytest.mark.parametrize(
    "reply",
    [Reply(chunks=[], finish_reason="STOP"), Reply(chunks=["Hi"], finish_reason=None)],
    ids=["empty", "no-finish-reason"],
)
async def test_incomplete_stream_is_not_cached(fake_gemini, reply):
    fake_gemini.default_reply = reply
    first = await post_json("/chat/stream", BASE_BODY)
    await read_events(first)
    calls_before = fake_gemini.call_count
    fake_gemini.default_reply = Reply()

    second = await post_json("/chat/stream", BASE_BODY)
    events = await read_events(second)

    assert events[-1].name == "done"
    assert events[-1].data["cached"] is False
    assert fake_gemini.call_count == calls_before + 1


async def test_bypass_via_body_skips_lookup_and_write(fake_gemini):
    await post_json("/chat", BASE_BODY)

    bypassed = await post_json("/chat", {**BASE_BODY, "cache": False})

    assert bypassed.status_code == 200
    assert bypassed["X-Cache"] == "bypass"
    assert bypassed.json()["cached"] is False
    assert fake_gemini.call_count == 2


@pytest.mark.parametrize("header", ["no-cache", "no-store", "max-age=0, No-Cache"])
async def test_bypass_via_cache_control_header(fake_gemini, header):
    bypassed = await post_json("/chat", BASE_BODY, cache_control=header)
    after = await post_json("/chat", BASE_BODY)

    assert bypassed["X-Cache"] == "bypass"
    # The bypassed answer was not stored either.
    assert after["X-Cache"] == "miss"
    assert fake_gemini.call_count == 2


async def test_lookup_logs_hit_and_tier_without_prompt(fake_gemini, caplog):
    request_id_filter(caplog)

    with caplog.at_level(logging.INFO, logger="llm.cache"):
        await post_json("/chat", BASE_BODY, x_request_id="lookup-1")
        await post_json("/chat", BASE_BODY, x_request_id="lookup-2")

    lookups = [r for r in caplog.records if getattr(r, "event", "") == "cache_lookup"]
    assert [(r.request_id, r.cache_hit, r.cache_tier) for r in lookups] == [
        ("lookup-1", False, None),
        ("lookup-2", True, "l1"),
    ]
    for record in lookups:
        assert BASE_BODY["prompt"] not in record.getMessage()


async def test_cache_without_redis_url_uses_l1(fake_gemini, settings):
    settings.CACHES = {
        alias: config for alias, config in settings.CACHES.items() if alias != "l2"
    }

    first = await post_json("/chat", BASE_BODY)
    caches["l1"].clear()
    second = await post_json("/chat", BASE_BODY)
    third = await post_json("/chat", BASE_BODY)

    assert first["X-Cache"] == "miss"
    assert second["X-Cache"] == "miss"
    assert third["X-Cache"] == "hit-l1"
