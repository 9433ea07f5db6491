"""Access control of the REST endpoints: API keys, allow lists, limits, breaker.

Every request goes through the real ASGI stack, the real database and Redis,
and the fake Gemini server. The personas are ``owner_key`` (may use
everything), ``limited_key`` (one model, one prompt), ``revoked_key`` and
``outsider`` (a well-formed key the gateway never issued).
"""

import json
from dataclasses import dataclass

import pytest
from channels.db import database_sync_to_async
from django.test import AsyncClient

from llm.breaker import BreakerState, get_breaker
from llm.keys import api_key_create, api_key_revoke
from llm.models import ApiKey
from prompts_registry.services import prompts_sync
from tests.chat_support import expected_error, read_events, streamed_text
from tests.fake_gemini import Reply

pytestmark = pytest.mark.django_db(transaction=True)

REQUEST_ID = "access-1"
GEMINI = "gemini-3.5-flash"
LOCAL = "smollm2-135m-instruct"

GREETING = """\
name: greeting
version: 1
description: Greets someone.
template: "Say hello to {{ who }}."
variables:
  who: {type: string}
"""
SECRET = """\
name: secret
version: 1
description: A prompt the limited key may not use.
template: "Tell {{ who }} a secret."
variables:
  who: {type: string}
"""
LOCAL_GREETING = """\
name: local_greeting
version: 1
description: Greets someone with the local model.
template: "Say hello to {{ who }}."
model: smollm2-135m-instruct
variables:
  who: {type: string}
"""


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    body: dict | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


CHAT = Endpoint("POST", "/chat", {"prompt": "Say hello."})
CHAT_STREAM = Endpoint("POST", "/chat/stream", {"prompt": "Say hello."})
PROMPT_CHAT = Endpoint("POST", "/prompts/greeting/chat", {"variables": {"who": "Ada"}})
PROMPT_CHAT_STREAM = Endpoint(
    "POST", "/prompts/greeting/chat/stream", {"variables": {"who": "Ada"}}
)
CHAT_ENDPOINTS = [CHAT, CHAT_STREAM, PROMPT_CHAT, PROMPT_CHAT_STREAM]
ENDPOINTS = [
    *CHAT_ENDPOINTS,
    Endpoint("GET", "/prompts"),
    Endpoint("GET", "/prompts/greeting"),
    Endpoint("POST", "/prompts/greeting/render", {"variables": {"who": "Ada"}}),
    Endpoint("GET", "/metrics"),
]

MISSING_KEY = "An API key is required: send the header `Authorization: Bearer <key>`."
UNKNOWN_KEY = (
    "The API key is not valid: check that it was copied whole, or ask an "
    "administrator for a new one."
)


def error(message: str, code: str, field: str | None = None) -> dict:
    return expected_error(field, message, code=code, request_id=REQUEST_ID)


def forbidden_model(model: str) -> dict:
    return error(
        f"This API key may not use model {model!r}; it may use {GEMINI}. Ask an "
        "administrator to add the model to the key's allowed models.",
        "forbidden",
        field="model",
    )


def forbidden_prompt(name: str) -> dict:
    return error(
        f"This API key may not use prompt {name!r}; it may use greeting. Ask an "
        "administrator to add the prompt to the key's allowed prompts.",
        "forbidden",
    )


async def send(
    endpoint: Endpoint,
    key: str | None = None,
    *,
    body: dict | None = None,
    path: str | None = None,
    **headers,
):
    """Send one request to ``endpoint``; ``key`` goes in a Bearer header."""
    headers = {"X-Request-ID": REQUEST_ID, **headers}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    path = path or endpoint.path
    if endpoint.method == "GET":
        return await AsyncClient().get(path, headers=headers)
    data = json.dumps(endpoint.body if body is None else body)
    return await AsyncClient().post(
        path, data=data, content_type="application/json", headers=headers
    )


async def drain(response) -> None:
    """Read a streaming body to its end, so the stream finishes its work."""
    if response.streaming:
        await read_events(response)


