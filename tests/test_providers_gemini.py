"""The Gemini adapter, through the real google-genai SDK, against the fake server."""

import asyncio
import logging

import pytest

from gateway_project.errors import InvalidField
from llm.errors import (
    ContentBlocked,
    UpstreamAuthFailed,
    UpstreamBadResponse,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from llm.providers.base import Completion, GenerationRequest, StreamEnd, Usage
from llm.providers.gemini import GeminiProvider
from tests.fake_gemini import Reply
from tests.redis_server import free_port

MODEL = "gemini-3.5-flash"
PROMPT = "Name a prime number"


@pytest.fixture
def provider():
    return GeminiProvider()


def chat_request(**overrides) -> GenerationRequest:
    return GenerationRequest(**{"model": MODEL, "prompt": PROMPT, **overrides})


async def collect(stream) -> list:
    return [item async for item in stream]


async def test_complete_returns_text_and_usage(provider, fake_gemini):
    request = chat_request(
        system="Answer in one word.", temperature=0.0, max_tokens=5, top_p=0.5, top_k=4
    )

    completion = await provider.complete(request)

    assert completion == Completion(
        text="Hello from the fake",
        model=MODEL,
        finish_reason="stop",
        usage=Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8),
    )
    call = fake_gemini.calls[0]
    assert call.path == f"/v1/models/{MODEL}:generateContent"
    assert call.headers["x-goog-api-key"] == "test-gemini-key"
    assert call.body == {
        "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
        "systemInstruction": {
            "role": "user",
            "parts": [{"text": "Answer in one word."}],
        },
        "generationConfig": {
            "temperature": 0.0,
            "maxOutputTokens": 5,
            "topP": 0.5,
            "topK": 4.0,
        },
    }


async def test_complete_sends_no_unset_options(provider, fake_gemini):
    await provider.complete(chat_request())

    assert fake_gemini.calls[0].body == {
        "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
        "generationConfig": {},
    }


async def test_stream_yields_chunks_then_end(provider, fake_gemini):
    fake_gemini.enqueue(Reply(chunks=["Two", ",", " three"]))

    items = await collect(provider.stream(chat_request()))

    assert items == [
        "Two",
        ",",
        " three",
        StreamEnd(
            model=MODEL,
            finish_reason="stop",
            usage=Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8),
        ),
    ]
    assert fake_gemini.calls[0].path == f"/v1/models/{MODEL}:streamGenerateContent"


async def test_max_tokens_without_text_is_length(provider, fake_gemini):
    fake_gemini.enqueue(
        Reply(chunks=[], finish_reason="MAX_TOKENS"),
        Reply(chunks=[], finish_reason="MAX_TOKENS"),
    )

    completion = await provider.complete(chat_request(max_tokens=1))
    items = await collect(provider.stream(chat_request(max_tokens=1)))

    assert completion.text == ""
    assert completion.finish_reason == "length"
    assert items == [
        StreamEnd(
            model=MODEL,
            finish_reason="length",
            usage=Usage(prompt_tokens=5, completion_tokens=0, total_tokens=5),
        )
    ]


@pytest.mark.parametrize(
    ("vendor_reason", "finish_reason"),
    [("STOP", "stop"), ("MAX_TOKENS", "length"), ("RECITATION", "safety")],
)
async def test_finish_reason_is_normalized(
    provider, fake_gemini, vendor_reason, finish_reason
):
    fake_gemini.enqueue(Reply(chunks=["Seven"], finish_reason=vendor_reason))

    completion = await provider.complete(chat_request())

    assert completion.text == "Seven"
    assert completion.finish_reason == finish_reason


async def test_unknown_finish_reason_is_other(provider, fake_gemini):
    fake_gemini.enqueue(Reply(chunks=["Sev"], finish_reason="LANGUAGE"))

    completion = await provider.complete(chat_request())

    assert completion.finish_reason == "other"


async def test_stream_without_finish_reason_keeps_usage(provider, fake_gemini, caplog):
    fake_gemini.enqueue(Reply(chunks=["Seven", " is"], finish_reason=None))

    with caplog.at_level(logging.WARNING, logger="llm.providers.gemini"):
        items = await collect(provider.stream(chat_request()))

    assert items == [
        "Seven",
        " is",
        StreamEnd(
            model=MODEL,
            finish_reason="other",
            usage=Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7),
        ),
    ]
    assert [record.getMessage() for record in caplog.records] == [
        f"Gemini stream for model {MODEL} ended without a finish reason"
    ]


