"""Malformed input gets a 4xx in the error shape, on every endpoint and the websocket.

The five POST endpoints read bodies through gateway_project/json_body.py and
websocket frames go through the same rules, so most cases run against all of
them with the same expected body.
"""

import io
import json

import pytest
from django.conf import settings
from django.test import AsyncClient, Client

from gateway_project.errors import error_body
from gateway_project.json_body import MAX_JSON_DEPTH, JSONBodyParser
from gateway_project.logging import request_id_var
from prompts_registry.services import prompts_sync
from tests.chat_support import (
    RECEIVE_TIMEOUT,
    AsgiRequest,
    expected_error,
    with_api_key,
)
from tests.ws_support import REQUEST_ID as REQUEST_ID_PATTERN
from tests.ws_support import chat_round_trip, chat_socket, receive

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("gateway_key"),
]

REQUEST_ID = "in1"
CHAT_PATHS = ["/chat", "/chat/stream"]
PROMPT_PATHS = [
    "/prompts/summarizer/chat",
    "/prompts/summarizer/chat/stream",
    "/prompts/summarizer/render",
]
POST_PATHS = [*CHAT_PATHS, *PROMPT_PATHS]
CHAT_EXAMPLE = '{"prompt": "Hello"}'
PROMPT_EXAMPLE = '{"variables": {...}}'
SURROGATE_FIX = (
    "send valid Unicode text, in which a \\ud800-\\udbff escape is always "
    "followed by a \\udc00-\\udfff escape."
)


@pytest.fixture(autouse=True)
def summarizer():
    """The prompts of fixtures/prompts; summarizer v2 is active."""
    prompts_sync(root=settings.PROMPTS_DIR)


def error(message: str, *, code: str = "invalid_json", field: str | None = None):
    return expected_error(field, message, code=code, request_id=REQUEST_ID)


def body_with(path: str, value: str) -> str:
    """A body for ``path`` whose one free-form value is the JSON text ``value``."""
    if path in CHAT_PATHS:
        return f'{{"prompt": "Hi", "top_k": {value}}}'
    return f'{{"variables": {{"text": {value}}}}}'


def nested_body(path: str, depth: int) -> str:
    """A body for ``path`` whose arrays and objects nest ``depth`` levels deep."""
    # The chat body's value sits in one object, the prompt body's in two.
    arrays = depth - (1 if path in CHAT_PATHS else 2)
    return body_with(path, "[" * arrays + "]" * arrays)


def example_for(path: str) -> str:
    return CHAT_EXAMPLE if path in CHAT_PATHS else PROMPT_EXAMPLE


async def post(path: str, data: str | bytes, content_type="application/json"):
    return await AsyncClient().post(
        path,
        data=data,
        content_type=content_type,
        headers=with_api_key({"X-Request-ID": REQUEST_ID}),
    )


async def post_asgi(path: str, chunks: list[bytes]) -> tuple[int, dict]:
    """POST ``chunks`` through the ASGI application without Content-Length.

    Daphne delivers a chunked request body this way: several http.request
    messages and no Content-Length. Returns the status and the JSON body.
    """
    request = AsgiRequest(path, {}, headers={"X-Request-ID": REQUEST_ID})
    communicator = request.communicator
    for index, chunk in enumerate(chunks or [b""]):
        more_body = index < len(chunks) - 1
        await communicator.send_input(
            {"type": "http.request", "body": chunk, "more_body": more_body}
        )
    start = await communicator.receive_output(RECEIVE_TIMEOUT)
    body = b""
    while True:
        message = await communicator.receive_output(RECEIVE_TIMEOUT)
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await communicator.wait(RECEIVE_TIMEOUT)
    return start["status"], json.loads(body)


async def send_bad_frame(text: str) -> tuple[dict, dict]:
    """Send ``text`` as one websocket frame and then a valid chat.

    Returns the error frame, checked for a request id and without it, and the
    last frame of the chat, which shows whether the socket still works.
    """
    async with chat_socket() as socket:
        await socket.send_to(text_data=text)
        error_frame = await receive(socket)
        check = await chat_round_trip(socket)

    assert REQUEST_ID_PATTERN.match(error_frame.pop("request_id"))
    return error_frame, check


# Nesting


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 100_000])
@pytest.mark.parametrize("path", POST_PATHS)
async def test_deep_nesting_is_invalid_json(fake_gemini, path, depth):
    response = await post(path, nested_body(path, depth))

    assert response.status_code == 400
    assert response.json() == error(
        "The body nests arrays or objects more than 64 levels deep; send a JSON "
        "object with less nesting."
    )
    assert fake_gemini.call_count == 0


