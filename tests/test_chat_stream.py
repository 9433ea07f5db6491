import asyncio
import gzip
import logging

import pytest
from django.core.handlers.asgi import ASGIHandler

from llm.providers.base import GenerationRequest
from llm.services import StreamDone, StreamStart, chat_stream
from tests.chat_support import (
    AsgiRequest,
    Event,
    parse_events,
    post_json,
    read_events,
    request_id_filter,
    streamed_text,
)
from tests.fake_gemini import Reply

# Every request authenticates with a gateway API key, as clients must.
pytestmark = pytest.mark.usefixtures("gateway_key")

BODY = {"prompt": "Say hello.", "temperature": 0.2}
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def without_latency(event: Event) -> Event:
    data = dict(event.data)
    assert isinstance(data.pop("latency"), float)
    return Event(event.name, data)


async def test_stream_sends_chunks_then_done(fake_gemini):
    response = await post_json("/chat/stream", BODY, x_request_id="s1")

    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    assert response["Cache-Control"] == "no-cache"
    assert response["X-Accel-Buffering"] == "no"
    assert response["X-Cache"] == "miss"
    events = await read_events(response)
    assert events[:-1] == [
        Event("message", {"text": "Hello"}),
        Event("message", {"text": " from"}),
        Event("message", {"text": " the fake"}),
    ]
    assert without_latency(events[-1]) == Event(
        "done",
        {
            "model": "gemini-3.5-flash",
            "finish_reason": "stop",
            "usage": USAGE,
            "cached": False,
            "request_id": "s1",
        },
    )
    assert fake_gemini.calls[0].stream is True


async def test_streamed_hit_replays_same_text(fake_gemini):
    fake_gemini.default_reply = Reply(
        chunks=["The quick ", "brown fox ", "jumps over ", "the lazy ", "dog."]
    )
    first = await read_events(await post_json("/chat/stream", BODY))

    response = await post_json("/chat/stream", BODY, x_request_id="s2")

    assert response["X-Cache"] == "hit-l1"
    events = await read_events(response)
    assert streamed_text(events) == "The quick brown fox jumps over the lazy dog."
    assert streamed_text(events) == streamed_text(first)
    assert [event.name for event in events[:-1]] == ["message"] * (len(events) - 1)
    assert len(events) > 2
    assert without_latency(events[-1]) == Event(
        "done",
        {
            "model": "gemini-3.5-flash",
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
            "cached": True,
            "request_id": "s2",
        },
    )
    assert fake_gemini.call_count == 1


async def test_streamed_answer_serves_chat(fake_gemini):
    await read_events(await post_json("/chat/stream", BODY))

    response = await post_json("/chat", BODY)

    assert response["X-Cache"] == "hit-l1"
    assert response.json()["response"] == "Hello from the fake"
    assert fake_gemini.call_count == 1


async def test_chat_answer_serves_stream(fake_gemini):
    await post_json("/chat", BODY)

    response = await post_json("/chat/stream", BODY)

    assert response["X-Cache"] == "hit-l1"
    assert streamed_text(await read_events(response)) == "Hello from the fake"
    assert fake_gemini.call_count == 1


async def test_truncated_stream_is_not_cached(fake_gemini):
    fake_gemini.enqueue(Reply(finish_reason="MAX_TOKENS"))
    events = await read_events(await post_json("/chat/stream", BODY))

    again = await post_json("/chat/stream", BODY)

    assert events[-1].data["finish_reason"] == "length"
    assert again["X-Cache"] == "miss"
    await read_events(again)
    assert fake_gemini.call_count == 2


async def test_stream_bypass_via_header(fake_gemini):
    await read_events(await post_json("/chat/stream", BODY))

    response = await post_json("/chat/stream", BODY, cache_control="no-cache")

    assert response["X-Cache"] == "bypass"
    events = await read_events(response)
    assert events[-1].data["cached"] is False
    assert fake_gemini.call_count == 2


async def test_midstream_failure_ends_with_error_event(fake_gemini, caplog):
    request_id_filter(caplog)
    fake_gemini.enqueue(Reply(drop_after_chunks=1))

    response = await post_json("/chat/stream", BODY, x_request_id="s3")

    assert response.status_code == 200
    events = await read_events(response)
    assert events == [
        Event("message", {"text": "Hello"}),
        Event(
            "error",
            {
                "error": {
                    "code": "upstream_unavailable",
                    "message": "The connection to Gemini failed (RemoteProtocolError); "
                    "retry later.",
                },
                "request_id": "s3",
            },
        ),
    ]
    failures = [r for r in caplog.records if r.name == "llm.views"]
    assert [r.request_id for r in failures] == ["s3"]


async def test_midstream_failure_is_not_cached(fake_gemini):
    fake_gemini.enqueue(Reply(drop_after_chunks=1))
    await read_events(await post_json("/chat/stream", BODY))

    response = await post_json("/chat/stream", BODY)

    assert response["X-Cache"] == "miss"
    assert streamed_text(await read_events(response)) == "Hello from the fake"
    assert fake_gemini.call_count == 2