async def test_safety_finish_without_text_is_blocked(provider, fake_gemini):
    fake_gemini.enqueue(
        Reply(chunks=[], finish_reason="SAFETY"),
        Reply(chunks=[], finish_reason="PROHIBITED_CONTENT"),
    )

    with pytest.raises(ContentBlocked) as complete_error:
        await provider.complete(chat_request())
    with pytest.raises(ContentBlocked) as stream_error:
        await collect(provider.stream(chat_request()))

    assert "finish reason SAFETY" in str(complete_error.value.detail)
    assert "finish reason PROHIBITED_CONTENT" in str(stream_error.value.detail)
    assert complete_error.value.status_code == 422
    assert fake_gemini.call_count == 2


async def test_stream_cut_by_safety_ends_with_safety(provider, fake_gemini):
    fake_gemini.enqueue(Reply(chunks=["Once", " upon"], finish_reason="SAFETY"))

    items = await collect(provider.stream(chat_request()))

    assert items[:2] == ["Once", " upon"]
    assert items[2].finish_reason == "safety"


async def test_blocked_prompt_is_content_blocked(provider, fake_gemini):
    fake_gemini.default_reply = Reply(block_reason="SAFETY")

    with pytest.raises(ContentBlocked) as complete_error:
        await provider.complete(chat_request())
    with pytest.raises(ContentBlocked) as stream_error:
        await collect(provider.stream(chat_request()))

    assert "blocked the prompt (block reason SAFETY)" in str(complete_error.value)
    assert "blocked the prompt (block reason SAFETY)" in str(stream_error.value)
    assert fake_gemini.call_count == 2


async def test_rate_limit_keeps_retry_after(provider, fake_gemini):
    # Retry-After is longer than UPSTREAM_RETRY_MAX_SECONDS, so no retry fits.
    fake_gemini.enqueue(Reply(status=429, retry_after=30))

    with pytest.raises(UpstreamRateLimited) as raised:
        await provider.complete(chat_request())

    assert raised.value.retry_after == 30
    assert raised.value.status_code == 429
    assert fake_gemini.call_count == 1


async def test_rate_limit_reads_retry_info(provider, fake_gemini):
    retry_info = {
        "@type": "type.googleapis.com/google.rpc.RetryInfo",
        "retryDelay": "12s",
    }
    fake_gemini.enqueue(Reply(status=429, error_details=[retry_info]))

    with pytest.raises(UpstreamRateLimited) as raised:
        await provider.complete(chat_request())

    assert raised.value.retry_after == 12


async def test_unavailable_is_retried_then_succeeds(provider, fake_gemini, caplog):
    fake_gemini.enqueue(Reply(status=503))

    with caplog.at_level(logging.WARNING, logger="llm.providers.gemini"):
        completion = await provider.complete(chat_request())

    assert completion.text == "Hello from the fake"
    assert fake_gemini.call_count == 2
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "503 UNAVAILABLE" in record.getMessage()
    assert PROMPT not in record.getMessage()
    assert "test-gemini-key" not in record.getMessage()


async def test_unavailable_until_deadline_raises(provider, fake_gemini, settings):
    settings.UPSTREAM_RETRY_MAX_SECONDS = 0.3
    fake_gemini.default_reply = Reply(status=503)

    with pytest.raises(UpstreamUnavailable) as raised:
        await provider.complete(chat_request())

    assert "503 UNAVAILABLE" in str(raised.value)
    assert raised.value.status_code == 503
    assert fake_gemini.call_count >= 2


async def test_server_errors_map_to_unavailable(provider, fake_gemini, settings):
    settings.UPSTREAM_RETRY_MAX_SECONDS = 0
    for status in (500, 502, 504):
        fake_gemini.enqueue(Reply(status=status))

        with pytest.raises(UpstreamUnavailable):
            await provider.complete(chat_request())

    assert fake_gemini.call_count == 3


@pytest.mark.parametrize("status", [401, 403])
async def test_rejected_key_is_auth_failure(provider, fake_gemini, settings, status):
    settings.GEMINI_API_KEY = "sk-secret-123"
    fake_gemini.enqueue(Reply(status=status, message="Key sk-secret-123 is invalid"))

    with pytest.raises(UpstreamAuthFailed) as raised:
        await provider.complete(chat_request())

    assert "sk-secret-123" not in str(raised.value)
    assert "GEMINI_API_KEY" in str(raised.value)
    assert raised.value.status_code == 502
    assert fake_gemini.call_count == 1