@pytest.mark.parametrize("path", POST_PATHS)
async def test_nesting_at_limit_reaches_validation(fake_gemini, path):
    response = await post(path, nested_body(path, MAX_JSON_DEPTH))

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_field"


async def test_deep_websocket_frame_is_invalid_json(fake_gemini):
    nested = "[" * 1000 + "]" * 1000
    text = f'{{"type": "chat", "id": "d", "prompt": "Hi", "top_k": {nested}}}'

    error_frame, check = await send_bad_frame(text)

    assert error_frame == {
        "type": "error",
        "id": None,
        "error": {
            "code": "invalid_json",
            "message": "The frame nests arrays or objects more than 64 levels "
            "deep; send one JSON object per frame with less nesting.",
        },
    }
    assert check["type"] == "done"


# Numbers that are not JSON


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("NaN", "NaN is not a JSON value"),
        ("-Infinity", "-Infinity is not a JSON value"),
        ("1e400", "1e400 is out of range for a number"),
        ("9" * 5000, "an integer of 5000 digits is longer than the limit of 4300"),
    ],
    ids=["nan", "infinity", "float-overflow", "long-integer"],
)
@pytest.mark.parametrize("path", POST_PATHS)
async def test_non_json_number_is_invalid_json(fake_gemini, path, value, reason):
    response = await post(path, body_with(path, value))

    assert response.status_code == 400
    assert response.json() == error(
        f"The body is not valid JSON ({reason}); send a JSON object."
    )


async def test_nan_in_websocket_frame_is_invalid_json(fake_gemini):
    text = '{"type": "chat", "id": "n", "prompt": "Hi", "temperature": NaN}'

    error_frame, check = await send_bad_frame(text)

    assert check["type"] == "done"
    assert error_frame == {
        "type": "error",
        "id": None,
        "error": {
            "code": "invalid_json",
            "message": "The frame is not valid JSON (NaN is not a JSON value); "
            "send one JSON object per frame.",
        },
    }


# Encoding


@pytest.mark.parametrize("path", ["/chat", "/prompts/summarizer/render"])
async def test_utf8_bom_is_skipped(fake_gemini, path):
    body = body_with(path, '"hé"').replace('"top_k": "hé"', '"top_k": 2')

    response = await post(path, b"\xef\xbb\xbf" + body.encode())

    assert response.status_code == 200


async def test_render_returns_non_ascii_as_escapes(fake_gemini):
    response = await post("/prompts/summarizer/render", body_with("", '"hé ✓"'))

    assert response.status_code == 200
    assert b"h\\u00e9 \\u2713" in response.content
    assert "hé ✓" in response.json()["user"]


async def test_utf8_bom_in_websocket_frame_is_skipped(fake_gemini):
    async with chat_socket() as socket:
        await socket.send_to(
            text_data='\ufeff{"type": "chat", "id": "b", "prompt": "Hi"}'
        )
        frames = [await receive(socket)]
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(await receive(socket))

    assert frames[-1]["type"] == "done"


@pytest.mark.parametrize("path", POST_PATHS)
async def test_other_charset_is_415(fake_gemini, path):
    response = await post(
        path,
        body_with(path, "1"),
        content_type="application/json; charset=latin-1",
    )

    assert response.status_code == 415
    assert response.json() == error(
        "The charset 'latin-1' is not supported: send the body as UTF-8, with "
        "Content-Type: application/json or application/json; charset=utf-8.",
        code="unsupported_media_type",
    )


@pytest.mark.parametrize("path", ["/chat", "/prompts/summarizer/render"])
async def test_utf8_charset_is_accepted(fake_gemini, path):
    body = body_with(path, '"x"').replace('"top_k": "x"', '"top_k": 2')

    response = await post(path, body, content_type="application/json; charset=UTF-8")

    assert response.status_code == 200


@pytest.mark.parametrize("path", POST_PATHS)
async def test_invalid_utf8_is_invalid_json(fake_gemini, path):
    raw = body_with(path, '"caf\xe9"').encode("latin-1")
    position = raw.index(b"\xe9")

    response = await post(path, raw)

    assert response.status_code == 400
    assert response.json() == error(
        f"The body is not valid UTF-8 (byte 0xe9 at position {position}: invalid "
        "continuation byte); send the JSON encoded as UTF-8."
    )


