"""The fake Gemini server speaks the wire format the real google-genai SDK reads."""

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from google import genai
from google.genai import errors, types

from tests.fake_gemini import Reply, split_stamp

MODEL = "gemini-3.5-flash"


def sdk_client(fake, api_version: str | None = None) -> genai.Client:
    options = types.HttpOptions(
        base_url=fake.base_url,
        api_version=api_version,
        retry_options=types.HttpRetryOptions(attempts=1),
    )
    return genai.Client(api_key="fake-key", http_options=options)


def test_generate_content_returns_joined_chunks(fake_gemini):
    config = types.GenerateContentConfig(
        system_instruction="Answer briefly.", temperature=0.2, max_output_tokens=7
    )

    client = sdk_client(fake_gemini)

    response = client.models.generate_content(
        model=MODEL, contents="Say hello", config=config
    )

    assert response.text == "Hello from the fake"
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    assert response.usage_metadata.prompt_token_count == 5
    assert response.usage_metadata.candidates_token_count == 3
    assert response.usage_metadata.total_token_count == 8
    call = fake_gemini.calls[0]
    assert call.path == f"/v1/models/{MODEL}:generateContent"
    assert call.model == MODEL
    assert call.stream is False
    assert call.headers["x-goog-api-key"] == "fake-key"
    assert call.body == {
        "contents": [{"role": "user", "parts": [{"text": "Say hello"}]}],
        "systemInstruction": {"role": "user", "parts": [{"text": "Answer briefly."}]},
        "generationConfig": {"temperature": 0.2, "maxOutputTokens": 7},
    }


async def test_stream_sends_one_event_per_chunk(fake_gemini):
    fake_gemini.enqueue(Reply(chunks=["a", "b", "c"], finish_reason="MAX_TOKENS"))
    client = sdk_client(fake_gemini, api_version="v1beta")

    stream = await client.aio.models.generate_content_stream(
        model=MODEL, contents="Count"
    )
    events = [event async for event in stream]

    assert [event.text for event in events] == ["a", "b", "c"]
    finish_reasons = [event.candidates[0].finish_reason for event in events]
    assert finish_reasons == [None, None, types.FinishReason.MAX_TOKENS]
    assert events[0].usage_metadata is None
    assert events[-1].usage_metadata.total_token_count == 8
    assert fake_gemini.calls[0].path == f"/v1beta/models/{MODEL}:streamGenerateContent"
    assert fake_gemini.calls[0].stream is True


def test_replies_are_used_in_order_then_default(fake_gemini):
    fake_gemini.enqueue(Reply(chunks=["first"]), Reply(chunks=["second"]))
    client = sdk_client(fake_gemini)

    texts = [
        client.models.generate_content(model=MODEL, contents="x").text for _ in range(3)
    ]

    assert texts == ["first", "second", "Hello from the fake"]
    assert fake_gemini.call_count == 3


async def test_echo_appends_last_user_text(fake_gemini):
    fake_gemini.default_reply = Reply(chunks=["You said: "], echo=True)
    client = sdk_client(fake_gemini)
    history = [
        types.Content(role="user", parts=[types.Part(text="first question")]),
        types.Content(role="model", parts=[types.Part(text="an answer")]),
        types.Content(role="user", parts=[types.Part(text="second question")]),
    ]

    whole = await client.aio.models.generate_content(model=MODEL, contents=history)
    stream = await client.aio.models.generate_content_stream(
        model=MODEL, contents="streamed question"
    )
    events = [event async for event in stream]

    assert whole.text == "You said: second question"
    assert [event.text for event in events] == ["You said: ", "streamed question"]
    assert events[-1].usage_metadata.candidates_token_count == 2


async def test_stamp_starts_chunks_with_send_time(fake_gemini):
    fake_gemini.enqueue(Reply(chunks=["a", "b", "c"], chunk_delay=0.01, stamp=True))
    client = sdk_client(fake_gemini)
    before = time.time()

    stream = await client.aio.models.generate_content_stream(model=MODEL, contents="x")
    events = [event async for event in stream]
    after = time.time()

    stamps, texts = zip(*(split_stamp(event.text) for event in events), strict=True)
    assert texts == ("a", "b", "c")
    assert None not in stamps
    assert before <= stamps[0] <= stamps[1] <= stamps[2] <= after


def test_split_stamp_leaves_plain_text_alone():
    assert split_stamp("token1 ") == (None, "token1 ")
    assert split_stamp("<t=1733330000.123456>token1 ") == (1733330000.123456, "token1 ")
    assert split_stamp("token1 <t=1733330000.123456>") == (
        None,
        "token1 <t=1733330000.123456>",
    )


