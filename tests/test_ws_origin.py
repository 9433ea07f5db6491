"""Only pages served from ALLOWED_HOSTS, and non-browser clients, may connect."""

import logging

import pytest
from channels.testing import WebsocketCommunicator

from gateway_project.asgi import application
from tests.ws_support import RECEIVE_TIMEOUT, bearer, create_api_key

# Channels closes stale database connections around every consumer event, even
# in the consumer that rejects a handshake.
pytestmark = pytest.mark.django_db(transaction=True)


async def handshake(origin: bytes | None) -> tuple[bool, object]:
    headers = [bearer(await create_api_key())]
    if origin is not None:
        headers.append((b"origin", origin))
    communicator = WebsocketCommunicator(application, "/ws/chat", headers=headers)
    try:
        return await communicator.connect(timeout=RECEIVE_TIMEOUT)
    finally:
        await communicator.disconnect(timeout=RECEIVE_TIMEOUT)


async def test_origin_of_other_site_is_rejected(caplog):
    caplog.set_level(logging.WARNING, logger="llm.ws_origin")

    accepted, close_code = await handshake(b"http://evil.example")

    assert accepted is False
    assert close_code == 1000
    assert [record.getMessage() for record in caplog.records] == [
        "Rejected websocket handshake: Origin 'http://evil.example' is not in "
        "ALLOWED_HOSTS (127.0.0.1, localhost)"
    ]


async def test_origin_without_host_is_rejected(caplog):
    caplog.set_level(logging.WARNING, logger="llm.ws_origin")

    accepted, _ = await handshake(b"null")

    assert accepted is False
    assert [record.getMessage() for record in caplog.records] == [
        "Rejected websocket handshake: Origin 'null' has no host name"
    ]


@pytest.mark.parametrize(
    "origin",
    [b"http://localhost:8000", b"https://127.0.0.1", None],
    ids=["localhost", "loopback-https", "no-origin-header"],
)
async def test_allowed_origin_connects(origin, caplog):
    caplog.set_level(logging.WARNING, logger="llm.ws_origin")

    accepted, _ = await handshake(origin)

    assert accepted is True
    assert caplog.records == []