@pytest.mark.parametrize("path", POST_PATHS)
async def test_wrong_content_type_is_415(path):
    response = await post(path, "variables=1", content_type="text/plain")

    assert response.status_code == 415
    assert response.json() == error(
        "Content-Type must be application/json; send the body as JSON.",
        code="unsupported_media_type",
    )


# Strings with NUL or lone surrogates


@pytest.mark.parametrize("path", PROMPT_PATHS)
@pytest.mark.parametrize(
    ("variables", "field", "message"),
    [
        (
            '{"text": "\\ud800"}',
            "variables.text",
            "variables.text contains a lone surrogate (\\ud800) at position 0; "
            + SURROGATE_FIX,
        ),
        (
            '{"text": "ok \\udfff"}',
            "variables.text",
            "variables.text contains a lone surrogate (\\udfff) at position 3; "
            + SURROGATE_FIX,
        ),
        (
            '{"text": "ab\\u0000"}',
            "variables.text",
            "variables.text contains a NUL character at position 2; remove it.",
        ),
        (
            '{"\\ud800": 1}',
            "variables.\\ud800",
            "The name variables.\\ud800 contains a lone surrogate (\\ud800) at "
            "position 0; " + SURROGATE_FIX,
        ),
        (
            '{"te\\u0000xt": "a"}',
            "variables.te\\x00xt",
            "The name variables.te\\x00xt contains a NUL character at position 2; "
            "remove it.",
        ),
    ],
    ids=["surrogate", "low-surrogate", "nul", "surrogate-name", "nul-name"],
)
async def test_bad_string_in_variables_is_named(
    fake_gemini, path, variables, field, message
):
    response = await post(path, f'{{"variables": {variables}}}')

    assert response.status_code == 400
    assert response.json() == error(message, code="invalid_field", field=field)
    assert fake_gemini.call_count == 0


@pytest.mark.parametrize("path", POST_PATHS)
async def test_surrogate_body_name_is_named(fake_gemini, path):
    response = await post(path, '{"\\udabc": 1}')

    assert response.status_code == 400
    assert response.json() == error(
        "The name \\udabc contains a lone surrogate (\\udabc) at position 0; "
        + SURROGATE_FIX,
        code="invalid_field",
        field="\\udabc",
    )


async def test_surrogate_pair_is_accepted(fake_gemini):
    response = await post(
        "/prompts/summarizer/render", '{"variables": {"text": "\\ud83d\\ude00"}}'
    )

    assert response.status_code == 200
    assert "\U0001f600" in response.json()["user"]


async def test_surrogate_for_local_model_is_400(fake_gemini):
    body = '{"variables": {"text": "\\ud800"}, "model": "smollm2-135m-instruct"}'

    response = await post("/prompts/summarizer/chat", body)

    assert response.status_code == 400
    assert response.json()["error"]["field"] == "variables.text"


async def test_bad_string_in_prompt_frame_is_named(fake_gemini):
    text = (
        '{"type": "prompt", "id": "s1", "name": "summarizer", '
        '"variables": {"text": "x\\ud800"}}'
    )

    error_frame, check = await send_bad_frame(text)

    assert error_frame == {
        "type": "error",
        "id": "s1",
        "error": {
            "code": "invalid_field",
            "message": "variables.text contains a lone surrogate (\\ud800) at "
            "position 1; " + SURROGATE_FIX,
            "field": "variables.text",
        },
    }
    assert check["type"] == "done"
    assert fake_gemini.call_count == 1


async def test_nul_in_chat_frame_prompt_is_named(fake_gemini):
    text = json.dumps({"type": "chat", "id": "z", "prompt": "a\x00"})

    error_frame, check = await send_bad_frame(text)

    assert check["type"] == "done"
    assert error_frame == {
        "type": "error",
        "id": "z",
        "error": {
            "code": "invalid_field",
            "message": "prompt contains a NUL character at position 1; remove it.",
            "field": "prompt",
        },
    }


async def test_surrogate_key_in_auth_frame_is_rejected(fake_gemini):
    async with chat_socket(headers=[]) as socket:
        await socket.send_to(text_data='{"type": "auth", "key": "gw_\\ud800"}')
        error_frame = await receive(socket)
        closing = await socket.receive_output(timeout=RECEIVE_TIMEOUT)

    assert error_frame.pop("request_id")
    assert error_frame == {
        "type": "error",
        "id": None,
        "error": {
            "code": "invalid_field",
            "message": "key contains a lone surrogate (\\ud800) at position 3; "
            + SURROGATE_FIX,
            "field": "key",
        },
    }
    assert closing == {"type": "websocket.close", "code": 4401}


