"""Each websocket chat or prompt frame passes the same access checks as REST.

Allow lists, request and token limits, the circuit breaker and the cache
scope apply per frame, through llm/access.py, and a rejected frame leaves the
connection open. The personas are ``owner_key`` (may use everything) and
``limited_key`` (one model, one prompt).
"""

import json

import pytest
from django.test import AsyncClient

from llm.breaker import BreakerState, get_breaker
from prompts_registry.services import prompts_sync
from tests.fake_gemini import Reply
from tests.ws_support import (
    bearer,
    chat_round_trip,
    chat_socket,
    create_api_key,
    receive,
    receive_until_end,
    tokens,
    without_request_id,
)

pytestmark = pytest.mark.django_db(transaction=True)

GEMINI = "gemini-3.5-flash"
LOCAL = "smollm2-135m-instruct"

PROMPTS = {
    "greeting": """\
name: greeting
version: 1
description: Greets someone.
template: "Say hello to {{ who }}."
variables:
  who: {type: string}
""",
    "secret": """\
name: secret
version: 1
description: A prompt the limited key may not use.
template: "Tell {{ who }} a secret."
variables:
  who: {type: string}
""",
    "local_greeting": """\
name: local_greeting
version: 1
description: Greets someone with the local model.
template: "Say hello to {{ who }}."
model: smollm2-135m-instruct
variables:
  who: {type: string}
""",
}


def error_frame(client_id: str | None, code: str, message: str, **extra) -> dict:
    """An error frame without its request id; ``extra`` may set field, retry_after."""
    error = {"code": code, "message": message}
    if "field" in extra:
        error["field"] = extra.pop("field")
    return {"type": "error", "id": client_id, "error": error, **extra}


def forbidden_model(client_id: str, model: str) -> dict:
    return error_frame(
        client_id,
        "forbidden",
        f"This API key may not use model {model!r}; it may use {GEMINI}. Ask an "
        "administrator to add the model to the key's allowed models.",
        field="model",
    )


def forbidden_prompt(client_id: str | None, name: str) -> dict:
    return error_frame(
        client_id,
        "forbidden",
        f"This API key may not use prompt {name!r}; it may use greeting. Ask an "
        "administrator to add the prompt to the key's allowed prompts.",
    )


@pytest.fixture(autouse=True)
def prompts(tmp_path):
    for name, text in PROMPTS.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "v1.yaml").write_text(text)
    prompts_sync(root=tmp_path)


