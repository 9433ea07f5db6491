"""The model registry built from LLM_MODELS and DEFAULT_MODEL."""

import pytest

from gateway_project.errors import InvalidField
from llm.providers import (
    get_provider,
    model_max_tokens,
    provider_name,
    resolve_model,
    served_models,
)
from llm.providers.gemini import GeminiProvider


def test_served_models_follow_settings():
    assert served_models() == ["gemini-3.5-flash", "smollm2-135m-instruct"]


def test_resolve_model_defaults_to_default_model(settings):
    settings.DEFAULT_MODEL = "smollm2-135m-instruct"

    assert resolve_model(None) == "smollm2-135m-instruct"


def test_resolve_model_keeps_served_model():
    assert resolve_model("gemini-3.5-flash") == "gemini-3.5-flash"


def test_resolve_model_rejects_unknown_model():
    with pytest.raises(InvalidField) as raised:
        resolve_model("gpt-2")

    assert raised.value.field == "model"
    assert raised.value.status_code == 400
    assert str(raised.value) == (
        "model 'gpt-2' is not served: use one of gemini-3.5-flash, "
        "smollm2-135m-instruct."
    )


def test_model_limits_and_providers():
    assert model_max_tokens("gemini-3.5-flash") == 8192
    assert model_max_tokens("smollm2-135m-instruct") == 512
    assert provider_name("gemini-3.5-flash") == "gemini"
    assert provider_name("smollm2-135m-instruct") == "local"


def test_provider_name_rejects_unknown_model():
    with pytest.raises(InvalidField):
        provider_name("gpt-2")


def test_get_provider_returns_one_instance():
    first = get_provider("gemini-3.5-flash")

    second = get_provider("gemini-3.5-flash")

    assert isinstance(first, GeminiProvider)
    assert first is second
