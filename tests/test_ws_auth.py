"""The chat websocket serves only clients with a valid gateway API key.

A key comes in the handshake (Authorization header or bearer subprotocol) or,
from browsers, in an auth frame sent first. The personas are ``owner_key``
(may use everything), ``revoked_key`` and ``outsider`` (a well-formed key the
gateway never issued).
"""

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
    new_api_key,
    receive,
    receive_close_code,
    receive_until_end,
    without_request_id,
)

pytestmark = pytest.mark.django_db(transaction=True)

CLOSE_UNAUTHENTICATED = 4401
AUTH_FRAME = '{"type": "auth", "key": "<key>"}'
UNKNOWN_KEY = (
    "The API key is not valid: check that it was copied whole, or ask an "
    "administrator for a new one."
)
FIRST_FRAME_NOT_AUTH = (
    f"The first frame must authenticate: send {AUTH_FRAME} before any other "
    "frame, or connect with the header `Authorization: Bearer <key>`. The "
    "connection is closed."
)


def revoked_message(raw_key: str) -> str:
    return (
        f"The API key {raw_key[:11]}… was revoked: ask an administrator for a new one."
    )


def error_frame(code: str, message: str, field: str | None = None, client_id=None):
    """An error frame without its request id, as ``without_request_id`` leaves it."""
    error = {"code": code, "message": message}
    if field:
        error["field"] = field
    return {"type": "error", "id": client_id, "error": error}


@pytest.fixture(autouse=True)
def auth_timeout(settings):
    """A timeout far longer than any test needs to send its auth frame."""
    settings.WS_AUTH_TIMEOUT_SECONDS = 60.0


# Keys in the handshake


async def test_key_as_subprotocol_is_accepted(fake_gemini, owner_key):
    communicator = WebsocketCommunicator(
        application, "/ws/chat", subprotocols=["bearer", owner_key]
    )

    accepted, subprotocol = await communicator.connect(timeout=RECEIVE_TIMEOUT)
    try:
        done = await chat_round_trip(communicator)
    finally:
        await communicator.disconnect(timeout=RECEIVE_TIMEOUT)

    assert accepted
    # The key itself is never echoed back as the accepted subprotocol.
    assert subprotocol == "bearer"
    assert done["type"] == "done"


async def test_outsider_in_header_is_rejected(fake_gemini, outsider):
    async with chat_socket([bearer(outsider)]) as socket:
        error = await receive(socket)
        code = await receive_close_code(socket)

    assert without_request_id(error) == error_frame("unauthenticated", UNKNOWN_KEY)
    assert code == CLOSE_UNAUTHENTICATED
    assert fake_gemini.call_count == 0


async def test_revoked_key_in_header_is_rejected(fake_gemini, revoked_key):
    async with chat_socket([bearer(revoked_key)]) as socket:
        error = await receive(socket)
        code = await receive_close_code(socket)

    assert without_request_id(error) == error_frame(
        "key_revoked", revoked_message(revoked_key)
    )
    assert code == CLOSE_UNAUTHENTICATED


async def test_other_auth_scheme_is_rejected(fake_gemini, owner_key):
    headers = [(b"authorization", f"Token {owner_key}".encode())]

    async with chat_socket(headers) as socket:
        error = await receive(socket)
        code = await receive_close_code(socket)

    assert without_request_id(error) == error_frame(
        "unauthenticated",
        "The Authorization header is malformed: send `Authorization: Bearer <key>`.",
    )
    assert code == CLOSE_UNAUTHENTICATED


# The auth frame


async def test_auth_frame_authenticates(fake_gemini, owner_key):
    fake_gemini.enqueue(Reply(chunks=["Hi", " there"]))

    async with chat_socket(headers=[]) as socket:
        await socket.send_json_to({"type": "auth", "id": "login", "key": owner_key})
        authenticated = await receive(socket)
        await socket.send_json_to({"type": "chat", "id": "c", "prompt": "Hello"})
        frames = await receive_until_end(socket, "c")

    assert authenticated == {
        "type": "authenticated",
        "id": "login",
        "key_prefix": owner_key[:11],
    }
    assert [frame["type"] for frame in frames] == ["start", "token", "token", "done"]
    assert fake_gemini.call_count == 1


async def test_auth_frame_without_id_is_answered(fake_gemini, owner_key):
    async with chat_socket(headers=[]) as socket:
        await socket.send_json_to({"type": "auth", "key": owner_key})
        authenticated = await receive(socket)

    assert authenticated == {
        "type": "authenticated",
        "id": None,
        "key_prefix": owner_key[:11],
    }


