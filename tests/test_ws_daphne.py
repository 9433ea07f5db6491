"""End to end: a real daphne process, real Redis, the websockets client library.

The server runs with production-like settings (debug off) on a migrated and
synced SQLite file of its own. The fake Gemini server runs in this process so
the test can read its counters.
"""

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from socket import create_connection

import httpx
import pytest
from django.conf import settings
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.fake_gemini import FakeGemini, Reply
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ADMIN_USER = "prompt-admin"
ADMIN_PASSWORD = "a-long-test-password-41"
# Generous, because daphne imports the whole project before it listens.
START_TIMEOUT = 30.0
RECEIVE_TIMEOUT = 5.0
# The server's WS_AUTH_TIMEOUT_SECONDS: short, so the test of a client that
# never authenticates ends soon, yet long enough for an auth frame sent at once.
AUTH_TIMEOUT = 3.0
# A front-end served from another port of an allowed host, as in development.
BROWSER_ORIGIN = "http://localhost:5173"


def bearer(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


def wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daphne exited with code {process.returncode}")
        try:
            with create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"daphne did not listen on port {port} within {timeout} s")


def manage(env: dict, *command: str) -> str:
    """Run a manage.py command against the server's database; return its stdout."""
    result = subprocess.run(
        [sys.executable, "manage.py", *command],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout


@pytest.fixture(scope="module")
def fake_vendor():
    fake = FakeGemini()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, fake_vendor):
    """Start daphne on a free port; yield (address, database path, API key)."""
    folder = tmp_path_factory.mktemp("daphne")
    database = folder / "gateway.sqlite3"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "gateway_project.settings",
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": "test",
        "DATABASE_URL": f"sqlite:///{database}",
        "REDIS_URL": settings.REDIS_SERVER.url,
        "GEMINI_API_KEY": "test-gemini-key",
        "GEMINI_BASE_URL": fake_vendor.base_url,
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "LOG_LEVEL": "warning",
        "DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD,
        "TRUST_X_FORWARDED_PROTO": "true",
        "WS_AUTH_TIMEOUT_SECONDS": str(AUTH_TIMEOUT),
    }
    for name in ("LLM_MODELS", "DEFAULT_MODEL", "GATEWAY_AUTH"):
        env.pop(name, None)
    manage(env, "migrate", "--noinput")
    manage(env, "sync_prompts")
    manage(
        env,
        "createsuperuser",
        "--noinput",
        "--username",
        ADMIN_USER,
        "--email",
        "admin@example.com",
    )
    api_key = manage(env, "create_api_key", "end-to-end test").strip()

    port = free_port()
    log = (folder / "daphne.log").open("w")
    process = subprocess.Popen(
        [
            str(BIN / "daphne"),
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "gateway_project.asgi:application",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, process, START_TIMEOUT)
        yield f"127.0.0.1:{port}", database, api_key
    finally:
        process.kill()
        process.wait(timeout=10)
        log.close()


async def receive(socket) -> dict:
    return json.loads(await asyncio.wait_for(socket.recv(), RECEIVE_TIMEOUT))


async def receive_until_end(socket, client_id: str) -> list[dict]:
    frames = []
    while not frames or frames[-1]["type"] not in ("done", "error", "cancelled"):
        frame = await receive(socket)
        if frame.get("id") == client_id:
            frames.append(frame)
    return frames


async def test_tokens_stream_while_vendor_still_sends(server, fake_vendor):
    address, _, api_key = server
    chunks = [f"piece{index} " for index in range(20)]
    fake_vendor.enqueue(Reply(chunks=chunks, chunk_delay=0.2))
    disconnects_before = fake_vendor.disconnects

    async with connect(
        f"ws://{address}/ws/chat", additional_headers=bearer(api_key)
    ) as socket:
        chat = {"type": "chat", "id": "live", "prompt": "Stream please", "cache": False}
        await socket.send(json.dumps(chat))
        start = await receive(socket)
        first = await receive(socket)
        # Cancelling now closes the vendor's stream early only if the vendor
        # had not sent its last chunk when the first token reached us.
        await socket.send(json.dumps({"type": "cancel", "id": "live"}))
        rest = await receive_until_end(socket, "live")

    closed_early = await asyncio.to_thread(
        fake_vendor.wait_for_disconnect, disconnects_before + 1, 5.0
    )
    assert start["type"] == "start"
    assert first == {"type": "token", "id": "live", "text": "piece0 "}
    assert rest[-1] == {"type": "cancelled", "id": "live"}
    assert closed_early


async def test_full_stream_arrives_in_order(server, fake_vendor):
    address, _, api_key = server
    chunks = ["one ", "two ", "three ", "four"]
    fake_vendor.enqueue(Reply(chunks=chunks, chunk_delay=0.2))

    async with connect(
        f"ws://{address}/ws/chat", additional_headers=bearer(api_key)
    ) as socket:
        chat = {"type": "chat", "id": "all", "prompt": "Count", "cache": False}
        await socket.send(json.dumps(chat))
        frames = await receive_until_end(socket, "all")

    assert [frame["type"] for frame in frames] == ["start", *["token"] * 4, "done"]
    assert [frame["text"] for frame in frames[1:-1]] == chunks
    assert frames[-1]["finish_reason"] == "stop"


async def test_client_without_key_is_told_why(server):
    address, _, _ = server

    async with connect(f"ws://{address}/ws/chat") as websocket:
        # Nothing arrives before the server's auth timeout runs out.
        text = await asyncio.wait_for(websocket.recv(), AUTH_TIMEOUT + RECEIVE_TIMEOUT)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(websocket.recv(), RECEIVE_TIMEOUT)

    error = json.loads(text)
    assert error["error"]["code"] == "unauthenticated"
    assert error["error"]["message"].startswith(
        "No API key arrived within 3 s of connecting"
    )
    assert closed.value.rcvd.code == 4401


async def test_browser_authenticates_with_auth_frame(server, fake_vendor):
    address, _, api_key = server
    fake_vendor.enqueue(Reply(chunks=["Hello", " browser"]))

    # Like a browser: an Origin header and no Authorization header.
    async with connect(f"ws://{address}/ws/chat", origin=BROWSER_ORIGIN) as socket:
        await socket.send(json.dumps({"type": "auth", "id": "login", "key": api_key}))
        authenticated = await receive(socket)
        chat = {"type": "chat", "id": "b", "prompt": "Greet the browser"}
        await socket.send(json.dumps({**chat, "cache": False}))
        frames = await receive_until_end(socket, "b")

    assert authenticated == {
        "type": "authenticated",
        "id": "login",
        "key_prefix": api_key[:11],
    }
    assert [frame["type"] for frame in frames] == ["start", "token", "token", "done"]
    assert [frame["text"] for frame in frames[1:-1]] == ["Hello", " browser"]
    assert frames[-1]["finish_reason"] == "stop"


async def test_browser_frame_before_auth_closes(server, fake_vendor):
    address, _, _ = server
    calls_before = fake_vendor.call_count

    async with connect(f"ws://{address}/ws/chat", origin=BROWSER_ORIGIN) as socket:
        await socket.send(json.dumps({"type": "chat", "id": "x", "prompt": "Hi"}))
        error = await receive(socket)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), RECEIVE_TIMEOUT)

    assert error["error"]["code"] == "unauthenticated"
    assert closed.value.rcvd.code == 4401
    assert fake_vendor.call_count == calls_before