def numbered_body(endpoint: Endpoint, number: int) -> dict:
    """A body for ``endpoint`` that no earlier request sent, so it misses the cache."""
    if endpoint.path.startswith("/prompts/"):
        return {"variables": {"who": f"person {number}"}}
    return {"prompt": f"Question {number}"}


def rate_limit_headers(response) -> dict[str, str]:
    names = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
    return {name: response[name] for name in names if name in response}


def create_key(**options) -> str:
    _, raw_key = api_key_create(name="access test", **options)
    return raw_key


create_key_async = database_sync_to_async(create_key)


@database_sync_to_async
def revoke(raw_key: str) -> None:
    api_key_revoke(ApiKey.objects.get(prefix=raw_key[:11]))


@pytest.fixture(autouse=True)
def prompts(tmp_path):
    for name, text in {
        "greeting": GREETING,
        "secret": SECRET,
        "local_greeting": LOCAL_GREETING,
    }.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "v1.yaml").write_text(text)
    prompts_sync(root=tmp_path)


# Authentication


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
async def test_missing_key_rejected(fake_gemini, endpoint):
    response = await send(endpoint)

    assert response.status_code == 401
    assert response.json() == error(MISSING_KEY, "unauthenticated")
    assert fake_gemini.call_count == 0


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
async def test_outsider_rejected(fake_gemini, outsider, endpoint):
    response = await send(endpoint, outsider)

    assert response.status_code == 401
    assert response.json() == error(UNKNOWN_KEY, "unauthenticated")
    assert fake_gemini.call_count == 0


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
async def test_revoked_key_rejected(fake_gemini, revoked_key, endpoint):
    response = await send(endpoint, revoked_key)

    assert response.status_code == 401
    assert response.json() == error(
        f"The API key {revoked_key[:11]}… was revoked: ask an administrator for a "
        "new one.",
        "key_revoked",
    )
    assert fake_gemini.call_count == 0


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
async def test_revocation_applies_to_next_request(fake_gemini, owner_key, endpoint):
    before = await send(endpoint, owner_key)
    await drain(before)
    await revoke(owner_key)

    after = await send(endpoint, owner_key)

    assert before.status_code == 200
    assert after.status_code == 401
    assert after.json()["error"]["code"] == "key_revoked"


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
async def test_key_in_query_string_ignored(fake_gemini, owner_key, endpoint):
    query = f"api_key={owner_key}&key={owner_key}&token={owner_key}"

    response = await send(endpoint, path=f"{endpoint.path}?{query}")

    assert response.status_code == 401
    assert response.json() == error(MISSING_KEY, "unauthenticated")
    assert fake_gemini.call_count == 0


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
async def test_other_auth_scheme_rejected(fake_gemini, owner_key, endpoint):
    response = await send(endpoint, Authorization=f"Token {owner_key}")

    assert response.status_code == 401
    assert response.json() == error(
        "The Authorization header is malformed: send `Authorization: Bearer <key>`.",
        "unauthenticated",
    )


async def test_key_checked_before_body(fake_gemini):
    response = await send(CHAT, body={"prompt": 3, "unknown": True})

    assert response.status_code == 401
    assert response.json() == error(MISSING_KEY, "unauthenticated")


async def test_auth_off_serves_requests_without_key(fake_gemini, settings, revoked_key):
    settings.GATEWAY_AUTH = "off"

    response = await send(CHAT)
    revoked = await send(CHAT, revoked_key)

    assert response.status_code == 200
    assert rate_limit_headers(response) == {}
    # A key that is sent is still checked.
    assert revoked.status_code == 401
    assert revoked.json()["error"]["code"] == "key_revoked"


async def test_metrics_public_serves_without_key(settings):
    settings.METRICS_PUBLIC = True

    response = await send(Endpoint("GET", "/metrics"))

    assert response.status_code == 200
    assert "# TYPE llm_requests_total counter" in response.content.decode()


# Allow lists

