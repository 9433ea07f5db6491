import pytest
from channels.db import database_sync_to_async

from prompts_registry.models import Prompt
from prompts_registry.services import prompt_activate, prompts_sync
from tests.chat_support import Event, expected_error, post_json, read_events

# Every request authenticates with a gateway API key, as clients must.
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("gateway_key"),
]

GREETING_V1 = """\
name: greeting
version: 1
description: Greets someone.
template: "Say hello to {{ who }}."
variables:
  who: {type: string}
"""
GREETING_V2 = """\
name: greeting
version: 2
description: Greets someone warmly.
template: "Say a warm hello to {{ who }}."
system: Answer in one sentence.
parameters: {temperature: 0.3, max_tokens: 64}
variables:
  who: {type: string}
"""
LONG_V1 = """\
name: long
version: 1
description: Asks for more tokens than the default model allows.
template: "Write at length."
model: gemini-other
parameters: {max_tokens: 9000}
"""
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


@pytest.fixture
def prompts(tmp_path, settings):
    """The prompts "greeting" (version 2 of 2 active) and "long"."""
    settings.LLM_MODELS = {
        **settings.LLM_MODELS,
        "gemini-other": {"provider": "gemini", "max_tokens": 8192},
    }
    for name, files in {
        "greeting": {"v1.yaml": GREETING_V1, "v2.yaml": GREETING_V2},
        "long": {"v1.yaml": LONG_V1},
    }.items():
        folder = tmp_path / name
        folder.mkdir()
        for file_name, text in files.items():
            (folder / file_name).write_text(text)
    prompts_sync(root=tmp_path)


@database_sync_to_async
def activate(name: str, version: int) -> None:
    prompt = Prompt.objects.get(name=name)
    prompt_activate(prompt=prompt, version=prompt.versions.get(version=version))


def error(field: str | None, message: str, code: str = "invalid_field") -> dict:
    return expected_error(field, message, code=code, request_id="p1")


async def test_prompt_chat_uses_active_version(fake_gemini, prompts):
    response = await post_json(
        "/prompts/greeting/chat", {"variables": {"who": "Ada"}}, x_request_id="p1"
    )

    assert response.status_code == 200
    assert response["X-Cache"] == "miss"
    body = response.json()
    assert isinstance(body.pop("latency"), float)
    assert body == {
        "response": "Hello from the fake",
        "model": "gemini-3.5-flash",
        "cached": False,
        "finish_reason": "stop",
        "usage": USAGE,
        "prompt": "greeting",
        "version": 2,
        "request_id": "p1",
    }
    call = fake_gemini.calls[0]
    assert call.body["contents"][0]["parts"] == [{"text": "Say a warm hello to Ada."}]
    assert call.body["systemInstruction"]["parts"] == [
        {"text": "Answer in one sentence."}
    ]
    assert call.body["generationConfig"] == {"temperature": 0.3, "maxOutputTokens": 64}


async def test_prompt_chat_explicit_version(fake_gemini, prompts):
    response = await post_json(
        "/prompts/greeting/chat", {"variables": {"who": "Ada"}, "version": 1}
    )

    assert response.status_code == 200
    assert response.json()["version"] == 1
    call = fake_gemini.calls[0]
    assert call.body["contents"][0]["parts"] == [{"text": "Say hello to Ada."}]
    assert "systemInstruction" not in call.body
    assert call.body["generationConfig"] == {}


async def test_prompt_chat_overrides_win(fake_gemini, prompts):
    response = await post_json(
        "/prompts/greeting/chat",
        {
            "variables": {"who": "Ada"},
            "temperature": 0.9,
            "max_tokens": 20,
            "top_p": 0.5,
            "top_k": 3,
            "model": "gemini-other",
        },
    )

    assert response.status_code == 200
    assert response.json()["model"] == "gemini-other"
    call = fake_gemini.calls[0]
    assert call.model == "gemini-other"
    assert call.body["generationConfig"] == {
        "temperature": 0.9,
        "maxOutputTokens": 20,
        "topP": 0.5,
        "topK": 3,
    }


async def test_prompt_chat_follows_activation(fake_gemini, prompts):
    first = await post_json("/prompts/greeting/chat", {"variables": {"who": "Ada"}})
    await activate("greeting", 1)

    second = await post_json("/prompts/greeting/chat", {"variables": {"who": "Ada"}})

    assert first.json()["version"] == 2
    assert second.json()["version"] == 1
    # The rendered text differs, so the cached version 2 answer is not reused.
    assert second["X-Cache"] == "miss"
    assert fake_gemini.call_count == 2


async def test_prompt_chat_repeat_is_cached(fake_gemini, prompts):
    await post_json("/prompts/greeting/chat", {"variables": {"who": "Ada"}})

    response = await post_json("/prompts/greeting/chat", {"variables": {"who": "Ada"}})

    assert response["X-Cache"] == "hit-l1"
    assert response.json()["cached"] is True
    assert response.json()["version"] == 2
    assert fake_gemini.call_count == 1


async def test_prompt_chat_cache_false_bypasses(fake_gemini, prompts):
    await post_json("/prompts/greeting/chat", {"variables": {"who": "Ada"}})

    response = await post_json(
        "/prompts/greeting/chat", {"variables": {"who": "Ada"}, "cache": False}
    )

    assert response["X-Cache"] == "bypass"
    assert fake_gemini.call_count == 2