async def test_oversized_frame_closes_with_4009(server):
    address, _, api_key = server
    frame = json.dumps({"type": "chat", "id": "big", "prompt": "x" * 70_000})

    async with connect(
        f"ws://{address}/ws/chat", additional_headers=bearer(api_key)
    ) as websocket:
        await websocket.send(frame)
        error = await receive(websocket)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(websocket.recv(), RECEIVE_TIMEOUT)

    assert error["error"]["code"] == "frame_too_large"
    assert closed.value.rcvd.code == 4009


async def test_other_origin_is_rejected(server):
    address, _, _ = server

    with pytest.raises(InvalidStatus) as rejected:
        async with connect(f"ws://{address}/ws/chat", origin="http://evil.example"):
            pass

    assert rejected.value.response.status_code == 403


class _FormFields(HTMLParser):
    """Collect the name and current value of every field of an HTML form."""

    def __init__(self):
        super().__init__()
        self.fields: dict[str, str] = {}
        self._select: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        name = attributes.get("name")
        if tag == "input" and name and attributes.get("type") != "submit":
            self.fields[name] = attributes.get("value") or ""
        elif tag == "select" and name:
            self._select = name
        elif tag == "option" and self._select and "selected" in attributes:
            self.fields[self._select] = attributes.get("value") or ""

    def handle_endtag(self, tag):
        if tag == "select":
            self._select = None