FORBIDDEN_CASES = [
    (CHAT, {"prompt": "Hi", "model": LOCAL}, forbidden_model(LOCAL)),
    (CHAT_STREAM, {"prompt": "Hi", "model": LOCAL}, forbidden_model(LOCAL)),
    (
        Endpoint("POST", "/prompts/secret/chat"),
        {"variables": {"who": "Ada"}},
        forbidden_prompt("secret"),
    ),
    (
        Endpoint("POST", "/prompts/secret/chat/stream"),
        {"variables": {"who": "Ada"}},
        forbidden_prompt("secret"),
    ),
    (
        PROMPT_CHAT,
        {"variables": {"who": "Ada"}, "model": LOCAL},
        forbidden_model(LOCAL),
    ),
    (
        PROMPT_CHAT_STREAM,
        {"variables": {"who": "Ada"}, "model": LOCAL},
        forbidden_model(LOCAL),
    ),
    (Endpoint("GET", "/prompts/secret"), None, forbidden_prompt("secret")),
    (
        Endpoint("POST", "/prompts/secret/render"),
        {"variables": {"who": "Ada"}},
        forbidden_prompt("secret"),
    ),
    # A prompt outside the allow list gets 403 whether it exists or not, and
    # before its body is read, so the key learns nothing about it.
    (
        Endpoint("POST", "/prompts/nonexistent/chat"),
        {"variables": {"who": "Ada"}},
        forbidden_prompt("nonexistent"),
    ),
    (
        Endpoint("POST", "/prompts/secret/chat"),
        {"variables": "not an object", "unknown": 1},
        forbidden_prompt("secret"),
    ),
    (Endpoint("GET", "/prompts/nonexistent"), None, forbidden_prompt("nonexistent")),
]


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    FORBIDDEN_CASES,
    ids=[f"{case[0]}-{index}" for index, case in enumerate(FORBIDDEN_CASES)],
)
async def test_limited_key_forbidden(
    fake_gemini, limited_key, endpoint, body, expected
):
    response = await send(endpoint, limited_key, body=body)

    assert response.status_code == 403
    assert response["Content-Type"] == "application/json"
    assert response.json() == expected
    assert fake_gemini.call_count == 0


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
async def test_limited_key_allowed(fake_gemini, limited_key, endpoint):
    response = await send(endpoint, limited_key)
    await drain(response)

    assert response.status_code == 200


async def test_rendered_prompt_model_checked(fake_gemini):
    key = await create_key_async(
        allowed_models=[GEMINI], allowed_prompts=["local_greeting"]
    )
    endpoint = Endpoint("POST", "/prompts/local_greeting/chat")

    response = await send(endpoint, key, body={"variables": {"who": "Ada"}})

    assert response.status_code == 403
    assert response.json() == error(
        f"This API key may not use model {LOCAL!r}; it may use {GEMINI}. Ask an "
        "administrator to add the model to the key's allowed models.",
        "forbidden",
        field="model",
    )


async def test_prompt_list_shows_allowed_prompts(limited_key, owner_key):
    limited = await send(Endpoint("GET", "/prompts"), limited_key)
    owner = await send(Endpoint("GET", "/prompts"), owner_key)

    assert [item["name"] for item in limited.json()["prompts"]] == ["greeting"]
    assert [item["name"] for item in owner.json()["prompts"]] == [
        "greeting",
        "local_greeting",
        "secret",
    ]


# Rate limits


@pytest.mark.parametrize("endpoint", CHAT_ENDPOINTS, ids=str)
async def test_request_limit_then_429(fake_gemini, clock, endpoint):
    key = await create_key_async(requests_per_minute=2)

    allowed = []
    for number in range(2):
        response = await send(endpoint, key, body=numbered_body(endpoint, number))
        await drain(response)
        allowed.append(response)
    rejected = await send(endpoint, key, body=numbered_body(endpoint, 2))

    assert [response.status_code for response in allowed] == [200, 200]
    assert [rate_limit_headers(response) for response in allowed] == [
        {
            "X-RateLimit-Limit": "2",
            "X-RateLimit-Remaining": "1",
            "X-RateLimit-Reset": "40",
        },
        {
            "X-RateLimit-Limit": "2",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": "40",
        },
    ]
    assert rejected.status_code == 429
    assert rejected["Content-Type"] == "application/json"
    assert rejected.json() == error(
        f"API key {key[:11]}… sent more than 2 requests in this minute; retry in 40 s.",
        "rate_limited",
    )
    assert rejected["Retry-After"] == "40"
    assert rate_limit_headers(rejected) == {
        "X-RateLimit-Limit": "2",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "40",
    }
    assert fake_gemini.call_count == 2