async def test_error_before_first_chunk_is_json(fake_gemini):
    fake_gemini.default_reply = Reply(status=429, retry_after=30)

    response = await post_json("/chat/stream", BODY, x_request_id="s4")

    assert response.status_code == 429
    assert response["Content-Type"] == "application/json"
    assert response["Retry-After"] == "30"
    assert response.json()["error"]["code"] == "upstream_rate_limited"
    assert response.json()["request_id"] == "s4"


async def test_blocked_prompt_is_json_422(fake_gemini):
    fake_gemini.default_reply = Reply(block_reason="SAFETY")

    response = await post_json("/chat/stream", BODY)

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "content_blocked"


async def test_invalid_stream_body_returns_400(fake_gemini):
    response = await post_json(
        "/chat/stream", {"prompt": "Hi", "top_p": 2}, x_request_id="s5"
    )

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "invalid_field",
            "message": "top_p: Must be from 0 to 1.",
            "field": "top_p",
        },
        "request_id": "s5",
    }
    assert fake_gemini.call_count == 0


async def test_disconnect_closes_upstream(fake_gemini):
    fake_gemini.default_reply = Reply(
        chunks=["one ", "two ", "three ", "four "], chunk_delay=0.3
    )
    request = AsgiRequest("/chat/stream", BODY)

    start = await request.start()
    first = await request.receive_body()
    await request.disconnect()

    assert start["status"] == 200
    assert parse_events(first) == [Event("message", {"text": "one "})]
    closed = await asyncio.to_thread(fake_gemini.wait_for_disconnect, 1, 5.0)
    assert closed
    again = await post_json("/chat/stream", BODY)
    assert again["X-Cache"] == "miss"
    await read_events(again)
    assert fake_gemini.call_count == 2


async def test_gzip_middleware_passes_each_event(fake_gemini, settings):
    settings.MIDDLEWARE = [
        *settings.MIDDLEWARE,
        "django.middleware.gzip.GZipMiddleware",
    ]
    fake_gemini.default_reply = Reply(
        chunks=["one ", "two ", "three "], chunk_delay=0.3
    )
    request = AsgiRequest(
        "/chat/stream",
        BODY,
        headers={"Accept-Encoding": "gzip"},
        app=ASGIHandler(),
    )

    start = await request.start()
    first = await request.receive_body()
    await request.disconnect()

    assert (b"Content-Encoding", b"gzip") in start["headers"]
    # The first event arrives on its own while the vendor is still sending.
    assert parse_events(gzip.decompress(first)) == [Event("message", {"text": "one "})]


async def test_disconnect_before_first_chunk(fake_gemini):
    fake_gemini.default_reply = Reply(delay=2.0)
    request = AsgiRequest("/chat/stream", BODY)
    await request.communicator.send_input(
        {"type": "http.request", "body": request.body, "more_body": False}
    )
    assert await asyncio.to_thread(fake_gemini.wait_for_calls, 1, 5.0)

    await request.disconnect()

    closed = await asyncio.to_thread(fake_gemini.wait_for_disconnect, 1, 5.0)
    assert closed


async def test_closing_service_stream_stops_upstream(fake_gemini):
    fake_gemini.default_reply = Reply(chunks=["a ", "b ", "c "], chunk_delay=0.3)
    request = GenerationRequest(model="gemini-3.5-flash", prompt="Count.")
    events = chat_stream(request)

    start = await anext(events)
    first = await anext(events)
    await events.aclose()

    assert start == StreamStart(model="gemini-3.5-flash", cache_status="miss")
    assert first == "a "
    closed = await asyncio.to_thread(fake_gemini.wait_for_disconnect, 1, 5.0)
    assert closed
    replay = [item async for item in chat_stream(request)]
    assert isinstance(replay[-1], StreamDone)
    assert replay[-1].cache_status == "miss"
    assert fake_gemini.call_count == 2


async def test_cancelling_service_stream_caches_nothing(fake_gemini):
    fake_gemini.default_reply = Reply(chunks=["a ", "b ", "c "], chunk_delay=0.3)
    request = GenerationRequest(model="gemini-3.5-flash", prompt="Count.")

    async def consume():
        async for _item in chat_stream(request):
            pass

    task = asyncio.create_task(consume())
    assert await asyncio.to_thread(fake_gemini.wait_for_calls, 1, 5.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    closed = await asyncio.to_thread(fake_gemini.wait_for_disconnect, 1, 5.0)
    assert closed
    fake_gemini.default_reply = Reply()
    replay = [item async for item in chat_stream(request)]
    assert replay[0] == StreamStart(model="gemini-3.5-flash", cache_status="miss")


async def test_stream_logs_carry_request_id(fake_gemini, caplog):
    request_id_filter(caplog)
    fake_gemini.enqueue(Reply(drop_after_chunks=2))

    with caplog.at_level(logging.INFO):
        await read_events(await post_json("/chat/stream", BODY, x_request_id="s6"))

    late = [r for r in caplog.records if r.name in ("llm.views", "llm.cache")]
    assert late
    assert {r.request_id for r in late} == {"s6"}
