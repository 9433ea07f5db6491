"""The REST API of the prompt registry: list, detail and render."""

import io
import json

import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import Client
from rest_framework import serializers

from llm.keys import api_key_create, api_key_revoke
from prompts_registry.models import Prompt
from prompts_registry.selectors import RenderedPrompt, prompt_render
from prompts_registry.services import prompt_activate

pytestmark = pytest.mark.django_db

REQUEST_ID = "test-request"

REPORT_V1 = """\
name: report
version: 1
description: Write a short report.
template: "Report on {{ topic }}."
variables:
  topic:
"""

REPORT_V2 = """\
name: report
version: 2
description: Write a report with a length and a tone.
system: "Write in a {{ tone }} tone."
model: smollm2-135m-instruct
template: |
  Report on {{ topic }} in {{ words }} words.
  {% if urgent %}
  Mark it URGENT.
  {% endif %}
  Ratio: {{ ratio }}.
parameters:
  temperature: 0.2
  max_tokens: 100
variables:
  topic:
    type: string
    description: What to report on.
  words:
    type: integer
    default: 50
  urgent:
    type: boolean
    default: false
  ratio:
    type: number
    default: 0.5
  tone:
    default: neutral
"""


@pytest.fixture
def prompts(tmp_path):
    for name, version, text in [
        ("report", 1, REPORT_V1),
        ("report", 2, REPORT_V2),
    ]:
        path = tmp_path / name / f"v{version}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    call_command("sync_prompts", "--path", str(tmp_path), stdout=io.StringIO())
    call_command(
        "sync_prompts", "--path", str(settings.PROMPTS_DIR), stdout=io.StringIO()
    )


def client_with_key(**key_options) -> Client:
    _, raw_key = api_key_create(name="prompt tests", **key_options)
    return Client(
        headers={"X-Request-ID": REQUEST_ID, "Authorization": f"Bearer {raw_key}"}
    )


@pytest.fixture
def client():
    return client_with_key()


def render(client, name, body, **kwargs):
    return client.post(
        f"/prompts/{name}/render",
        data=json.dumps(body) if not isinstance(body, str) else body,
        content_type=kwargs.pop("content_type", "application/json"),
        **kwargs,
    )


def error(code, message, field=None):
    body = {"code": code, "message": message}
    if field:
        body["field"] = field
    return {"error": body, "request_id": REQUEST_ID}


def test_list_prompts(client, prompts):
    response = client.get("/prompts")

    assert response.status_code == 200
    listed = {item["name"]: item for item in response.json()["prompts"]}
    assert listed["report"] == {
        "name": "report",
        "description": "Write a report with a length and a tone.",
        "active_version": 2,
        "version_count": 2,
    }
    assert listed["summarizer"]["active_version"] == 2
    assert listed["summarizer"]["version_count"] == 2
    assert [item["name"] for item in response.json()["prompts"]] == sorted(listed)


def test_prompt_detail_lists_versions(client, prompts):
    prompt = Prompt.objects.get(name="report")
    versions = {row.version: row for row in prompt.versions.all()}
    timestamp = serializers.DateTimeField().to_representation

    response = client.get("/prompts/report")

    assert response.status_code == 200
    assert response.json() == {
        "name": "report",
        "description": "Write a report with a length and a tone.",
        "active_version": 2,
        "updated_at": timestamp(prompt.updated_at),
        "versions": [
            {
                "version": 2,
                "description": "Write a report with a length and a tone.",
                "model": "smollm2-135m-instruct",
                "parameters": {"temperature": 0.2, "max_tokens": 100},
                "variables": {
                    "topic": {"type": "string", "description": "What to report on."},
                    "words": {"type": "integer", "default": 50},
                    "urgent": {"type": "boolean", "default": False},
                    "ratio": {"type": "number", "default": 0.5},
                    "tone": {"default": "neutral"},
                },
                "created_at": timestamp(versions[2].created_at),
                "active": True,
            },
            {
                "version": 1,
                "description": "Write a short report.",
                "model": None,
                "parameters": {},
                "variables": {"topic": {}},
                "created_at": timestamp(versions[1].created_at),
                "active": False,
            },
        ],
    }


def test_detail_of_unknown_prompt_is_404(client, prompts):
    response = client.get("/prompts/nope")

    assert response.status_code == 404
    assert response.json() == error(
        "not_found", "Prompt 'nope' was not found: GET /prompts lists the prompts."
    )


def test_render_active_version_with_defaults(client, prompts):
    response = render(client, "report", {"variables": {"topic": "sales"}})

    assert response.status_code == 200
    assert response.json() == {
        "prompt": "report",
        "version": 2,
        "system": "Write in a neutral tone.",
        "user": "Report on sales in 50 words.\nRatio: 0.5.",
        "model": "smollm2-135m-instruct",
        "parameters": {"temperature": 0.2, "max_tokens": 100},
    }


def test_render_with_every_variable(client, prompts):
    variables = {
        "topic": "costs",
        "words": 20,
        "urgent": True,
        "ratio": 2,
        "tone": "formal",
    }

    response = render(client, "report", {"variables": variables})

    assert response.status_code == 200
    assert response.json()["user"] == (
        "Report on costs in 20 words.\nMark it URGENT.\nRatio: 2."
    )
    assert response.json()["system"] == "Write in a formal tone."