async def test_request_limit_renews_next_window(fake_gemini, clock):
    key = await create_key_async(requests_per_minute=1)
    await send(CHAT, key)
    rejected = await send(CHAT, key)

    clock.advance(40)
    renewed = await send(CHAT, key)

    assert rejected.status_code == 429
    assert renewed.status_code == 200
    assert rate_limit_headers(renewed) == {
        "X-RateLimit-Limit": "1",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "60",
    }


async def test_cache_hits_count_as_requests(fake_gemini, clock):
    key = await create_key_async(requests_per_minute=1)
    await send(CHAT, key)

    again = await send(CHAT, key)

    assert again.status_code == 429
    assert fake_gemini.call_count == 1


async def test_rejected_requests_use_no_limit(fake_gemini, clock):
    key = await create_key_async(requests_per_minute=1, allowed_models=[GEMINI])
    forbidden = await send(CHAT, key, body={"prompt": "Hi", "model": LOCAL})
    invalid = await send(CHAT, key, body={"prompt": ""})
    missing = await send(PROMPT_CHAT, key, path="/prompts/nonexistent/chat")

    response = await send(CHAT, key)

    assert [forbidden.status_code, invalid.status_code, missing.status_code] == [
        403,
        400,
        404,
    ]
    assert response.status_code == 200
    assert response["X-RateLimit-Remaining"] == "0"


async def test_upstream_error_keeps_rate_limit_headers(fake_gemini, clock):
    fake_gemini.default_reply = Reply(status=400)
    key = await create_key_async(requests_per_minute=5)

    response = await send(CHAT, key)

    assert response.status_code == 502
    assert rate_limit_headers(response) == {
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "4",
        "X-RateLimit-Reset": "40",
    }


async def test_token_limit_per_minute(fake_gemini, clock):
    # Each response of the fake uses 5 prompt and 3 completion tokens.
    key = await create_key_async(tokens_per_minute=8)
    first = await send(CHAT, key, body={"prompt": "First"})

    second = await send(CHAT, key, body={"prompt": "Second"})
    clock.advance(40)
    third = await send(CHAT, key, body={"prompt": "Third"})

    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json() == error(
        f"API key {key[:11]}… used 8 of its 8 tokens for this minute; retry in 40 s.",
        "rate_limited",
    )
    assert second["Retry-After"] == "40"
    # X-RateLimit-* describe the request limit, which this key does not have.
    assert rate_limit_headers(second) == {}
    assert third.status_code == 200
    assert fake_gemini.call_count == 2


async def test_daily_budget_counts_streams(fake_gemini, clock):
    key = await create_key_async(tokens_per_day=16)
    streamed = await send(CHAT_STREAM, key, body={"prompt": "One"})
    events = await read_events(streamed)
    # The stream cached its response, and a cache hit costs no tokens.
    cached = await send(CHAT, key, body={"prompt": "One"})
    second = await send(CHAT, key, body={"prompt": "Two"})

    rejected = await send(CHAT, key, body={"prompt": "Three"})
    rejected_stream = await send(CHAT_STREAM, key, body={"prompt": "Three"})

    assert streamed_text(events) == "Hello from the fake"
    assert events[-1].data["usage"]["total_tokens"] == 8
    assert cached["X-Cache"] == "hit-l1"
    assert second["X-Cache"] == "miss"
    assert rejected.status_code == 429
    assert rejected.json() == error(
        f"API key {key[:11]}… used 16 of its 16 tokens for today (UTC); the budget "
        "renews at 00:00 UTC, in 400 s.",
        "budget_exceeded",
    )
    assert rejected["Retry-After"] == "400"
    assert rejected_stream.status_code == 429
    assert rejected_stream["Content-Type"] == "application/json"
    assert rejected_stream.json()["error"]["code"] == "budget_exceeded"
    assert fake_gemini.call_count == 2


