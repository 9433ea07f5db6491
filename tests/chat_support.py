"""Helpers for the REST chat tests: post JSON, read server-sent events."""

import json
from dataclasses import dataclass

from asgiref.testing import ApplicationCommunicator
from django.test import AsyncClient

from gateway_project.asgi import application
from gateway_project.logging import RequestIdFilter

# Long enough for a slow CI machine, short enough that a hung stream fails fast.
RECEIVE_TIMEOUT = 5.0

# The API key the helpers below send, unless a test passes its own
# Authorization header. The gateway_key fixture sets it for each test.
_api_key: str | None = None


def use_api_key(raw_key: str | None) -> None:
    """Make the helpers send ``raw_key``; None makes them send no key."""
    global _api_key
    _api_key = raw_key


def with_api_key(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Add the test's API key to ``headers`` unless they set Authorization.

    Header names may be spelled as HTTP names or as keyword arguments
    (``x_request_id``). The key goes in each request's headers because
    AsyncClient(headers=...) in Django 5.2.19 sends Authorization as
    Http-Authorization.
    """
    headers = dict(headers or {})
    names = {name.lower().replace("_", "-") for name in headers}
    if _api_key is not None and "authorization" not in names:
        headers["Authorization"] = f"Bearer {_api_key}"
    return headers


async def post_json(path: str, body: dict | str, **headers):
    """POST ``body`` (a dict, or raw JSON text) as application/json, with the key."""
    data = body if isinstance(body, str) else json.dumps(body)
    return await AsyncClient().post(
        path, data=data, content_type="application/json", headers=with_api_key(headers)
    )


def expected_error(
    field: str | None, message: str, *, code: str, request_id: str
) -> dict:
    """Build the gateway's error body, as a test expects it in full."""
    error = {"code": code, "message": message}
    if field:
        error["field"] = field
    return {"error": error, "request_id": request_id}


@dataclass
class Event:
    name: str  # "message" for events without an "event:" line
    data: dict


def parse_events(raw: bytes) -> list[Event]:
    """Parse a text/event-stream body; every event must end with a blank line."""
    text = raw.decode()
    assert text.endswith("\n\n"), f"the stream ends mid-event: {text[-80:]!r}"
    events = []
    for block in text[:-2].split("\n\n"):
        name = "message"
        data_lines = []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data_lines.append(value)
            else:
                raise AssertionError(f"unexpected line in the event stream: {line!r}")
        events.append(Event(name, json.loads("\n".join(data_lines))))
    return events


async def read_events(response) -> list[Event]:
    """Read a streaming response from the test client to its end and parse it."""
    raw = b"".join([chunk async for chunk in response.streaming_content])
    return parse_events(raw)


def streamed_text(events: list[Event]) -> str:
    return "".join(event.data["text"] for event in events if event.name == "message")


def request_id_filter(caplog) -> None:
    """Give caplog's records the request id, as the console handler does."""
    caplog.handler.addFilter(RequestIdFilter())


class AsgiRequest:
    """One HTTP request driven through the project's real ASGI application.

    Unlike the test client, it lets a test read a streaming body piece by piece
    and then disconnect the way a server reports a closed socket.
    """

    def __init__(
        self,
        path: str,
        body: dict,
        headers: dict[str, str] | None = None,
        app=application,
    ):
        raw_headers = [(b"content-type", b"application/json")]
        for name, value in with_api_key(headers).items():
            raw_headers.append((name.lower().encode(), value.encode()))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": raw_headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
        }
        self.communicator = ApplicationCommunicator(app, scope)
        self.body = json.dumps(body).encode()

    async def start(self) -> dict:
        """Send the request; return the http.response.start message."""
        await self.communicator.send_input(
            {"type": "http.request", "body": self.body, "more_body": False}
        )
        return await self.communicator.receive_output(RECEIVE_TIMEOUT)

    async def receive_body(self) -> bytes:
        message = await self.communicator.receive_output(RECEIVE_TIMEOUT)
        assert message["type"] == "http.response.body"
        return message.get("body", b"")

    async def disconnect(self) -> None:
        await self.communicator.send_input({"type": "http.disconnect"})
        await self.communicator.wait(RECEIVE_TIMEOUT)