def test_render_older_version_uses_default_model(client, prompts):
    response = render(client, "report", {"variables": {"topic": "x"}, "version": 1})

    assert response.status_code == 200
    assert response.json() == {
        "prompt": "report",
        "version": 1,
        "system": None,
        "user": "Report on x.",
        "model": settings.DEFAULT_MODEL,
        "parameters": {},
    }


def test_render_keeps_literal_json_braces(client, prompts):
    response = render(client, "json_extractor", {"variables": {"text": "Hi, I'm Bo."}})

    assert response.status_code == 200
    assert response.json()["user"] == (
        "Extract these fields from the text: name, email, company.\n"
        "Use null for a field the text does not mention.\n"
        "Reply with JSON only. For example, for the fields name, email and company:\n"
        '{"name": "Ada Lovelace", "email": null, "company": {"name": '
        '"Analytical Engines"}}\n'
        "\n"
        "Text:\n"
        "Hi, I'm Bo."
    )


def test_render_does_not_evaluate_variable_values(client, prompts):
    text = "{{ 7 * 7 }} {% if true %}x{% endif %}"

    response = render(client, "json_extractor", {"variables": {"text": text}})

    assert response.status_code == 200
    assert response.json()["user"].endswith(f"Text:\n{text}")


def test_shipped_summarizer_v2_renders_focus_only_when_given(client, prompts):
    plain = render(client, "summarizer", {"variables": {"text": "T."}})
    focused = render(
        client, "summarizer", {"variables": {"text": "T.", "focus": "costs"}}
    )

    assert plain.json()["user"] == (
        "Summarize the text below in at most 100 words.\n"
        'Write 3 bullet points, each starting with "- ".\n'
        "\n"
        "Text:\n"
        '"""\n'
        "T.\n"
        '"""'
    )
    assert "Focus on costs.\n" in focused.json()["user"]
    assert plain.json()["model"] == settings.DEFAULT_MODEL


def test_render_reads_active_version_on_every_call(client, prompts):
    prompt = Prompt.objects.get(name="report")
    before = render(client, "report", {"variables": {"topic": "a"}})

    prompt_activate(prompt=prompt, version=prompt.versions.get(version=1), user=None)
    after = render(client, "report", {"variables": {"topic": "a"}})

    assert before.json()["version"] == 2
    assert after.json()["version"] == 1
    assert after.json()["user"] == "Report on a."


def test_prompt_render_returns_rendered_prompt(prompts):
    rendered = prompt_render(name="report", variables={"topic": "t"}, version=1)

    assert rendered == RenderedPrompt(
        name="report",
        version=1,
        system=None,
        user="Report on t.",
        model=None,
        parameters={},
    )


def test_render_unknown_prompt_is_404(client, prompts):
    response = render(client, "nope", {"variables": {}})

    assert response.status_code == 404
    assert response.json() == error(
        "not_found", "Prompt 'nope' was not found: GET /prompts lists the prompts."
    )


def test_render_unknown_version_is_404(client, prompts):
    response = render(client, "report", {"variables": {"topic": "a"}, "version": 9})

    assert response.status_code == 404
    assert response.json() == error(
        "not_found",
        "Prompt 'report' has no version 9: its versions are 2, 1.",
        "version",
    )


def test_render_missing_variable_is_400(client, prompts):
    response = render(client, "report", {"variables": {"words": 10}})

    assert response.status_code == 400
    assert response.json() == error(
        "invalid_field",
        "variables.topic is missing: the prompt report v2 requires it.",
        "variables.topic",
    )


def test_render_without_variables_field_is_400(client, prompts):
    response = render(client, "report", {})

    assert response.status_code == 400
    assert response.json()["error"]["field"] == "variables.topic"


def test_render_undeclared_variable_is_400(client, prompts):
    response = render(client, "report", {"variables": {"topic": "a", "color": 1}})

    assert response.status_code == 400
    assert response.json() == error(
        "invalid_field",
        "variables.color is not declared by the prompt report v2: its variables "
        "are ratio, tone, topic, urgent, words.",
        "variables.color",
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("words", "10", "must be an integer, got string"),
        ("words", 10.0, "must be an integer, got number"),
        ("words", True, "must be an integer, got boolean"),
        ("urgent", 1, "must be true or false, got integer"),
        ("ratio", "0.5", "must be a number, got string"),
        ("ratio", False, "must be a number, got boolean"),
        ("topic", 5, "must be a string, got integer"),
        ("topic", None, "must be a string, got null"),
        ("topic", ["a"], "must be a string, got array"),
    ],
)
def test_render_wrongly_typed_variable_is_400(client, prompts, name, value, message):
    variables = {"topic": "a", name: value}

    response = render(client, "report", {"variables": variables})

    assert response.status_code == 400
    assert response.json() == error(
        "invalid_field", f"variables.{name} {message}.", f"variables.{name}"
    )


