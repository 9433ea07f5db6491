"""The served models and the provider behind each, from settings.LLM_MODELS."""

import functools

from django.conf import settings

from gateway_project.errors import InvalidField
from llm.providers.base import Provider


def served_models() -> list[str]:
    return list(settings.LLM_MODELS)


def resolve_model(model: str | None) -> str:
    """Return the requested model, or DEFAULT_MODEL when the request names none.

    Raises InvalidField on ``model`` when the model is not served.
    """
    if model is None:
        return settings.DEFAULT_MODEL
    if model not in settings.LLM_MODELS:
        raise InvalidField(
            f"model {model!r} is not served: use one of {', '.join(served_models())}.",
            field="model",
        )
    return model


def provider_name(model: str) -> str:
    """Return "gemini" or "local" for a served model."""
    return settings.LLM_MODELS[resolve_model(model)]["provider"]


def model_max_tokens(model: str) -> int:
    """Return the largest max_tokens a request for ``model`` may ask for."""
    return settings.LLM_MODELS[resolve_model(model)]["max_tokens"]


def get_provider(model: str) -> Provider:
    """Return the provider that serves ``model``, one instance per process."""
    return _provider(provider_name(model))


@functools.cache
def _provider(name: str) -> Provider:
    # Imported here so that a process serving only Gemini never loads the
    # llama.cpp library, and the other way round.
    if name == "gemini":
        from llm.providers.gemini import GeminiProvider

        return GeminiProvider()
    from llm.providers.local import LocalProvider

    return LocalProvider()
