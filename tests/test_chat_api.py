import pytest
from django.test import AsyncClient

from tests.chat_support import expected_error, post_json, with_api_key
from tests.fake_gemini import Reply

# Every request authenticates with a gateway API key, as clients must.
pytestmark = pytest.mark.usefixtures("gateway_key")


async def test_chat_returns_whole_body(fake_gemini):
    response = await post_json("/chat", {"prompt": "Say hello."}, x_request_id="c1")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["X-Cache"] == "miss"
    assert response["X-Request-ID"] == "c1"
    body = response.json()
    assert isinstance(body.pop("latency"), float)
    assert body == {
        "response": "Hello from the fake",
        "model": "gemini-3.5-flash",
        "cached": False,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        "request_id": "c1",
    }


async def test_chat_sends_parameters_upstream(fake_gemini):
    body = {
        "prompt": "Name a colour.",
        "system": "Answer in one word.",
        "temperature": 0.25,
        "max_tokens": 50,
        "top_p": 0.5,
        "top_k": 7,
    }

    response = await post_json("/chat", body)

    assert response.status_code == 200
    call = fake_gemini.calls[0]
    assert call.model == "gemini-3.5-flash"
    assert call.stream is False
    assert call.body["contents"] == [
        {"parts": [{"text": "Name a colour."}], "role": "user"}
    ]
    assert call.body["systemInstruction"]["parts"] == [{"text": "Answer in one word."}]
    assert call.body["generationConfig"] == {
        "temperature": 0.25,
        "maxOutputTokens": 50,
        "topP": 0.5,
        "topK": 7,
    }


async def test_truncated_answer_reports_length(fake_gemini):
    fake_gemini.enqueue(Reply(finish_reason="MAX_TOKENS"))

    response = await post_json("/chat", {"prompt": "Tell a long story."})

    assert response.status_code == 200
    assert response.json()["finish_reason"] == "length"


async def test_chat_is_csrf_exempt(fake_gemini):
    client = AsyncClient(enforce_csrf_checks=True)

    response = await client.post(
        "/chat",
        data={"prompt": "Hi"},
        content_type="application/json",
        headers=with_api_key(),
    )

    assert response.status_code == 200


@pytest.mark.parametrize(
    ("reply", "status", "code"),
    [
        (Reply(status=503), 503, "upstream_unavailable"),
        (Reply(status=500), 503, "upstream_unavailable"),
        (Reply(status=401), 502, "upstream_auth_failed"),
        (Reply(status=403), 502, "upstream_auth_failed"),
        (Reply(status=404), 502, "upstream_error"),
        (Reply(block_reason="SAFETY"), 422, "content_blocked"),
        (Reply(chunks=[], finish_reason="SAFETY"), 422, "content_blocked"),
        (Reply(drop_connection=True), 503, "upstream_unavailable"),
    ],
    ids=[
        "503",
        "500",
        "401",
        "403",
        "404",
        "prompt-blocked",
        "answer-withheld",
        "dropped",
    ],
)
async def test_upstream_error_maps_to_status(fake_gemini, reply, status, code):
    # Every attempt, retries included, gets the same reply.
    fake_gemini.default_reply = reply

    response = await post_json("/chat", {"prompt": "Hi"}, x_request_id="e1")

    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error", "request_id"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["request_id"] == "e1"
    assert "Retry-After" not in response


async def test_rate_limit_sets_retry_after(fake_gemini):
    fake_gemini.default_reply = Reply(status=429, retry_after=30)

    response = await post_json("/chat", {"prompt": "Hi"}, x_request_id="e2")

    assert response.status_code == 429
    assert response["Retry-After"] == "30"
    assert response.json() == {
        "error": {
            "code": "upstream_rate_limited",
            "message": "Gemini is rate limiting the gateway (429 RESOURCE_EXHAUSTED); "
            "retry later.",
        },
        "request_id": "e2",
    }


async def test_upstream_timeout_returns_504(fake_gemini, settings):
    settings.GEMINI_TIMEOUT_SECONDS = 0.2
    fake_gemini.default_reply = Reply(delay=2.0)

    response = await post_json("/chat", {"prompt": "Hi"})

    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


async def test_auth_failure_hides_the_key(fake_gemini, settings):
    fake_gemini.default_reply = Reply(status=401)

    response = await post_json("/chat", {"prompt": "Hi"})

    assert response.status_code == 502
    assert settings.GEMINI_API_KEY not in response.content.decode()


def error(field: str | None, message: str, code: str = "invalid_field") -> dict:
    return expected_error(field, message, code=code, request_id="v1")