async def test_invalid_key_reason_is_auth_failure(provider, fake_gemini):
    error_info = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
    }
    fake_gemini.enqueue(Reply(status=400, error_details=[error_info]))

    with pytest.raises(UpstreamAuthFailed):
        await provider.complete(chat_request())


async def test_missing_key_is_auth_failure(provider, fake_gemini, settings):
    settings.GEMINI_API_KEY = None

    with pytest.raises(UpstreamAuthFailed) as raised:
        await provider.complete(chat_request())

    assert "GEMINI_API_KEY is not set" in str(raised.value)
    assert fake_gemini.call_count == 0


async def test_rejected_option_is_invalid_field(provider, fake_gemini):
    message = "max_output_tokens must be at most 65536"
    fake_gemini.enqueue(Reply(status=400, message=message))

    with pytest.raises(InvalidField) as raised:
        await provider.complete(chat_request(max_tokens=100000))

    assert raised.value.field == "max_tokens"
    assert str(raised.value) == (
        "Gemini rejected max_tokens (400 INVALID_ARGUMENT): send a max_tokens "
        f"that the model {MODEL} accepts."
    )
    assert fake_gemini.call_count == 1


async def test_other_bad_request_is_bad_response(provider, fake_gemini):
    fake_gemini.enqueue(Reply(status=400, message="Something else is wrong."))

    with pytest.raises(UpstreamBadResponse) as raised:
        await provider.complete(chat_request())

    assert str(raised.value) == (
        "Gemini rejected the request (400 INVALID_ARGUMENT): a value in the "
        "request is invalid. The gateway's log has Gemini's message under the "
        "request id."
    )


async def test_vendor_message_is_logged_not_returned(
    provider, fake_gemini, settings, caplog
):
    settings.GEMINI_API_KEY = "gemini-test-key"
    message = (
        "<script>alert(1)</script>\nkey=AIzaSECRET rejected, and so is "
        "gemini-test-key. " + "More detail. " * 40
    )
    fake_gemini.enqueue(Reply(status=400, message=message))

    with caplog.at_level(logging.INFO, logger="llm.providers.gemini"):
        with pytest.raises(UpstreamBadResponse) as raised:
            await provider.complete(chat_request())

    assert "<script>" not in str(raised.value)
    assert "AIzaSECRET" not in str(raised.value)
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    logged = caplog.records[0].getMessage()
    assert logged.startswith(
        f"Gemini rejected a request for model {MODEL} (400 INVALID_ARGUMENT): "
        "<script>alert(1)</script> key=[redacted] rejected, and so is [redacted]. "
        "More detail."
    )
    assert "AIzaSECRET" not in logged
    assert "gemini-test-key" not in logged
    assert "\n" not in logged
    vendor_part = logged.split("(400 INVALID_ARGUMENT): ", 1)[1]
    assert len(vendor_part) == 300


async def test_conflict_uses_own_words(provider, fake_gemini):
    fake_gemini.enqueue(Reply(status=409, message="Vendor <b>detail</b>."))

    with pytest.raises(UpstreamBadResponse) as raised:
        await provider.complete(chat_request())

    assert str(raised.value) == (
        "Gemini rejected the request (409 UNKNOWN): the request was rejected. The "
        "gateway's log has Gemini's message under the request id."
    )


async def test_unknown_model_is_bad_response(provider, fake_gemini):
    fake_gemini.enqueue(Reply(status=404))

    with pytest.raises(UpstreamBadResponse) as raised:
        await provider.complete(chat_request())

    assert "LLM_MODELS" in str(raised.value)
    assert fake_gemini.call_count == 1


async def test_slow_response_times_out(provider, fake_gemini, settings):
    settings.GEMINI_TIMEOUT_SECONDS = 0.3
    settings.UPSTREAM_RETRY_MAX_SECONDS = 0
    fake_gemini.enqueue(Reply(delay=10))

    with pytest.raises(UpstreamTimeout) as raised:
        await provider.complete(chat_request())

    assert "GEMINI_TIMEOUT_SECONDS=0.3" in str(raised.value)
    assert raised.value.status_code == 504
    assert fake_gemini.wait_for_disconnect()