async def rest_chat(raw_key: str, prompt: str):
    return await AsyncClient().post(
        "/chat",
        data=json.dumps({"prompt": prompt}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {raw_key}"},
    )


# Allow lists


async def test_model_outside_allow_list_forbidden(fake_gemini, limited_key):
    async with chat_socket([bearer(limited_key)]) as socket:
        await socket.send_json_to(
            {"type": "chat", "id": "m", "prompt": "Hi", "model": LOCAL}
        )
        error = await receive(socket)
        still_open = await chat_round_trip(socket)

    assert without_request_id(error) == forbidden_model("m", LOCAL)
    assert still_open["type"] == "done"
    assert fake_gemini.call_count == 1


async def test_prompt_outside_allow_list_forbidden(fake_gemini, limited_key):
    async with chat_socket([bearer(limited_key)]) as socket:
        await socket.send_json_to(
            {"type": "prompt", "id": "p", "name": "secret", "variables": {"who": "A"}}
        )
        render_error = await receive(socket)
        await socket.send_json_to({"type": "subscribe", "prompt": "secret"})
        subscribe_error = await receive(socket)
        still_open = await chat_round_trip(socket)

    assert without_request_id(render_error) == forbidden_prompt("p", "secret")
    assert without_request_id(subscribe_error) == forbidden_prompt(None, "secret")
    assert still_open["type"] == "done"
    assert fake_gemini.call_count == 1


async def test_unknown_prompt_forbidden_before_lookup(fake_gemini, limited_key):
    # A prompt outside the allow list gets "forbidden" whether it exists or
    # not, so the key learns nothing about the registry.
    async with chat_socket([bearer(limited_key)]) as socket:
        await socket.send_json_to(
            {"type": "prompt", "id": "n", "name": "nonexistent", "variables": {}}
        )
        error = await receive(socket)

    assert without_request_id(error) == forbidden_prompt("n", "nonexistent")


async def test_rendered_prompt_model_checked(fake_gemini):
    raw_key = await create_api_key(
        allowed_models=[GEMINI], allowed_prompts=["local_greeting"]
    )

    async with chat_socket([bearer(raw_key)]) as socket:
        await socket.send_json_to(
            {
                "type": "prompt",
                "id": "l",
                "name": "local_greeting",
                "variables": {"who": "Ada"},
            }
        )
        error = await receive(socket)

    assert without_request_id(error) == forbidden_model("l", LOCAL)


async def test_limited_key_allowed(fake_gemini, limited_key):
    async with chat_socket([bearer(limited_key)]) as socket:
        chat = await chat_round_trip(socket, "chat")
        await socket.send_json_to(
            {"type": "prompt", "id": "p", "name": "greeting", "variables": {"who": "A"}}
        )
        prompt = await receive_until_end(socket, "p")

    assert chat["type"] == "done"
    assert prompt[0]["prompt"] == "greeting"
    assert prompt[-1]["type"] == "done"
    assert fake_gemini.call_count == 2


# Rate limits


async def test_request_limit_gives_retry_after(fake_gemini, clock):
    raw_key = await create_api_key(requests_per_minute=1)

    async with chat_socket([bearer(raw_key)]) as socket:
        first = await chat_round_trip(socket, "one")
        second = await chat_round_trip(socket, "two")

    assert first["type"] == "done"
    assert without_request_id(second) == error_frame(
        "two",
        "rate_limited",
        f"API key {raw_key[:11]}… sent more than 1 requests in this minute; "
        "retry in 40 s.",
        retry_after=40,
    )
    assert fake_gemini.call_count == 1


async def test_rest_and_websocket_share_limits(fake_gemini, clock):
    raw_key = await create_api_key(requests_per_minute=2)

    rest = await rest_chat(raw_key, "From REST")
    async with chat_socket([bearer(raw_key)]) as socket:
        second = await chat_round_trip(socket, "two", prompt="From a socket")
        third = await chat_round_trip(socket, "three", prompt="Once more")
    rejected_rest = await rest_chat(raw_key, "From REST again")

    assert rest.status_code == 200
    assert second["type"] == "done"
    assert third["error"]["code"] == "rate_limited"
    assert third["retry_after"] == 40
    assert rejected_rest.status_code == 429
    assert rejected_rest["Retry-After"] == "40"
    assert fake_gemini.call_count == 2


async def test_token_limit_per_minute(fake_gemini, clock):
    # Each response of the fake uses 5 prompt and 3 completion tokens.
    raw_key = await create_api_key(tokens_per_minute=8)

    async with chat_socket([bearer(raw_key)]) as socket:
        first = await chat_round_trip(socket, "one", prompt="First")
        second = await chat_round_trip(socket, "two", prompt="Second")
        clock.advance(40)
        third = await chat_round_trip(socket, "three", prompt="Third")

    assert first["usage"]["total_tokens"] == 8
    assert without_request_id(second) == error_frame(
        "two",
        "rate_limited",
        f"API key {raw_key[:11]}… used 8 of its 8 tokens for this minute; "
        "retry in 40 s.",
        retry_after=40,
    )
    assert third["type"] == "done"
    assert fake_gemini.call_count == 2


async def test_daily_budget_counts_streamed_usage(fake_gemini, clock):
    # The fake's default reply uses 5 prompt and 3 completion tokens.
    raw_key = await create_api_key(tokens_per_day=8)

    async with chat_socket([bearer(raw_key)]) as socket:
        await socket.send_json_to({"type": "chat", "id": "one", "prompt": "One"})
        streamed = await receive_until_end(socket, "one")
        rejected = await chat_round_trip(socket, "two", prompt="Two")

    assert tokens(streamed, "one") == ["Hello", " from", " the fake"]
    assert streamed[-1]["usage"]["total_tokens"] == 8
    assert without_request_id(rejected) == error_frame(
        "two",
        "budget_exceeded",
        f"API key {raw_key[:11]}… used 8 of its 8 tokens for today (UTC); the "
        "budget renews at 00:00 UTC, in 400 s.",
        retry_after=400,
    )
    assert fake_gemini.call_count == 1


async def test_cache_hit_costs_no_tokens(fake_gemini, clock):
    raw_key = await create_api_key(tokens_per_day=16)
    chat = {"type": "chat", "prompt": "Cached", "cache": True}

    async with chat_socket([bearer(raw_key)]) as socket:
        await socket.send_json_to({**chat, "id": "miss"})
        miss = await receive_until_end(socket, "miss")
        await socket.send_json_to({**chat, "id": "hit"})
        hit = await receive_until_end(socket, "hit")
        after = await chat_round_trip(socket, "after", prompt="Not cached")

    assert miss[-1]["cached"] is False
    assert hit[-1]["cached"] is True
    # The hit added nothing, so 8 of the 16 tokens were left for this one.
    assert after["type"] == "done"
    assert fake_gemini.call_count == 2


# Circuit breaker


async def test_open_breaker_gives_circuit_open(fake_gemini, owner_key, breaker_clock):
    fake_gemini.default_reply = Reply(status=503)

    async with chat_socket([bearer(owner_key)]) as socket:
        failures = []
        for number in range(2):
            prompt = f"Question {number}"
            failures.append(
                await chat_round_trip(socket, f"fail{number}", prompt=prompt)
            )
        calls = fake_gemini.call_count
        opened = await chat_round_trip(socket, "open", prompt="After the failures")

    assert [frame["error"]["code"] for frame in failures] == [
        "upstream_unavailable",
        "upstream_unavailable",
    ]
    assert get_breaker("gemini").state is BreakerState.OPEN
    assert without_request_id(opened) == error_frame(
        "open",
        "circuit_open",
        "Calls to the gemini provider are paused after repeated failures; "
        "retry in 5 s.",
        retry_after=5,
    )
    assert fake_gemini.call_count == calls


# Cache scope


async def test_per_key_cache_keeps_keys_apart(
    fake_gemini, settings, owner_key, limited_key
):
    settings.CACHE_SCOPE = "per_key"
    chat = {"type": "chat", "id": "c", "prompt": "Cache me", "cache": True}

    async with chat_socket([bearer(owner_key)]) as owner_socket:
        await owner_socket.send_json_to(chat)
        first = await receive_until_end(owner_socket, "c")
        await owner_socket.send_json_to({**chat, "id": "again"})
        same_key = await receive_until_end(owner_socket, "again")
    async with chat_socket([bearer(limited_key)]) as limited_socket:
        await limited_socket.send_json_to(chat)
        other_key = await receive_until_end(limited_socket, "c")

    assert first[0]["cached"] is False
    assert same_key[0]["cached"] is True
    assert other_key[0]["cached"] is False
    assert fake_gemini.call_count == 2


async def test_shared_cache_serves_other_keys(
    fake_gemini, settings, owner_key, limited_key
):
    settings.CACHE_SCOPE = "shared"
    chat = {"type": "chat", "id": "c", "prompt": "Share me", "cache": True}

    async with chat_socket([bearer(owner_key)]) as owner_socket:
        await owner_socket.send_json_to(chat)
        first = await receive_until_end(owner_socket, "c")
    async with chat_socket([bearer(limited_key)]) as limited_socket:
        await limited_socket.send_json_to(chat)
        other_key = await receive_until_end(limited_socket, "c")

    assert first[0]["cached"] is False
    assert other_key[0]["cached"] is True
    assert fake_gemini.call_count == 1
