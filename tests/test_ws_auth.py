"""The chat websocket serves only clients with a valid gateway API key."""

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from gateway_project.asgi import application
from llm.keys import api_key_revoke
from llm.models import ApiKey
from tests.fake_gemini import Reply
from tests.ws_support import (
    RECEIVE_TIMEOUT,
    bearer,
    chat_round_trip,
    chat_socket,
    create_api_key,
    receive,
    receive_until_end,
)

pytestmark = pytest.mark.django_db(transaction=True)


async def rejected_handshake(headers=(), subprotocols=None) -> tuple[dict, dict]:
    """Connect, and return the error frame and the close message that follow."""
    communicator = WebsocketCommunicator(
        application, "/ws/chat", headers=list(headers), subprotocols=subprotocols
    )
    try:
        accepted, _ = await communicator.connect(timeout=RECEIVE_TIMEOUT)
        assert accepted
        error = await communicator.receive_json_from(timeout=RECEIVE_TIMEOUT)
        closing = await communicator.receive_output(timeout=RECEIVE_TIMEOUT)
    finally:
        await communicator.disconnect(timeout=RECEIVE_TIMEOUT)
    return error, closing


async def test_client_without_key_is_rejected(fake_gemini):
    error, closing = await rejected_handshake()

    assert error.pop("request_id")
    assert error == {
        "type": "error",
        "id": None,
        "error": {
            "code": "unauthenticated",
            "message": "An API key is required: send the header "
            "`Authorization: Bearer <key>`.",
        },
    }
    assert closing == {"type": "websocket.close", "code": 4401}
    assert fake_gemini.call_count == 0


async def test_client_with_unknown_key_is_rejected(fake_gemini):
    error, closing = await rejected_handshake([bearer("gw_" + "x" * 43)])

    assert error["error"]["code"] == "unauthenticated"
    assert error["error"]["message"].startswith("The API key is not valid")
    assert closing["code"] == 4401


async def test_key_as_subprotocol_is_accepted(fake_gemini):
    raw_key = await create_api_key()
    communicator = WebsocketCommunicator(
        application, "/ws/chat", subprotocols=["bearer", raw_key]
    )

    accepted, subprotocol = await communicator.connect(timeout=RECEIVE_TIMEOUT)
    try:
        done = await chat_round_trip(communicator)
    finally:
        await communicator.disconnect(timeout=RECEIVE_TIMEOUT)

    assert accepted
    assert subprotocol == "bearer"
    assert done["type"] == "done"


async def test_key_revoked_while_connected_stops_working(fake_gemini):
    raw_key = await create_api_key()

    async with chat_socket([bearer(raw_key)]) as socket:
        before = await chat_round_trip(socket, "before")
        await database_sync_to_async(
            lambda: api_key_revoke(ApiKey.objects.get(revoked=False))
        )()
        after = await chat_round_trip(socket, "after")

    assert before["type"] == "done"
    assert after["type"] == "error"
    assert after["error"]["code"] == "key_revoked"
    assert fake_gemini.call_count == 1


async def test_model_outside_allow_list_is_forbidden(fake_gemini):
    raw_key = await create_api_key(allowed_models=["smollm2-135m-instruct"])

    async with chat_socket([bearer(raw_key)]) as socket:
        await socket.send_json_to({"type": "chat", "id": "m", "prompt": "Hi"})
        error = await receive(socket)

    assert error["id"] == "m"
    assert error["error"]["code"] == "forbidden"
    assert error["error"]["field"] == "model"
    assert fake_gemini.call_count == 0


async def test_prompt_outside_allow_list_is_forbidden(fake_gemini):
    raw_key = await create_api_key(allowed_prompts=["classifier"])

    async with chat_socket([bearer(raw_key)]) as socket:
        await socket.send_json_to(
            {"type": "prompt", "id": "p", "name": "summarizer", "variables": {}}
        )
        render_error = await receive(socket)
        await socket.send_json_to({"type": "subscribe", "prompt": "summarizer"})
        subscribe_error = await receive(socket)

    assert render_error["id"] == "p"
    assert render_error["error"]["code"] == "forbidden"
    assert subscribe_error["error"]["code"] == "forbidden"
    assert fake_gemini.call_count == 0


async def test_request_limit_applies_per_frame(fake_gemini):
    raw_key = await create_api_key(requests_per_minute=1)

    async with chat_socket([bearer(raw_key)]) as socket:
        first = await chat_round_trip(socket, "one")
        second = await chat_round_trip(socket, "two")

    assert first["type"] == "done"
    assert second["type"] == "error"
    assert second["error"]["code"] == "rate_limited"
    assert fake_gemini.call_count == 1


async def test_gateway_auth_off_serves_without_key(fake_gemini, settings):
    settings.GATEWAY_AUTH = "off"
    fake_gemini.enqueue(Reply(chunks=["open"]))

    async with chat_socket(headers=[]) as socket:
        await socket.send_json_to({"type": "chat", "id": "o", "prompt": "Hi"})
        frames = await receive_until_end(socket, "o")

    assert frames[-1]["type"] == "done"
    assert frames[1] == {"type": "token", "id": "o", "text": "open"}


async def test_per_key_cache_keeps_keys_apart(fake_gemini, settings):
    settings.CACHE_SCOPE = "per_key"
    chat = {"type": "chat", "id": "c", "prompt": "Cache me", "cache": True}

    async with chat_socket() as first_key_socket:
        await first_key_socket.send_json_to(chat)
        first = await receive_until_end(first_key_socket, "c")
        await first_key_socket.send_json_to({**chat, "id": "again"})
        same_key = await receive_until_end(first_key_socket, "again")
    async with chat_socket() as second_key_socket:
        await second_key_socket.send_json_to(chat)
        other_key = await receive_until_end(second_key_socket, "c")

    assert first[0]["cached"] is False
    assert same_key[0]["cached"] is True
    assert other_key[0]["cached"] is False
    assert fake_gemini.call_count == 2