def test_error_body_escapes_unencodable_characters():
    token = request_id_var.set("e1")
    try:
        body = error_body("invalid_field", "bad \ud800 and \x00", "a\ud800")
    finally:
        request_id_var.reset(token)

    assert body == {
        "error": {
            "code": "invalid_field",
            "message": "bad \\ud800 and \\x00",
            "field": "a\\ud800",
        },
        "request_id": "e1",
    }
    assert json.dumps(body, ensure_ascii=False).encode("utf-8")


# Size and chunked bodies


async def test_render_over_size_limit_is_413(fake_gemini, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024

    response = await post(
        "/prompts/summarizer/render", json.dumps({"variables": {"text": "a" * 2000}})
    )

    assert response.status_code == 413
    assert response.json() == error(
        "The request body is larger than 1024 bytes (MAX_REQUEST_BYTES); send a "
        "smaller body.",
        code="request_too_large",
    )


@pytest.mark.parametrize("path", POST_PATHS)
async def test_chunked_body_over_size_limit_is_413(fake_gemini, settings, path):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    body = body_with(path, json.dumps("a" * 2000)).encode()

    status, response = await post_asgi(path, [body[:600], body[600:]])

    assert status == 413
    assert response == error(
        "The request body is larger than 1024 bytes (MAX_REQUEST_BYTES); send a "
        "smaller body.",
        code="request_too_large",
    )


async def test_render_reads_chunked_body(fake_gemini):
    body = b'{"variables": {"text": "chunked text", "bullets": 5}}'

    status, response = await post_asgi(
        "/prompts/summarizer/render", [body[:10], body[10:30], body[30:]]
    )

    assert status == 200
    assert "chunked text" in response["user"]
    assert "Write 5 bullet points" in response["user"]


@pytest.mark.parametrize("path", POST_PATHS)
async def test_empty_body_names_expected_object(fake_gemini, path):
    status, response = await post_asgi(path, [])

    assert status == 400
    assert response == error(
        f"The body is empty; send a JSON object, for example {example_for(path)}."
    )


# Bodies that are not objects, and unknown fields


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ("[1, 2]", "an array"),
        ("null", "null"),
        ('"text"', "a string"),
        ("3", "a number"),
    ],
)
@pytest.mark.parametrize("path", POST_PATHS)
async def test_non_object_body_names_expected_object(fake_gemini, path, raw, kind):
    response = await post(path, raw)

    assert response.status_code == 400
    assert response.json() == error(
        f"The body must be a JSON object, not {kind}; send for example "
        f"{example_for(path)}."
    )


async def test_non_object_websocket_frame_names_expected_object(fake_gemini):
    error_frame, check = await send_bad_frame("null")

    assert check["type"] == "done"
    assert error_frame == {
        "type": "error",
        "id": None,
        "error": {
            "code": "invalid_json",
            "message": "The frame must be a JSON object, not null; send for example "
            '{"type": "chat", "id": "1", "prompt": "Hi"}.',
        },
    }


@pytest.mark.parametrize(
    ("path", "required", "allowed"),
    [
        (
            "/chat",
            {"prompt": "Hi"},
            "cache, max_tokens, model, prompt, system, temperature, top_k, top_p",
        ),
        (
            "/prompts/summarizer/chat",
            {"variables": {"text": "a"}},
            "cache, max_tokens, model, temperature, top_k, top_p, variables, version",
        ),
        (
            "/prompts/summarizer/render",
            {"variables": {"text": "a"}},
            "variables, version",
        ),
    ],
)
async def test_many_unknown_fields_are_capped(fake_gemini, path, required, allowed):
    unknown = {f"x{index:05d}": 1 for index in range(60_000)}

    response = await post(path, json.dumps({**required, **unknown}))

    assert response.status_code == 400
    assert response.json() == error(
        "x00000, x00001, x00002, x00003, x00004, x00005, x00006, x00007, x00008, "
        f"x00009 and 59990 more are not known fields; allowed fields: {allowed}.",
        code="invalid_field",
        field="x00000",
    )


# Errors Django raises before any view


