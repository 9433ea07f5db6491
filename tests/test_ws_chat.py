"""The chat websocket streams model answers token by token, several at once."""

import asyncio
import threading

import pytest
from channels.db import database_sync_to_async

from llm.metrics import REGISTRY
from tests.fake_gemini import Reply
from tests.ws_support import (
    REQUEST_ID,
    chat_round_trip,
    chat_socket,
    receive,
    receive_until_end,
    tokens,
)

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "gemini-3.5-flash"


async def test_chat_streams_start_tokens_done(fake_gemini):
    async with chat_socket() as socket:
        await socket.send_json_to(
            {"type": "chat", "id": "a1", "prompt": "Say hello", "temperature": 0.2}
        )
        frames = await receive_until_end(socket, "a1")

    start, *token_frames, done = frames
    assert REQUEST_ID.match(start.pop("request_id"))
    assert start == {"type": "start", "id": "a1", "model": MODEL, "cached": False}
    assert token_frames == [
        {"type": "token", "id": "a1", "text": "Hello"},
        {"type": "token", "id": "a1", "text": " from"},
        {"type": "token", "id": "a1", "text": " the fake"},
    ]
    assert isinstance(done.pop("latency"), float)
    assert done == {
        "type": "done",
        "id": "a1",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        "cached": False,
    }
    assert fake_gemini.calls[0].stream is True
    assert fake_gemini.calls[0].body["generationConfig"] == {"temperature": 0.2}


async def test_first_token_arrives_before_stream_ends(fake_gemini):
    fake_gemini.enqueue(Reply(chunks=["one", " two", " three"], chunk_delay=0.3))

    async with chat_socket() as socket:
        await socket.send_json_to({"type": "chat", "id": "s", "prompt": "Count"})
        start = await receive(socket)
        first = await receive(socket)
        calls_when_first_token_arrived = fake_gemini.call_count
        disconnects_when_first_token_arrived = fake_gemini.disconnects
        rest = await receive_until_end(socket, "s")

    assert start["type"] == "start"
    assert first == {"type": "token", "id": "s", "text": "one"}
    assert calls_when_first_token_arrived == 1
    assert disconnects_when_first_token_arrived == 0
    assert [frame["type"] for frame in rest] == ["token", "token", "done"]


async def test_cache_hit_replays_same_tokens(fake_gemini):
    chat = {"type": "chat", "id": "c1", "prompt": "Cache me", "cache": True}

    async with chat_socket() as socket:
        await socket.send_json_to(chat)
        first = await receive_until_end(socket, "c1")
        await socket.send_json_to({**chat, "id": "c2"})
        second = await receive_until_end(socket, "c2")

    assert fake_gemini.call_count == 1
    assert first[0]["cached"] is False
    assert second[0]["cached"] is True
    assert second[-1]["type"] == "done"
    assert second[-1]["cached"] is True
    assert "".join(tokens(second, "c2")) == "".join(tokens(first, "c1"))
    assert "".join(tokens(second, "c2")) == "Hello from the fake"
    assert len(tokens(second, "c2")) >= 1


async def test_two_requests_interleave_on_one_socket(fake_gemini):
    slow = Reply(chunks=["a", "b", "c", "d"], chunk_delay=0.15)
    fake_gemini.enqueue(slow, slow)

    async with chat_socket() as socket:
        await socket.send_json_to({"type": "chat", "id": "x", "prompt": "First"})
        await socket.send_json_to({"type": "chat", "id": "y", "prompt": "Second"})
        frames = await receive_until_end(socket, "x", "y")

    order = [(frame["type"], frame["id"]) for frame in frames]
    first_done = min(order.index(("done", "x")), order.index(("done", "y")))
    tokens_before_first_done = {
        client_id for kind, client_id in order[:first_done] if kind == "token"
    }
    assert tokens_before_first_done == {"x", "y"}
    assert tokens(frames, "x") == ["a", "b", "c", "d"]
    assert tokens(frames, "y") == ["a", "b", "c", "d"]


async def test_duplicate_id_in_flight_is_rejected(fake_gemini):
    fake_gemini.enqueue(Reply(chunks=["slow", " answer"], chunk_delay=0.3))

    async with chat_socket() as socket:
        await socket.send_json_to({"type": "chat", "id": "d", "prompt": "One"})
        assert (await receive(socket))["type"] == "start"
        await socket.send_json_to({"type": "chat", "id": "d", "prompt": "Two"})
        frames = await receive_until_end(socket, "d")
        # The first request still finishes after the duplicate was rejected.
        rest = await receive_until_end(socket, "d")

    error = frames[-1]
    assert REQUEST_ID.match(error.pop("request_id"))
    assert error == {
        "type": "error",
        "id": "d",
        "error": {
            "code": "duplicate_id",
            "message": "A request with id 'd' is still in flight: use a new id "
            "for each request.",
            "field": "id",
        },
    }
    assert rest[-1]["type"] == "done"
    assert "".join(tokens(frames + rest, "d")) == "slow answer"
    assert fake_gemini.call_count == 1


async def test_id_is_reusable_after_done(fake_gemini):
    async with chat_socket() as socket:
        first = await chat_round_trip(socket, "same")
        second = await chat_round_trip(socket, "same")

    assert first["type"] == "done"
    assert second["type"] == "done"