async def test_prompt_chat_stream(fake_gemini, prompts):
    response = await post_json(
        "/prompts/greeting/chat/stream",
        {"variables": {"who": "Ada"}},
        x_request_id="p1",
    )

    assert response.status_code == 200
    assert response["X-Cache"] == "miss"
    events = await read_events(response)
    assert events[:-1] == [
        Event("message", {"text": "Hello"}),
        Event("message", {"text": " from"}),
        Event("message", {"text": " the fake"}),
    ]
    done = dict(events[-1].data)
    assert isinstance(done.pop("latency"), float)
    assert events[-1].name == "done"
    assert done == {
        "model": "gemini-3.5-flash",
        "finish_reason": "stop",
        "usage": USAGE,
        "cached": False,
        "prompt": "greeting",
        "version": 2,
        "request_id": "p1",
    }


async def test_unknown_prompt_returns_404(fake_gemini, prompts):
    response = await post_json("/prompts/nope/chat", {}, x_request_id="p1")

    assert response.status_code == 404
    assert response.json() == error(
        None,
        "Prompt 'nope' was not found: GET /prompts lists the prompts.",
        code="not_found",
    )


async def test_unknown_version_returns_404(fake_gemini, prompts):
    response = await post_json(
        "/prompts/greeting/chat/stream",
        {"variables": {"who": "Ada"}, "version": 7},
        x_request_id="p1",
    )

    assert response.status_code == 404
    assert response.json() == error(
        "version",
        "Prompt 'greeting' has no version 7: its versions are 2, 1.",
        code="not_found",
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {},
            error(
                "variables.who",
                "variables.who is missing: the prompt greeting v2 requires it.",
            ),
        ),
        (
            {"variables": {"who": 3}},
            error("variables.who", "variables.who must be a string, got integer."),
        ),
        (
            {"variables": ["Ada"]},
            error("variables", "variables: Must be a JSON object, not an array."),
        ),
        (
            {"variables": {"who": "Ada"}, "version": 0},
            error("version", "version: Must be at least 1."),
        ),
        (
            {"variables": {"who": "Ada"}, "prompt": "Hi"},
            error(
                "prompt",
                "prompt is not a known field; allowed fields: cache, max_tokens, "
                "model, temperature, top_k, top_p, variables, version.",
            ),
        ),
        (
            {"variables": {"who": "Ada"}, "temperature": "hot"},
            error("temperature", "temperature: Must be a number, not a string."),
        ),
        (
            {"variables": {"who": "Ada"}, "model": "gpt-4"},
            error(
                "model",
                "model 'gpt-4' is not served: use one of gemini-3.5-flash, "
                "smollm2-135m-instruct, gemini-other.",
            ),
        ),
        (
            {
                "variables": {"who": "Ada"},
                "model": "smollm2-135m-instruct",
                "max_tokens": 600,
            },
            error(
                "max_tokens",
                "max_tokens: Must be at most 512 for model smollm2-135m-instruct. "
                "The value comes from the request; send a smaller max_tokens.",
            ),
        ),
    ],
)
async def test_invalid_prompt_chat_returns_400(fake_gemini, prompts, body, expected):
    response = await post_json("/prompts/greeting/chat", body, x_request_id="p1")

    assert response.status_code == 400
    assert response.json() == expected
    assert fake_gemini.call_count == 0


async def test_version_limit_above_model_returns_400(fake_gemini, prompts):
    response = await post_json("/prompts/long/chat", {}, x_request_id="p1")

    assert response.status_code == 400
    assert response.json() == error(
        "max_tokens",
        "max_tokens: Must be at most 8192 for model gemini-other. The value comes "
        "from the prompt version; send a smaller max_tokens.",
    )


async def test_request_fixes_version_limit(fake_gemini, prompts):
    response = await post_json("/prompts/long/chat", {"max_tokens": 100})

    assert response.status_code == 200
    assert fake_gemini.calls[0].model == "gemini-other"
    assert fake_gemini.calls[0].body["generationConfig"] == {"maxOutputTokens": 100}


async def test_unserved_version_model_names_prompt(fake_gemini, prompts, settings):
    settings.LLM_MODELS = {
        name: spec
        for name, spec in settings.LLM_MODELS.items()
        if name != "gemini-other"
    }

    response = await post_json(
        "/prompts/long/chat", {"max_tokens": 100}, x_request_id="p1"
    )

    assert response.status_code == 400
    assert response.json() == error(
        "model",
        "Prompt long v1 names model 'gemini-other', which this gateway does not "
        "serve: send a model override (gemini-3.5-flash, smollm2-135m-instruct), "
        "or serve that model through LLM_MODELS.",
    )
    assert fake_gemini.call_count == 0


async def test_model_override_replaces_unserved_model(fake_gemini, prompts, settings):
    settings.LLM_MODELS = {
        name: spec
        for name, spec in settings.LLM_MODELS.items()
        if name != "gemini-other"
    }

    response = await post_json(
        "/prompts/long/chat", {"max_tokens": 100, "model": "gemini-3.5-flash"}
    )

    assert response.status_code == 200
    assert fake_gemini.calls[0].model == "gemini-3.5-flash"