@pytest.mark.parametrize("path", ["/chat", "/prompts", "/health", "/docs"])
def test_disallowed_host_is_400_in_error_shape(path):
    response = Client().get(
        path, HTTP_HOST="evil.example", headers={"X-Request-ID": REQUEST_ID}
    )

    assert response.status_code == 400
    assert response.json() == error(
        "The Host header 'evil.example' is not in the gateway's ALLOWED_HOSTS: "
        "send the host name the gateway is served under, or add this host to "
        "ALLOWED_HOSTS.",
        code="invalid_host",
    )


def test_disallowed_host_on_admin_keeps_django_page():
    response = Client().get("/admin/", HTTP_HOST="evil.example")

    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/html")


# Documentation and probes


def test_docs_options_is_json():
    response = Client().options("/docs")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json()["renders"] == ["text/html"]


@pytest.mark.parametrize("path", ["/docs", "/schema"])
@pytest.mark.parametrize("method", ["post", "put", "delete", "patch"])
def test_docs_and_schema_reject_writes_with_json_405(path, method):
    response = getattr(Client(), method)(path, headers={"X-Request-ID": REQUEST_ID})

    assert response.status_code == 405
    assert response["Content-Type"] == "application/json"
    assert response.json() == error(
        f"{method.upper()} is not allowed on {path}; use GET.",
        code="method_not_allowed",
    )


def test_schema_unsupported_accept_is_json_406():
    response = Client().get(
        "/schema", headers={"Accept": "text/html", "X-Request-ID": REQUEST_ID}
    )

    assert response.status_code == 406
    assert response["Content-Type"] == "application/json"
    assert response.json() == error(
        "Could not satisfy the request Accept header.", code="not_acceptable"
    )


@pytest.mark.parametrize("path", ["/docs", "/schema"])
def test_docs_and_schema_still_serve_documents(path):
    response = Client().get(path)

    assert response.status_code == 200
    assert not response["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("path", ["/health", "/ready", "/docs", "/schema"])
def test_head_is_allowed(path):
    response = Client().head(path)

    assert response.status_code == 200
    assert response.content == b""


def test_render_schema_documents_413_and_415():
    document = Client().get("/schema?format=json").json()

    responses = document["paths"]["/prompts/{name}/render"]["post"]["responses"]
    assert "413" in responses
    assert "charset" in responses["415"]["description"]


def test_drf_view_405_names_allowed_method():
    response = Client().get(
        "/prompts/summarizer/render",
        headers={**with_api_key(), "X-Request-ID": REQUEST_ID},
    )

    assert response.status_code == 405
    assert response.json() == error(
        "GET is not allowed on /prompts/summarizer/render; use POST.",
        code="method_not_allowed",
    )


# The DRF parser for request.data


def test_json_body_parser_applies_the_same_rules():
    parser = JSONBodyParser()

    parsed = parser.parse(io.BytesIO(b'\xef\xbb\xbf{"a": [1, "\xc3\xa9"]}'))

    assert parsed == {"a": [1, "é"]}


@pytest.mark.parametrize(
    ("raw", "media_type", "expected"),
    [
        (b'{"a": NaN}', None, "The body is not valid JSON (NaN is not a JSON value)"),
        (b"[" * 200 + b"]" * 200, None, "The body nests arrays or objects more"),
        (b'{"a": "\\u0000"}', None, "a contains a NUL character at position 0"),
        (b"{}", "application/json; charset=utf-16", "The charset 'utf-16' is not"),
    ],
    ids=["nan", "deep", "nul", "charset"],
)
def test_json_body_parser_rejects_bad_input(raw, media_type, expected):
    parser = JSONBodyParser()

    with pytest.raises(Exception) as raised:
        parser.parse(io.BytesIO(raw), media_type)

    assert str(raised.value.detail).startswith(expected)


@pytest.mark.parametrize(
    "path",
    [
        "/prompts/a%00b",
        "/prompts/a%00b/render",
        "/prompts/a%00b/chat",
        "/prompts/Upper",
        "/prompts/" + "n" * 101,
    ],
)
def test_impossible_prompt_name_is_404(path):
    response = Client().post(path, data="{}", content_type="application/json")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_long_echoed_value_is_shortened_in_the_middle():
    model = "m" * 10_000

    response = Client().post(
        "/chat",
        data={"prompt": "hi", "model": model},
        content_type="application/json",
        headers=with_api_key(),
    )

    message = response.json()["error"]["message"]
    assert response.status_code == 400
    assert len(message) <= 1000
    assert message.startswith("model 'mmm")
    assert " ... " in message
    assert message.endswith("smollm2-135m-instruct.")