async def test_requests_beyond_limit_are_rejected(fake_gemini, settings):
    settings.WS_MAX_IN_FLIGHT = 2
    slow = Reply(chunks=["a", "b"], chunk_delay=0.3)
    fake_gemini.enqueue(slow, slow)

    async with chat_socket() as socket:
        for client_id in ("r1", "r2", "r3"):
            await socket.send_json_to(
                {"type": "chat", "id": client_id, "prompt": client_id}
            )
        frames = await receive_until_end(socket, "r1", "r2", "r3")
        after_limit = await chat_round_trip(socket, "r4")

    errors = [frame for frame in frames if frame["type"] == "error"]
    assert len(errors) == 1
    assert errors[0]["id"] == "r3"
    assert errors[0]["error"] == {
        "code": "too_many_requests",
        "message": "This connection already has 2 requests in flight: wait for "
        "one to finish or cancel one.",
    }
    done_ids = {frame["id"] for frame in frames if frame["type"] == "done"}
    assert done_ids == {"r1", "r2"}
    assert after_limit["type"] == "done"


async def test_cancel_closes_upstream_and_caches_nothing(fake_gemini):
    slow = Reply(chunks=["partial", " answer", " never", " finished"], chunk_delay=0.5)
    fake_gemini.enqueue(slow)
    chat = {"type": "chat", "id": "k", "prompt": "Long story", "cache": True}

    async with chat_socket() as socket:
        await socket.send_json_to(chat)
        assert (await receive(socket))["type"] == "start"
        assert (await receive(socket)) == {
            "type": "token",
            "id": "k",
            "text": "partial",
        }
        await socket.send_json_to({"type": "cancel", "id": "k"})
        after_cancel = await receive_until_end(socket, "k")
        upstream_closed = await asyncio.to_thread(
            fake_gemini.wait_for_disconnect, 1, 5.0
        )
        await socket.send_json_to({**chat, "id": "k2"})
        second = await receive_until_end(socket, "k2")

    assert after_cancel[-1] == {"type": "cancelled", "id": "k"}
    assert "done" not in [frame["type"] for frame in after_cancel]
    assert upstream_closed
    assert second[0]["cached"] is False
    assert second[-1]["cached"] is False
    assert "".join(tokens(second, "k2")) == "Hello from the fake"
    assert fake_gemini.call_count == 2


async def test_cancel_is_served_while_database_thread_busy(fake_gemini):
    fake_gemini.enqueue(Reply(chunks=["a", "b", "c", "d"], chunk_delay=0.5))
    release = threading.Event()

    async with chat_socket() as socket:
        await socket.send_json_to({"type": "chat", "id": "b", "prompt": "Count"})
        assert (await receive(socket))["type"] == "start"
        assert (await receive(socket))["type"] == "token"
        # database_sync_to_async runs every call in one thread: keep it busy.
        busy = asyncio.ensure_future(database_sync_to_async(release.wait)())
        try:
            await socket.send_json_to({"type": "cancel", "id": "b"})
            after_cancel = await receive_until_end(socket, "b")
        finally:
            release.set()
            await busy

    assert after_cancel[-1] == {"type": "cancelled", "id": "b"}
    assert "done" not in [frame["type"] for frame in after_cancel]


async def test_cancel_of_unknown_id_is_an_error(fake_gemini):
    async with chat_socket() as socket:
        await socket.send_json_to({"type": "cancel", "id": "nope"})
        error = await receive(socket)
        check = await chat_round_trip(socket)

    assert error["type"] == "error"
    assert error["id"] == "nope"
    assert error["error"] == {
        "code": "not_found",
        "message": "No request with id 'nope' is in flight; it may have finished "
        "already.",
        "field": "id",
    }
    assert check["type"] == "done"


async def test_disconnect_mid_stream_closes_upstream(fake_gemini):
    fake_gemini.enqueue(Reply(chunks=["a", "b", "c", "d"], chunk_delay=0.5))

    async with chat_socket() as socket:
        await socket.send_json_to({"type": "chat", "id": "gone", "prompt": "Hi"})
        assert (await receive(socket))["type"] == "start"
        assert (await receive(socket))["type"] == "token"

    upstream_closed = await asyncio.to_thread(fake_gemini.wait_for_disconnect, 1, 5.0)
    assert upstream_closed


async def test_upstream_error_becomes_error_frame(fake_gemini):
    fake_gemini.enqueue(Reply(block_reason="SAFETY"))

    async with chat_socket() as socket:
        await socket.send_json_to({"type": "chat", "id": "b", "prompt": "Bad"})
        frames = await receive_until_end(socket, "b")
        check = await chat_round_trip(socket)

    error = frames[-1]
    assert error["type"] == "error"
    assert error["id"] == "b"
    assert REQUEST_ID.match(error["request_id"])
    assert error["error"]["code"] == "content_blocked"
    assert check["type"] == "done"


def requests_counted(status: int) -> float:
    labels = {"endpoint": "ws_chat", "model": MODEL, "status": str(status)}
    return REGISTRY.get_sample_value("llm_requests_total", labels) or 0.0


async def test_requests_are_counted_in_metrics(fake_gemini):
    fake_gemini.enqueue(Reply(), Reply(chunks=["a", "b", "c"], chunk_delay=0.5))
    done_before = requests_counted(200)
    cancelled_before = requests_counted(499)

    async with chat_socket() as socket:
        await chat_round_trip(socket, "counted")
        await socket.send_json_to({"type": "chat", "id": "gone", "prompt": "Slow"})
        assert (await receive(socket))["type"] == "start"
        await socket.send_json_to({"type": "cancel", "id": "gone"})
        await receive_until_end(socket, "gone")

    assert requests_counted(200) == done_before + 1
    assert requests_counted(499) == cancelled_before + 1