def test_empty_answer_has_finish_reason_only(fake_gemini):
    fake_gemini.enqueue(Reply(chunks=[], finish_reason="MAX_TOKENS"))

    client = sdk_client(fake_gemini)

    response = client.models.generate_content(model=MODEL, contents="x")

    assert response.text is None
    assert response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert response.usage_metadata.candidates_token_count == 0


def test_blocked_prompt_has_prompt_feedback(fake_gemini):
    fake_gemini.enqueue(Reply(block_reason="PROHIBITED_CONTENT"))

    client = sdk_client(fake_gemini)

    response = client.models.generate_content(model=MODEL, contents="x")

    assert response.candidates is None
    assert response.prompt_feedback.block_reason == "PROHIBITED_CONTENT"


@pytest.mark.parametrize(
    ("status", "error_type", "google_status"),
    [
        (429, errors.ClientError, "RESOURCE_EXHAUSTED"),
        (401, errors.ClientError, "UNAUTHENTICATED"),
        (503, errors.ServerError, "UNAVAILABLE"),
    ],
)
def test_error_reply_has_google_error_shape(
    fake_gemini, status, error_type, google_status
):
    fake_gemini.enqueue(Reply(status=status, retry_after=7))
    client = sdk_client(fake_gemini)

    with pytest.raises(error_type) as raised:
        client.models.generate_content(model=MODEL, contents="x")

    assert raised.value.code == status
    assert raised.value.status == google_status
    assert raised.value.response.headers["Retry-After"] == "7"


async def test_stream_error_is_raised_before_events(fake_gemini):
    fake_gemini.enqueue(Reply(status=503))
    client = sdk_client(fake_gemini)

    with pytest.raises(errors.ServerError) as raised:
        stream = await client.aio.models.generate_content_stream(
            model=MODEL, contents="x"
        )
        [event async for event in stream]

    assert raised.value.code == 503


def test_dropped_connection_sends_no_response(fake_gemini):
    fake_gemini.enqueue(Reply(drop_connection=True))
    client = sdk_client(fake_gemini)

    with pytest.raises(Exception, match="disconnected without sending a response"):
        client.models.generate_content(model=MODEL, contents="x")

    assert fake_gemini.call_count == 1


def test_unknown_path_returns_not_found(fake_gemini):
    response = httpx.post(f"{fake_gemini.base_url}/v1/files", json={})

    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "code": 404,
            "message": "No route for POST /v1/files.",
            "status": "NOT_FOUND",
        }
    }
    assert fake_gemini.call_count == 0


def test_closed_stream_counts_as_disconnect(fake_gemini):
    fake_gemini.enqueue(Reply(chunks=["a"] * 50, chunk_delay=0.05))
    url = f"{fake_gemini.base_url}/v1/models/{MODEL}:streamGenerateContent?alt=sse"

    with httpx.stream("POST", url, json={"contents": []}) as response:
        first_line = next(response.iter_lines())

    assert first_line.startswith("data: ")
    assert fake_gemini.wait_for_disconnect(count=1)
    assert fake_gemini.disconnects == 1


def test_client_timeout_during_delay_counts_as_disconnect(fake_gemini):
    fake_gemini.enqueue(Reply(delay=30))
    url = f"{fake_gemini.base_url}/v1/models/{MODEL}:generateContent"

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={"contents": []}, timeout=0.2)

    assert fake_gemini.wait_for_disconnect(count=1)


def test_standalone_mode_serves_configured_chunks():
    command = [sys.executable, "-m", "tests.fake_gemini", "--chunks", "4"]
    process = subprocess.Popen(
        command, cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, text=True
    )
    try:
        base_url = process.stdout.readline().split()[-1]
        url = f"{base_url}/v1beta/models/{MODEL}:generateContent"

        response = httpx.post(url, json={"contents": []})
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)

    text = response.json()["candidates"][0]["content"]["parts"][0]["text"]
    assert text == "token0 token1 token2 token3 "
    assert "requests received: 1," in output


def test_standalone_stamp_option_stamps_stream_chunks():
    command = [sys.executable, "-m", "tests.fake_gemini", "--chunks", "2", "--stamp"]
    process = subprocess.Popen(
        command, cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, text=True
    )
    try:
        base_url = process.stdout.readline().split()[-1]
        client = genai.Client(
            api_key="fake-key", http_options=types.HttpOptions(base_url=base_url)
        )

        events = list(client.models.generate_content_stream(model=MODEL, contents="x"))
        whole = client.models.generate_content(model=MODEL, contents="x")
    finally:
        process.terminate()
        process.communicate(timeout=10)

    stamps, texts = zip(*(split_stamp(event.text) for event in events), strict=True)
    assert texts == ("token0 ", "token1 ")
    assert None not in stamps
    assert whole.text == "token0 token1 "
