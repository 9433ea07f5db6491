"""Limits on what a prompt template may build while it renders."""

import io
import json
import logging

import pytest
from django.core.management import call_command
from django.test import Client

from gateway_project.errors import InvalidField
from llm.keys import api_key_create
from prompts_registry.selectors import prompt_render

pytestmark = pytest.mark.django_db

REQUEST_ID = "limits-test"

# Each prompt's template and its variables. The variables are untyped, so any
# JSON value reaches the template and only the template's limits stop it.
PROMPTS = {
    "power": ("{{ (a ** b) % 10 }}", ["a", "b"]),
    "repeat": ("{{ text * n }}", ["text", "n"]),
    "product": ("{{ a * b }}", ["a", "b"]),
    "listing": ("{{ items * n }}", ["items", "n"]),
    "loop": ("{% for i in range(n) %}{{ text }}{% endfor %}", ["text", "n"]),
    "folded": ("{{ 7 ** 99999999 }}", []),
    "reflect": ("{{ text | attr(field) }}", ["text", "field"]),
}


def prompt_file(name: str, template: str, variables: list[str]) -> str:
    text = (
        f"name: {name}\nversion: 1\ndescription: Limits of {name}.\n"
        f"template: {json.dumps(template)}\n"
    )
    if variables:
        text += "variables:\n" + "".join(f"  {variable}:\n" for variable in variables)
    return text


@pytest.fixture
def prompts(tmp_path, settings):
    settings.CHAT_MAX_PROMPT_CHARS = 1000
    settings.CHAT_MAX_SYSTEM_CHARS = 100
    for name, (template, variables) in PROMPTS.items():
        path = tmp_path / name / "v1.yaml"
        path.parent.mkdir()
        path.write_text(prompt_file(name, template, variables))
    call_command("sync_prompts", "--path", str(tmp_path), stdout=io.StringIO())


def render_error(name: str, **variables) -> InvalidField:
    with pytest.raises(InvalidField) as raised:
        prompt_render(name=name, variables=variables)
    return raised.value


def test_power_with_huge_exponent_is_rejected(prompts):
    error = render_error("power", a=7, b=30_000_000)

    assert error.field == "variables"
    assert str(error.detail) == (
        "Rendering the prompt power v1 failed with these variables: '**' would "
        "produce a number of 4300 digits or more. Check the variable values."
    )


def test_small_power_renders(prompts):
    rendered = prompt_render(name="power", variables={"a": 7, "b": 3})

    assert rendered.user == "3"


def test_repeated_string_over_limit_is_rejected(prompts):
    error = render_error("repeat", text="ab", n=500_000_000)

    assert error.field == "variables"
    assert str(error.detail) == (
        "Rendering the prompt repeat v1 failed with these variables: '*' would "
        "build a string of 1000000000 characters, more than the 1000 a prompt "
        "may have. Check the variable values."
    )


def test_repeated_string_within_limit_renders(prompts):
    rendered = prompt_render(name="repeat", variables={"text": "ab", "n": 500})

    assert rendered.user == "ab" * 500


def test_repeated_list_counts_printed_size(prompts):
    # Two list items are cheap, but each prints as its whole text.
    error = render_error("listing", items=["x" * 100, "y"], n=10)

    assert str(error.detail) == (
        "Rendering the prompt listing v1 failed with these variables: '*' would "
        "build an array of 1090 characters, more than the 1000 a prompt may "
        "have. Check the variable values."
    )


def test_integer_product_over_limit_is_rejected(prompts):
    error = render_error("product", a=10**3000, b=10**3000)

    assert str(error.detail) == (
        "Rendering the prompt product v1 failed with these variables: '*' would "
        "produce a number of 4300 digits or more. Check the variable values."
    )


def test_loop_output_stops_at_limit(prompts):
    error = render_error("loop", text="x" * 1000, n=100_000)

    assert error.field == "variables"
    assert str(error.detail) == (
        "The rendered prompt loop v1 has more than CHAT_MAX_PROMPT_CHARS (1000) "
        "characters: shorten the variables."
    )


def test_range_over_sandbox_limit_has_one_period(prompts):
    error = render_error("loop", text="x", n=1_000_000)

    assert str(error.detail) == (
        "Rendering the prompt loop v1 failed with these variables: Range too big. "
        "The sandbox blocks ranges larger than MAX_RANGE (100000). Check the "
        "variable values."
    )


def test_constant_power_is_not_computed_at_sync(prompts):
    # Jinja2 would fold the constant power while compiling, in sync_prompts.
    error = render_error("folded")

    assert "'**' would produce a number of 4300 digits or more" in str(error.detail)


def test_sandbox_violation_is_prompt_invalid(prompts, caplog):
    _, raw_key = api_key_create(name="limits tests")
    client = Client(
        headers={"X-Request-ID": REQUEST_ID, "Authorization": f"Bearer {raw_key}"}
    )
    body = {"variables": {"text": "a", "field": "__class__"}}

    with caplog.at_level(logging.ERROR, logger="prompts_registry.selectors"):
        response = client.post(
            "/prompts/reflect/render",
            data=json.dumps(body),
            content_type="application/json",
        )

    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "code": "prompt_invalid",
            "message": "The prompt reflect v1 uses something the template sandbox "
            "blocks, so it cannot render. An operator must fix the prompt file and "
            "sync a new version, or activate another version.",
        },
        "request_id": REQUEST_ID,
    }
    records = [r for r in caplog.records if r.name == "prompts_registry.selectors"]
    assert [record.levelno for record in records] == [logging.ERROR]
    assert records[0].getMessage() == (
        "Prompt reflect v1 failed the template sandbox: access to attribute "
        "'__class__' of 'str' object is unsafe."
    )