async def test_no_key_closes_after_timeout(fake_gemini, settings):
    settings.WS_AUTH_TIMEOUT_SECONDS = 0.2

    async with chat_socket(headers=[]) as socket:
        error = await receive(socket)
        code = await receive_close_code(socket)

    assert without_request_id(error) == error_frame(
        "unauthenticated",
        f"No API key arrived within 0.2 s of connecting: send {AUTH_FRAME} as the "
        "first frame, or connect with the header `Authorization: Bearer <key>`. "
        "The connection is closed.",
    )
    assert code == CLOSE_UNAUTHENTICATED
    assert fake_gemini.call_count == 0


async def test_authenticated_socket_outlives_timeout(fake_gemini, settings, owner_key):
    # NOTE: the auth frame must be handled within the 2 s timeout, so a
    # machine stalled for that long fails this test.
    settings.WS_AUTH_TIMEOUT_SECONDS = 2.0
    fake_gemini.enqueue(Reply(chunks=["late"], delay=3.0))

    async with chat_socket(headers=[]) as socket:
        await socket.send_json_to({"type": "auth", "key": owner_key})
        authenticated = await receive(socket)
        await socket.send_json_to({"type": "chat", "id": "slow", "prompt": "Wait"})
        start = await receive(socket)
        # Longer than the reply's delay, which outlasts the auth timeout.
        rest = await socket.receive_json_from(timeout=8.0)

    assert authenticated["type"] == "authenticated"
    assert start["type"] == "start"
    assert rest == {"type": "token", "id": "slow", "text": "late"}


async def test_auth_frame_with_outsider_key_closes(fake_gemini, outsider):
    async with chat_socket(headers=[]) as socket:
        await socket.send_json_to({"type": "auth", "id": "login", "key": outsider})
        error = await receive(socket)
        code = await receive_close_code(socket)

    assert without_request_id(error) == error_frame(
        "unauthenticated", UNKNOWN_KEY, client_id="login"
    )
    assert code == CLOSE_UNAUTHENTICATED
    assert fake_gemini.call_count == 0


async def test_auth_frame_with_revoked_key_closes(fake_gemini, revoked_key):
    async with chat_socket(headers=[]) as socket:
        await socket.send_json_to({"type": "auth", "key": revoked_key})
        error = await receive(socket)
        code = await receive_close_code(socket)

    assert without_request_id(error) == error_frame(
        "key_revoked", revoked_message(revoked_key)
    )
    assert code == CLOSE_UNAUTHENTICATED


@pytest.mark.parametrize(
    "frame",
    [{"type": "auth"}, {"type": "auth", "key": ""}, {"type": "auth", "key": 42}],
    ids=["missing", "empty", "number"],
)
async def test_auth_frame_without_key_closes(fake_gemini, frame):
    async with chat_socket(headers=[]) as socket:
        await socket.send_json_to(frame)
        error = await receive(socket)
        code = await receive_close_code(socket)

    assert without_request_id(error) == error_frame(
        "unauthenticated",
        f"key is required in the auth frame: send {AUTH_FRAME}.",
        field="key",
    )
    assert code == CLOSE_UNAUTHENTICATED


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "chat", "id": "early", "prompt": "Hi"}',
        '{"type": "subscribe", "prompt": "summarizer"}',
        '{"type": "Auth", "key": "gw_x"}',
        "{not json",
    ],
    ids=["chat", "subscribe", "wrong-case-type", "invalid-json"],
)
async def test_frame_before_auth_closes(fake_gemini, owner_key, text):
    async with chat_socket(headers=[]) as socket:
        await socket.send_to(text_data=text)
        error = await receive(socket)
        code = await receive_close_code(socket)

    assert without_request_id(error) == error_frame(
        "unauthenticated", FIRST_FRAME_NOT_AUTH
    )
    assert code == CLOSE_UNAUTHENTICATED
    assert fake_gemini.call_count == 0


async def test_frames_after_rejection_are_ignored(fake_gemini, owner_key):
    async with chat_socket(headers=[]) as socket:
        await socket.send_json_to({"type": "chat", "id": "early", "prompt": "Hi"})
        await socket.send_json_to({"type": "auth", "key": owner_key})
        error = await receive(socket)
        code = await receive_close_code(socket)
        leftover = await socket.receive_nothing(timeout=0.2)

    assert error["error"]["code"] == "unauthenticated"
    assert code == CLOSE_UNAUTHENTICATED
    assert leftover