def test_render_invalid_json_is_400(client, prompts):
    response = render(client, "report", '{"variables": ')

    assert response.status_code == 400
    assert response.json() == error(
        "invalid_json",
        "The body is not valid JSON (Expecting value: line 1 column 15 (char 14)); "
        "send a JSON object.",
    )


def test_render_unknown_field_is_400(client, prompts):
    response = render(
        client, "report", {"variables": {"topic": "a"}, "temprature": 0.5}
    )

    assert response.status_code == 400
    assert response.json() == error(
        "invalid_field",
        "temprature is not a known field; allowed fields: variables, version.",
        "temprature",
    )


@pytest.mark.parametrize("version", [0, -1, "2", 1.5, True, [1]])
def test_render_version_must_be_positive_integer(client, prompts, version):
    response = render(
        client, "report", {"variables": {"topic": "a"}, "version": version}
    )

    assert response.status_code == 400
    assert response.json() == error(
        "invalid_field", "version must be a positive integer.", "version"
    )


def test_render_null_version_means_active(client, prompts):
    response = render(client, "report", {"variables": {"topic": "a"}, "version": None})

    assert response.status_code == 200
    assert response.json()["version"] == 2


@pytest.mark.parametrize("variables", [["topic"], "topic", None])
def test_render_variables_must_be_object(client, prompts, variables):
    response = render(client, "report", {"variables": variables})

    assert response.status_code == 400
    assert response.json() == error(
        "invalid_field",
        "variables must be a JSON object of variable names and values.",
        "variables",
    )


def test_render_body_must_be_object(client, prompts):
    response = render(client, "report", [1, 2])

    assert response.status_code == 400
    assert response.json() == error(
        "invalid_json",
        "The body must be a JSON object, not an array; send for example "
        '{"variables": {...}}.',
    )


def test_render_wrong_content_type_is_415(client, prompts):
    response = render(
        client,
        "report",
        "variables=1",
        content_type="application/x-www-form-urlencoded",
    )

    assert response.status_code == 415
    assert response.json() == error(
        "unsupported_media_type",
        "Content-Type must be application/json; send the body as JSON.",
    )


def test_render_rejects_get(client, prompts):
    response = client.get("/prompts/report/render")

    assert response.status_code == 405
    assert response.json() == error(
        "method_not_allowed",
        "GET is not allowed on /prompts/report/render; use POST.",
    )


def test_render_over_prompt_limit_is_400(client, prompts, settings):
    settings.CHAT_MAX_PROMPT_CHARS = 20

    response = render(client, "report", {"variables": {"topic": "a" * 30}})

    assert response.status_code == 400
    assert response.json() == error(
        "invalid_field",
        "The rendered prompt report v2 has more than CHAT_MAX_PROMPT_CHARS (20) "
        "characters: shorten the variables.",
        "variables",
    )


def test_render_failure_in_template_is_400(client, tmp_path):
    path = tmp_path / "math" / "v1.yaml"
    path.parent.mkdir()
    path.write_text(
        "name: math\nversion: 1\ndescription: Add.\n"
        'template: "{{ a + 1 }}"\nvariables: {a: {}}\n'
    )
    call_command("sync_prompts", "--path", str(tmp_path), stdout=io.StringIO())

    response = render(client, "math", {"variables": {"a": "text"}})

    assert response.status_code == 400
    assert response.json() == error(
        "invalid_field",
        "Rendering the prompt math v1 failed with these variables: can only "
        'concatenate str (not "int") to str. Check the variable values.',
        "variables",
    )


def test_prompt_urls_have_no_trailing_slash(client, prompts):
    listed = client.get("/prompts/")
    rendered = client.post(
        "/prompts/report/render/",
        data={"variables": {"topic": "a"}},
        content_type="application/json",
    )

    assert listed.status_code == 404
    assert rendered.status_code == 404
    assert rendered.json() == error(
        "not_found", "No endpoint at /prompts/report/render/."
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/prompts"),
        ("get", "/prompts/report"),
        ("post", "/prompts/report/render"),
    ],
)
def test_prompt_api_requires_api_key(prompts, method, path):
    anonymous = Client(headers={"X-Request-ID": REQUEST_ID})

    response = getattr(anonymous, method)(path)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


def test_prompt_api_rejects_revoked_key(prompts):
    key, raw_key = api_key_create(name="old")
    api_key_revoke(key)
    revoked = Client(headers={"Authorization": f"Bearer {raw_key}"})

    response = render(revoked, "report", {"variables": {"topic": "a"}})

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "key_revoked"


def test_key_limited_to_prompts_sees_only_them(prompts):
    limited = client_with_key(allowed_prompts=["report"])

    listed = limited.get("/prompts")
    detail = limited.get("/prompts/summarizer")
    rendered = render(limited, "summarizer", {"variables": {"text": "a"}})
    allowed = render(limited, "report", {"variables": {"topic": "a"}})

    assert [item["name"] for item in listed.json()["prompts"]] == ["report"]
    assert detail.status_code == 403
    assert rendered.status_code == 403
    assert rendered.json()["error"]["code"] == "forbidden"
    assert allowed.status_code == 200