async def test_dropped_connection_is_unavailable(provider, fake_gemini):
    fake_gemini.default_reply = Reply(drop_connection=True)

    with pytest.raises(UpstreamUnavailable) as raised:
        await provider.complete(chat_request())

    assert "RemoteProtocolError" in str(raised.value)
    assert fake_gemini.call_count >= 2


async def test_refused_connection_is_unavailable(provider, settings):
    settings.GEMINI_BASE_URL = f"http://127.0.0.1:{free_port()}"

    with pytest.raises(UpstreamUnavailable) as raised:
        await provider.complete(chat_request())

    assert "ConnectError" in str(raised.value)


async def test_stream_retried_before_first_chunk(provider, fake_gemini):
    fake_gemini.enqueue(Reply(status=503), Reply(chunks=["ok"]))

    items = await collect(provider.stream(chat_request()))

    assert items[0] == "ok"
    assert isinstance(items[1], StreamEnd)
    assert fake_gemini.call_count == 2


async def test_stream_not_retried_after_first_chunk(provider, fake_gemini):
    fake_gemini.enqueue(Reply(chunks=["a", "b", "c"], drop_after_chunks=1))
    received = []

    with pytest.raises(UpstreamUnavailable):
        async for item in provider.stream(chat_request()):
            received.append(item)

    assert received == ["a"]
    assert fake_gemini.call_count == 1


async def test_stream_aclose_closes_upstream(provider, fake_gemini):
    fake_gemini.enqueue(Reply(chunks=["tick"] * 200, chunk_delay=0.05))
    stream = provider.stream(chat_request())

    first = await anext(stream)
    await stream.aclose()

    assert first == "tick"
    assert fake_gemini.wait_for_disconnect()
    assert fake_gemini.disconnects == 1


async def test_stream_cancel_closes_upstream(provider, fake_gemini):
    fake_gemini.enqueue(Reply(chunks=["tick"] * 200, chunk_delay=0.05))
    first_chunk = asyncio.Event()

    async def consume():
        async for _ in provider.stream(chat_request()):
            first_chunk.set()

    task = asyncio.create_task(consume())
    await first_chunk.wait()
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake_gemini.wait_for_disconnect()


async def test_client_follows_settings_changes(provider, fake_gemini, settings):
    await provider.complete(chat_request())
    settings.GEMINI_API_KEY = "other-key"

    await provider.complete(chat_request())

    assert fake_gemini.calls[0].headers["x-goog-api-key"] == "test-gemini-key"
    assert fake_gemini.calls[1].headers["x-goog-api-key"] == "other-key"


async def test_streams_beyond_httpx_default_pool_run_at_once(provider, fake_gemini):
    # httpx's default pool has 100 connections. The second chunk of each
    # stream comes a minute later, so a stream that has to wait for a free
    # connection gets no first chunk before the deadline below.
    count = 120
    fake_gemini.default_reply = Reply(chunks=["first", "second"], chunk_delay=60)
    streams = [provider.stream(chat_request()) for _ in range(count)]

    try:
        async with asyncio.timeout(30):
            firsts = await asyncio.gather(*(anext(stream) for stream in streams))
    finally:
        for stream in streams:
            await stream.aclose()

    assert firsts == ["first"] * count
    assert fake_gemini.call_count == count


async def test_max_connections_setting_limits_pool(provider, fake_gemini, settings):
    settings.GEMINI_MAX_CONNECTIONS = 2
    fake_gemini.default_reply = Reply(chunks=["first", "second"], chunk_delay=60)
    streams = [provider.stream(chat_request()) for _ in range(3)]
    assert await anext(streams[0]) == "first"
    assert await anext(streams[1]) == "first"

    try:
        third = asyncio.ensure_future(anext(streams[2]))
        # Nothing can signal that a request is waiting for a connection, so
        # the third stream gets a short while in which it must not start.
        done, _ = await asyncio.wait([third], timeout=0.5)
        calls_while_full = fake_gemini.call_count
        await streams[0].aclose()
        async with asyncio.timeout(30):
            third_first = await third
    finally:
        for stream in streams:
            await stream.aclose()

    assert not done
    assert calls_while_full == 2
    assert third_first == "first"
    assert fake_gemini.call_count == 3