VALIDATION_CASES = [
    ({}, error("prompt", "prompt: This field is required.")),
    (
        {"prompt": ""},
        error("prompt", "prompt: Must not be empty; send the text for the model."),
    ),
    (
        {"prompt": " \n "},
        error("prompt", "prompt: Must not be empty; send the text for the model."),
    ),
    ({"prompt": 5}, error("prompt", "prompt: Must be a string, not a number.")),
    ({"prompt": None}, error("prompt", "prompt: This field may not be null.")),
    (
        {"prompt": "x" * 33},
        error("prompt", "prompt: Must be at most 32 characters; this one has 33."),
    ),
    (
        {"prompt": "Hi", "system": "s" * 17},
        error("system", "system: Must be at most 16 characters; this one has 17."),
    ),
    (
        {"prompt": "Hi", "system": ["a"]},
        error("system", "system: Must be a string, not an array."),
    ),
    (
        {"prompt": "Hi", "temperature": "0.5"},
        error("temperature", "temperature: Must be a number, not a string."),
    ),
    (
        {"prompt": "Hi", "temperature": True},
        error("temperature", "temperature: Must be a number, not a boolean."),
    ),
    (
        {"prompt": "Hi", "temperature": 2.5},
        error("temperature", "temperature: Must be from 0 to 2."),
    ),
    (
        {"prompt": "Hi", "temperature": -0.1},
        error("temperature", "temperature: Must be from 0 to 2."),
    ),
    (
        {"prompt": "Hi", "max_tokens": 0},
        error("max_tokens", "max_tokens: Must be at least 1."),
    ),
    (
        {"prompt": "Hi", "max_tokens": 1.5},
        error("max_tokens", "max_tokens: Must be a whole number, not a fraction."),
    ),
    (
        {"prompt": "Hi", "max_tokens": "100"},
        error("max_tokens", "max_tokens: Must be a whole number, not a string."),
    ),
    (
        {"prompt": "Hi", "max_tokens": 8193},
        error(
            "max_tokens",
            "max_tokens: Must be at most 8192 for model gemini-3.5-flash.",
        ),
    ),
    (
        {"prompt": "Hi", "model": "smollm2-135m-instruct", "max_tokens": 513},
        error(
            "max_tokens",
            "max_tokens: Must be at most 512 for model smollm2-135m-instruct.",
        ),
    ),
    (
        {"prompt": "Hi", "top_p": 1.5},
        error("top_p", "top_p: Must be from 0 to 1."),
    ),
    (
        {"prompt": "Hi", "top_k": 0},
        error("top_k", "top_k: Must be at least 1."),
    ),
    (
        {"prompt": "Hi", "top_k": False},
        error("top_k", "top_k: Must be a whole number, not a boolean."),
    ),
    (
        {"prompt": "Hi", "model": "gpt-4"},
        error(
            "model",
            "model 'gpt-4' is not served: use one of gemini-3.5-flash, "
            "smollm2-135m-instruct.",
        ),
    ),
    (
        {"prompt": "Hi", "model": 4},
        error("model", "model: Must be a string, not a number."),
    ),
    (
        {"prompt": "Hi", "cache": "false"},
        error("cache", "cache: Must be true or false, not a string."),
    ),
    (
        {"prompt": "Hi", "temprature": 1},
        error(
            "temprature",
            "temprature is not a known field; allowed fields: cache, max_tokens, "
            "model, prompt, system, temperature, top_k, top_p.",
        ),
    ),
    (
        {"prompt": "Hi", "stream": True, "n": 2},
        error(
            "n",
            "n, stream are not known fields; allowed fields: cache, max_tokens, "
            "model, prompt, system, temperature, top_k, top_p.",
        ),
    ),
]


@pytest.mark.parametrize(("body", "expected"), VALIDATION_CASES)
async def test_invalid_body_returns_400(fake_gemini, settings, body, expected):
    settings.CHAT_MAX_PROMPT_CHARS = 32
    settings.CHAT_MAX_SYSTEM_CHARS = 16

    response = await post_json("/chat", body, x_request_id="v1")

    assert response.status_code == 400
    assert response.json() == expected
    assert fake_gemini.call_count == 0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            "{not json",
            "The body is not valid JSON (Expecting property name enclosed in double "
            "quotes: line 1 column 2 (char 1)); send a JSON object.",
        ),
        (
            '{"prompt": "Hi", "temperature": NaN}',
            "The body is not valid JSON (NaN is not a JSON value); send a JSON object.",
        ),
        (
            '["Hi"]',
            "The body must be a JSON object, not an array; send for example "
            '{"prompt": "Hello"}.',
        ),
        (
            " ",
            "The body is not valid JSON (Expecting value: line 1 column 2 (char 1)); "
            "send a JSON object.",
        ),
    ],
    ids=["syntax", "nan", "array", "blank"],
)
async def test_invalid_json_returns_400(fake_gemini, raw, message):
    response = await post_json("/chat", raw, x_request_id="v1")

    assert response.status_code == 400
    assert response.json() == error(None, message, code="invalid_json")


async def test_wrong_content_type_returns_415(fake_gemini):
    response = await AsyncClient().post(
        "/chat",
        data="prompt=Hi",
        content_type="application/x-www-form-urlencoded",
        headers=with_api_key({"X-Request-ID": "v1"}),
    )

    assert response.status_code == 415
    assert response.json() == error(
        None,
        "Content-Type must be application/json; send the body as JSON.",
        code="unsupported_media_type",
    )


async def test_json_with_charset_is_accepted(fake_gemini):
    response = await AsyncClient().post(
        "/chat",
        data='{"prompt": "Hi"}',
        content_type="application/json; charset=utf-8",
        headers=with_api_key(),
    )

    assert response.status_code == 200


@pytest.mark.parametrize("path", ["/chat", "/chat/stream"])
async def test_get_returns_405(path):
    response = await AsyncClient().get(path, headers={"X-Request-ID": "v1"})

    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert response.json() == error(
        None,
        f"GET is not allowed on {path}; use POST.",
        code="method_not_allowed",
    )


async def test_oversized_body_returns_413(fake_gemini, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024

    response = await post_json("/chat", {"prompt": "x" * 2000}, x_request_id="v1")

    assert response.status_code == 413
    assert response.json() == error(
        None,
        "The request body is larger than 1024 bytes (MAX_REQUEST_BYTES); send a "
        "smaller body.",
        code="request_too_large",
    )


@pytest.mark.django_db
async def test_local_model_generates_text():
    response = await post_json(
        "/chat",
        {
            "prompt": "What is the capital of France?",
            "model": "smollm2-135m-instruct",
            "max_tokens": 8,
            "temperature": 0,
        },
    )

    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "smollm2-135m-instruct"
    assert body["response"].strip()
    assert body["finish_reason"] in ("stop", "length")
    assert 0 < body["usage"]["completion_tokens"] <= 8
    assert body["usage"]["prompt_tokens"] > 0