async def test_limits_hold_with_redis_stopped(fake_gemini, clock, redis_server):
    key = await create_key_async(requests_per_minute=2, tokens_per_day=100)
    redis_server.stop()

    first = await send(CHAT, key, body={"prompt": "One"})
    second = await send(CHAT, key, body={"prompt": "Two"})
    third = await send(CHAT, key, body={"prompt": "Three"})

    assert first.status_code == 200
    assert second.status_code == 200
    assert second["X-RateLimit-Remaining"] == "0"
    # Each process counts on its own until Redis is back.
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "rate_limited"


# Circuit breaker


@pytest.mark.parametrize("failing", [CHAT, CHAT_STREAM], ids=str)
async def test_breaker_opens_after_failures(
    fake_gemini, owner_key, breaker_clock, failing
):
    fake_gemini.default_reply = Reply(status=503)
    failures = []
    for number in range(2):
        response = await send(failing, owner_key, body=numbered_body(failing, number))
        failures.append(response.status_code)
    calls = fake_gemini.call_count

    opened = [
        await send(endpoint, owner_key, body=numbered_body(endpoint, 9))
        for endpoint in (CHAT, CHAT_STREAM)
    ]

    assert failures == [503, 503]
    for response in opened:
        assert response.status_code == 503
        assert response["Content-Type"] == "application/json"
        assert response["Retry-After"] == "5"
        assert response.json() == error(
            "Calls to the gemini provider are paused after repeated failures; "
            "retry in 5 s.",
            "circuit_open",
        )
    assert fake_gemini.call_count == calls


async def test_breaker_probe_closes_it(fake_gemini, owner_key, breaker_clock):
    fake_gemini.default_reply = Reply(status=503)
    for number in range(2):
        await send(CHAT, owner_key, body=numbered_body(CHAT, number))
    fake_gemini.default_reply = Reply()
    calls = fake_gemini.call_count

    breaker_clock.advance(5)
    probe = await send(CHAT_STREAM, owner_key, body={"prompt": "Probe"})
    events = await read_events(probe)
    after = await send(CHAT, owner_key, body={"prompt": "After"})

    assert probe.status_code == 200
    assert streamed_text(events) == "Hello from the fake"
    assert get_breaker("gemini").state is BreakerState.CLOSED
    assert after.status_code == 200
    assert fake_gemini.call_count == calls + 2


async def test_open_breaker_still_serves_cache(fake_gemini, owner_key, breaker_clock):
    cached = await send(CHAT, owner_key, body={"prompt": "Cached"})
    fake_gemini.default_reply = Reply(status=503)
    for number in range(2):
        await send(CHAT, owner_key, body=numbered_body(CHAT, number))

    response = await send(CHAT, owner_key, body={"prompt": "Cached"})

    assert cached["X-Cache"] == "miss"
    assert get_breaker("gemini").state is BreakerState.OPEN
    assert response.status_code == 200
    assert response["X-Cache"] == "hit-l1"


# Cache scope


async def test_per_key_cache_kept_apart(fake_gemini, settings, owner_key, limited_key):
    settings.CACHE_SCOPE = "per_key"

    first = await send(CHAT, owner_key)
    other = await send(CHAT, limited_key)
    again = await send(CHAT, owner_key)

    assert first["X-Cache"] == "miss"
    assert other["X-Cache"] == "miss"
    assert again["X-Cache"] == "hit-l1"
    assert fake_gemini.call_count == 2


async def test_shared_cache_serves_other_keys(
    fake_gemini, settings, owner_key, limited_key
):
    settings.CACHE_SCOPE = "shared"

    first = await send(CHAT_STREAM, owner_key)
    await drain(first)
    other = await send(CHAT, limited_key)

    assert first["X-Cache"] == "miss"
    assert other["X-Cache"] == "hit-l1"
    assert fake_gemini.call_count == 1