def admin_activate(address: str, database: Path, prompt: str, version: int) -> int:
    """Choose ``version`` as the active version of ``prompt`` in the admin."""
    with sqlite3.connect(database) as connection:
        prompt_id, version_id = connection.execute(
            "SELECT p.id, v.id FROM prompts_registry_prompt p JOIN "
            "prompts_registry_promptversion v ON v.prompt_id = p.id "
            "WHERE p.name = ? AND v.version = ?",
            (prompt, version),
        ).fetchone()

    with AdminBrowser(address) as browser:
        login_page = browser.request("GET", "/admin/login/")
        login = browser.request(
            "POST",
            "/admin/login/",
            {
                "username": ADMIN_USER,
                "password": ADMIN_PASSWORD,
                "csrfmiddlewaretoken": _form_fields(login_page.text)[
                    "csrfmiddlewaretoken"
                ],
                "next": "/admin/",
            },
        )
        assert login.status_code == 302, login.text

        change_url = f"/admin/prompts_registry/prompt/{prompt_id}/change/"
        fields = _form_fields(browser.request("GET", change_url).text)
        fields["active_version"] = str(version_id)
        saved = browser.request("POST", change_url, fields)
    return saved.status_code


class AdminBrowser:
    """An HTTP client that reaches daphne as if through an HTTPS proxy.

    With debug off the gateway redirects plain HTTP and marks its cookies
    Secure. The server trusts X-Forwarded-Proto here, as behind a
    TLS-terminating proxy, and this client sends the Secure cookies itself,
    because httpx sends them only over https.
    """

    def __init__(self, address: str):
        self.origin = f"https://{address}"
        self.client = httpx.Client(base_url=f"http://{address}", timeout=5.0)
        self.cookies: dict[str, str] = {}

    def __enter__(self) -> "AdminBrowser":
        return self

    def __exit__(self, *exc_info) -> None:
        self.client.close()

    def request(self, method: str, path: str, form: dict | None = None):
        headers = {
            "X-Forwarded-Proto": "https",
            "Origin": self.origin,
            "Referer": self.origin + path,
            "Cookie": "; ".join(
                f"{name}={value}" for name, value in self.cookies.items()
            ),
        }
        response = self.client.request(method, path, data=form, headers=headers)
        self.cookies.update(response.cookies.items())
        self.client.cookies.clear()
        return response


def _form_fields(html: str) -> dict[str, str]:
    parser = _FormFields()
    parser.feed(html)
    return parser.fields


async def test_subscriber_hears_admin_activation(server):
    address, database, api_key = server

    async with connect(
        f"ws://{address}/ws/chat", additional_headers=bearer(api_key)
    ) as socket:
        await socket.send(
            json.dumps({"type": "subscribe", "id": "watch", "prompt": "summarizer"})
        )
        subscribed = await receive(socket)
        status = await asyncio.to_thread(
            admin_activate, address, database, "summarizer", 1
        )
        event = await receive(socket)

    assert subscribed == {"type": "subscribed", "id": "watch", "prompt": "summarizer"}
    assert status == 302
    assert event == {
        "type": "prompt_activated",
        "id": "watch",
        "prompt": "summarizer",
        "version": 1,
        "previous_version": 2,
    }


def test_render_reads_chunked_body(server):
    address, _, api_key = server
    # Only "text", which every version of summarizer declares, because
    # another test changes the active version.
    body = b'{"variables": {"text": "sent in chunks"}}'

    response = httpx.post(
        f"http://{address}/prompts/summarizer/render",
        content=iter([body[:20], body[20:]]),
        headers={
            **bearer(api_key),
            "Content-Type": "application/json",
            "X-Forwarded-Proto": "https",
        },
        timeout=RECEIVE_TIMEOUT,
    )

    assert response.request.headers["Transfer-Encoding"] == "chunked"
    assert response.status_code == 200
    assert "sent in chunks" in response.json()["user"]


def test_disallowed_host_gets_json_400(server):
    address, _, api_key = server

    response = httpx.post(
        f"http://{address}/chat",
        json={"prompt": "Hi"},
        headers={
            **bearer(api_key),
            "Host": "evil.example",
            "X-Forwarded-Proto": "https",
            "X-Request-ID": "host1",
        },
        timeout=RECEIVE_TIMEOUT,
    )

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "invalid_host",
            "message": "The Host header 'evil.example' is not in the gateway's "
            "ALLOWED_HOSTS: send the host name the gateway is served under, or "
            "add this host to ALLOWED_HOSTS.",
        },
        "request_id": "host1",
    }