async def test_key_in_query_string_ignored(fake_gemini, owner_key):
    query = f"api_key={owner_key}&key={owner_key}&token={owner_key}"

    async with chat_socket(headers=[], path=f"/ws/chat?{query}") as socket:
        await socket.send_json_to({"type": "chat", "id": "q", "prompt": "Hi"})
        error = await receive(socket)
        code = await receive_close_code(socket)

    assert without_request_id(error) == error_frame(
        "unauthenticated", FIRST_FRAME_NOT_AUTH
    )
    assert code == CLOSE_UNAUTHENTICATED
    assert fake_gemini.call_count == 0


async def test_auth_after_header_key_is_rejected(fake_gemini, owner_key):
    other_key = await database_sync_to_async(new_api_key)()

    async with chat_socket([bearer(owner_key)]) as socket:
        await socket.send_json_to({"type": "auth", "id": "again", "key": other_key})
        error = await receive(socket)
        done = await chat_round_trip(socket)

    assert without_request_id(error) == error_frame(
        "already_authenticated",
        f"This connection is already authenticated with API key {owner_key[:11]}…: "
        "open a new connection to use another key.",
        client_id="again",
    )
    assert done["type"] == "done"


async def test_second_auth_frame_is_rejected(fake_gemini, owner_key):
    async with chat_socket(headers=[]) as socket:
        await socket.send_json_to({"type": "auth", "key": owner_key})
        authenticated = await receive(socket)
        await socket.send_json_to({"type": "auth", "key": owner_key})
        error = await receive(socket)
        done = await chat_round_trip(socket)

    assert authenticated["type"] == "authenticated"
    assert error["error"]["code"] == "already_authenticated"
    assert done["type"] == "done"


# Keys revoked while connected


async def test_key_revoked_while_connected_stops_working(fake_gemini, owner_key):
    async with chat_socket([bearer(owner_key)]) as socket:
        before = await chat_round_trip(socket, "before")
        await database_sync_to_async(
            lambda: api_key_revoke(ApiKey.objects.get(prefix=owner_key[:11]))
        )()
        after = await chat_round_trip(socket, "after")
        still_open = await chat_round_trip(socket, "still")

    assert before["type"] == "done"
    assert without_request_id(after) == error_frame(
        "key_revoked", revoked_message(owner_key), client_id="after"
    )
    # Revocation fails each later frame; the client decides when to close.
    assert still_open["error"]["code"] == "key_revoked"
    assert fake_gemini.call_count == 1


async def test_key_revoked_after_auth_frame_stops_working(fake_gemini, owner_key):
    async with chat_socket(headers=[]) as socket:
        await socket.send_json_to({"type": "auth", "key": owner_key})
        await receive(socket)
        await database_sync_to_async(
            lambda: api_key_revoke(ApiKey.objects.get(prefix=owner_key[:11]))
        )()
        after = await chat_round_trip(socket, "after")

    assert after["error"]["code"] == "key_revoked"
    assert fake_gemini.call_count == 0


# GATEWAY_AUTH=off


async def test_gateway_auth_off_serves_without_key(fake_gemini, settings):
    settings.GATEWAY_AUTH = "off"
    fake_gemini.enqueue(Reply(chunks=["open"]))

    async with chat_socket(headers=[]) as socket:
        await socket.send_json_to({"type": "chat", "id": "o", "prompt": "Hi"})
        frames = await receive_until_end(socket, "o")

    assert frames[-1]["type"] == "done"
    assert frames[1] == {"type": "token", "id": "o", "text": "open"}


async def test_gateway_auth_off_still_checks_sent_key(
    fake_gemini, settings, owner_key, revoked_key
):
    settings.GATEWAY_AUTH = "off"

    async with chat_socket(headers=[]) as socket:
        anonymous = await chat_round_trip(socket, "anonymous")
        await socket.send_json_to({"type": "auth", "key": owner_key})
        authenticated = await receive(socket)
    async with chat_socket(headers=[]) as socket:
        await socket.send_json_to({"type": "auth", "key": revoked_key})
        error = await receive(socket)
        code = await receive_close_code(socket)

    assert anonymous["type"] == "done"
    assert authenticated["key_prefix"] == owner_key[:11]
    assert error["error"]["code"] == "key_revoked"
    assert code == CLOSE_UNAUTHENTICATED
