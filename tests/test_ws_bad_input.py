"""Bad frames get an error frame naming the problem, and the socket keeps working."""

import json

import pytest

from tests.ws_support import RECEIVE_TIMEOUT, chat_round_trip, chat_socket, receive

pytestmark = pytest.mark.django_db(transaction=True)

PROTOCOL_ERRORS = [
    pytest.param(
        "{not json",
        None,
        {
            "code": "invalid_json",
            "message": "The frame is not valid JSON (Expecting property name "
            "enclosed in double quotes: line 1 column 2 (char 1)); send one JSON "
            "object per frame.",
        },
        id="invalid-json",
    ),
    pytest.param(
        "[1, 2]",
        None,
        {
            "code": "invalid_json",
            "message": "The frame must be a JSON object, not an array; send for "
            'example {"type": "chat", "id": "1", "prompt": "Hi"}.',
        },
        id="not-an-object",
    ),
    pytest.param(
        json.dumps({"type": "shout", "id": "t1"}),
        "t1",
        {
            "code": "invalid_field",
            "message": "type must be one of chat, prompt, cancel, subscribe, "
            "unsubscribe, auth; got 'shout'.",
            "field": "type",
        },
        id="unknown-type",
    ),
    pytest.param(
        json.dumps({"id": "t2", "prompt": "Hi"}),
        "t2",
        {
            "code": "invalid_field",
            "message": "type must be one of chat, prompt, cancel, subscribe, "
            "unsubscribe, auth; got None.",
            "field": "type",
        },
        id="missing-type",
    ),
    pytest.param(
        json.dumps({"type": "chat", "prompt": "Hi"}),
        None,
        {
            "code": "invalid_field",
            "message": "id is required in a chat frame: send a string that is "
            "unique among your requests in flight.",
            "field": "id",
        },
        id="missing-id",
    ),
    pytest.param(
        json.dumps({"type": "chat", "id": 7, "prompt": "Hi"}),
        None,
        {
            "code": "invalid_field",
            "message": "id must be a string of 1 to 128 characters.",
            "field": "id",
        },
        id="number-id",
    ),
    pytest.param(
        json.dumps({"type": "chat", "id": "", "prompt": "Hi"}),
        "",
        {
            "code": "invalid_field",
            "message": "id must be a string of 1 to 128 characters.",
            "field": "id",
        },
        id="empty-id",
    ),
    pytest.param(
        json.dumps({"type": "subscribe", "id": "s1"}),
        "s1",
        {
            "code": "invalid_field",
            "message": "prompt is required: send the name of a prompt in the registry.",
            "field": "prompt",
        },
        id="subscribe-without-prompt",
    ),
]


@pytest.mark.parametrize(("text", "echoed_id", "expected_error"), PROTOCOL_ERRORS)
async def test_bad_frame_gets_error_frame(fake_gemini, text, echoed_id, expected_error):
    async with chat_socket() as socket:
        await socket.send_to(text_data=text)
        error = await receive(socket)
        check = await chat_round_trip(socket)

    assert error.pop("request_id")
    assert error == {"type": "error", "id": echoed_id, "error": expected_error}
    assert check["type"] == "done"


async def test_binary_frame_gets_error_frame(fake_gemini):
    async with chat_socket() as socket:
        await socket.send_to(bytes_data=b'{"type": "chat"}')
        error = await receive(socket)
        check = await chat_round_trip(socket)

    assert error.pop("request_id")
    assert error == {
        "type": "error",
        "id": None,
        "error": {
            "code": "unsupported_frame",
            "message": "Binary frames are not accepted: send each message as a "
            "JSON text frame.",
        },
    }
    assert check["type"] == "done"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"model": "no-such-model"}, "model"),
        ({"prompt": ""}, "prompt"),
        ({"colour": "blue"}, "colour"),
    ],
)
async def test_invalid_chat_field_is_named(fake_gemini, fields, field):
    async with chat_socket() as socket:
        await socket.send_json_to(
            {"type": "chat", "id": "f", "prompt": "Hello", **fields}
        )
        error = await receive(socket)
        check = await chat_round_trip(socket)

    assert error["type"] == "error"
    assert error["id"] == "f"
    assert error["error"]["field"] == field
    assert error["error"]["code"] == "invalid_field"
    assert field in error["error"]["message"]
    assert check["type"] == "done"
    assert fake_gemini.call_count == 1


async def test_oversized_frame_closes_with_4009(fake_gemini, settings):
    settings.WS_MAX_FRAME_BYTES = 2048
    # 1,100 characters, but more than 2,200 bytes in UTF-8.
    text = json.dumps({"type": "chat", "prompt": "é" * 1100}, ensure_ascii=False)

    async with chat_socket() as socket:
        await socket.send_to(text_data=text)
        # A frame that was already on its way when the server closed.
        await socket.send_json_to({"type": "chat", "id": "late", "prompt": "Hi"})
        error = await receive(socket)
        closing = await socket.receive_output(timeout=RECEIVE_TIMEOUT)
        late_frame_ignored = await socket.receive_nothing(timeout=0.5)

    assert error.pop("request_id")
    assert error == {
        "type": "error",
        "id": None,
        "error": {
            "code": "frame_too_large",
            "message": "The frame has 2230 bytes, more than the limit of 2048 "
            "(WS_MAX_FRAME_BYTES): send a shorter message. The connection is "
            "closed.",
        },
    }
    assert closing == {"type": "websocket.close", "code": 4009}
    assert late_frame_ignored
    assert fake_gemini.call_count == 0


async def test_frame_at_size_limit_is_accepted(fake_gemini, settings):
    settings.WS_MAX_FRAME_BYTES = 2048
    envelope = json.dumps({"type": "chat", "id": "edge", "prompt": ""})
    prompt = "x" * (2048 - len(envelope))

    async with chat_socket() as socket:
        await socket.send_json_to({"type": "chat", "id": "edge", "prompt": prompt})
        frames = [await receive(socket)]
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(await receive(socket))

    assert frames[-1]["type"] == "done"
