"""Helpers for the chat websocket tests: open a socket, read frames until an end."""

import re
from contextlib import asynccontextmanager

from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from gateway_project.asgi import application
from llm.keys import api_key_create

# Long enough for a slow CI machine, short enough that a hung consumer fails fast.
RECEIVE_TIMEOUT = 2.0
END_TYPES = ("done", "error", "cancelled")
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def new_api_key(**options) -> str:
    """Create a gateway API key in the test database and return the full key."""
    _, raw_key = api_key_create(name="websocket test", **options)
    return raw_key


create_api_key = database_sync_to_async(new_api_key)


def bearer(raw_key: str) -> tuple[bytes, bytes]:
    return (b"authorization", f"Bearer {raw_key}".encode())


@asynccontextmanager
async def chat_socket(
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    path: str = "/ws/chat",
    subprotocols: list[str] | None = None,
):
    """Connect to /ws/chat through the real ASGI application; always disconnect.

    Without ``headers`` the socket authenticates with a new API key.
    """
    if headers is None:
        headers = [bearer(await create_api_key())]
    communicator = WebsocketCommunicator(
        application, path, headers=headers, subprotocols=subprotocols
    )
    connected, _ = await communicator.connect(timeout=RECEIVE_TIMEOUT)
    assert connected, "the websocket handshake was rejected"
    try:
        yield communicator
    finally:
        await communicator.disconnect(timeout=RECEIVE_TIMEOUT)


async def receive(communicator) -> dict:
    return await communicator.receive_json_from(timeout=RECEIVE_TIMEOUT)


async def receive_close_code(communicator, timeout: float = RECEIVE_TIMEOUT) -> int:
    """Wait for the server to close the socket and return the close code."""
    message = await communicator.receive_output(timeout=timeout)
    assert message["type"] == "websocket.close", f"expected a close, got {message}"
    return message["code"]


def without_request_id(frame: dict) -> dict:
    """Check that the frame carries a request id and return the frame without it."""
    frame = dict(frame)
    request_id = frame.pop("request_id")
    assert REQUEST_ID.match(request_id), f"not a request id: {request_id!r}"
    return frame


async def receive_until_end(communicator, *client_ids: str) -> list[dict]:
    """Return every frame until each of ``client_ids`` got done, error or cancelled."""
    waiting = set(client_ids)
    frames = []
    while waiting:
        frame = await receive(communicator)
        frames.append(frame)
        if frame["type"] in END_TYPES:
            waiting.discard(frame["id"])
    return frames


def tokens(frames: list[dict], client_id: str) -> list[str]:
    return [
        frame["text"]
        for frame in frames
        if frame["type"] == "token" and frame["id"] == client_id
    ]


async def chat_round_trip(communicator, client_id: str = "check", **fields) -> dict:
    """Send a chat and return its last frame: proof that the connection still works."""
    await communicator.send_json_to(
        {"type": "chat", "id": client_id, "prompt": "Still there?", **fields}
    )
    frames = await receive_until_end(communicator, client_id)
    return frames[-1]
