"""Validation of chat request bodies, shared by the REST views and the websocket.

JSON types are checked strictly. A string "0.5" or a boolean is not a number,
and a number is not a string, so a client bug surfaces as a 400 naming the
field instead of a silently converted value.
"""

import math
from typing import Any

from django.conf import settings
from rest_framework import serializers

from gateway_project.errors import InvalidField
from gateway_project.json_body import json_type_name, unknown_fields_message
from llm.providers import model_max_tokens, resolve_model
from llm.providers.base import GenerationRequest

# Generation parameters a prompt chat may override, besides "cache".
GENERATION_OPTIONS = ("model", "temperature", "max_tokens", "top_p", "top_k")
# A registry prompt's request body, quoted in the error for a body that is
# not a JSON object.
PROMPT_BODY_EXAMPLE = '{"variables": {...}}'


class StrictFloatField(serializers.FloatField):
    """A JSON number; strings and booleans are rejected, not converted."""

    default_error_messages = {"wrong_type": "Must be a number, not {kind}."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("wrong_type", kind=json_type_name(data))
        if not math.isfinite(data):
            self.fail("invalid")
        return float(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON whole number; strings, booleans and fractions are rejected."""

    default_error_messages = {"wrong_type": "Must be a whole number, not {kind}."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            kind = "a fraction" if isinstance(data, float) else json_type_name(data)
            self.fail("wrong_type", kind=kind)
        return data


class StrictBooleanField(serializers.BooleanField):
    """A JSON true or false; "true", 1 and other look-alikes are rejected."""

    default_error_messages = {"wrong_type": "Must be true or false, not {kind}."}

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("wrong_type", kind=json_type_name(data))
        return data


class StrictCharField(serializers.CharField):
    """A JSON string, kept exactly as sent: no conversion and no trimming."""

    default_error_messages = {"wrong_type": "Must be a string, not {kind}."}

    def __init__(self, **kwargs):
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("wrong_type", kind=json_type_name(data))
        return data


def _optional_float(minimum: float, maximum: float) -> StrictFloatField:
    message = f"Must be from {minimum} to {maximum}."
    return StrictFloatField(
        required=False,
        allow_null=True,
        min_value=minimum,
        max_value=maximum,
        error_messages={"min_value": message, "max_value": message},
    )


def _optional_integer(minimum: int) -> StrictIntegerField:
    return StrictIntegerField(
        required=False,
        allow_null=True,
        min_value=minimum,
        error_messages={"min_value": f"Must be at least {minimum}."},
    )


class _GenerationOptionsSerializer(serializers.Serializer):
    """Options every chat body may carry; rejects fields it does not declare."""

    model = StrictCharField(required=False, allow_null=True)
    temperature = _optional_float(0, 2)
    max_tokens = _optional_integer(1)
    top_p = _optional_float(0, 1)
    top_k = _optional_integer(1)
    cache = StrictBooleanField(required=False, allow_null=True)

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(str(name) for name in data if name not in self.fields)
            if unknown:
                message = unknown_fields_message(unknown, list(self.fields))
                raise serializers.ValidationError({unknown[0]: [message]})
        return super().to_internal_value(data)

    def validate_model(self, value: str | None) -> str | None:
        if value is None:
            return None
        return _served_model(value)

    @property
    def use_cache(self) -> bool:
        """False only when the body sent "cache": false."""
        return self.validated_data.get("cache") is not False


def _served_model(name: str | None) -> str:
    try:
        return resolve_model(name)
    except InvalidField as error:
        raise serializers.ValidationError(str(error.detail)) from None


def max_tokens_problem(max_tokens: int | None, model: str) -> str | None:
    """Return why ``max_tokens`` does not fit ``model``, or None when it fits."""
    limit = model_max_tokens(model)
    if max_tokens is not None and max_tokens > limit:
        return f"Must be at most {limit} for model {model}."
    return None


class ChatRequestSerializer(_GenerationOptionsSerializer):
    """Body of POST /chat and /chat/stream and of websocket "chat" frames."""

    # Quoted in the error for a body that is not a JSON object.
    body_example = '{"prompt": "Hello"}'

    prompt = StrictCharField(
        error_messages={"blank": "Must not be empty; send the text for the model."}
    )
    system = StrictCharField(required=False, allow_null=True, allow_blank=True)

    def validate_prompt(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError(
                "Must not be empty; send the text for the model."
            )
        limit = settings.CHAT_MAX_PROMPT_CHARS
        if len(value) > limit:
            raise serializers.ValidationError(
                f"Must be at most {limit} characters; this one has {len(value)}."
            )
        return value

    def validate_system(self, value: str | None) -> str | None:
        # A blank system instruction is the same as none, so both share a
        # cache entry.
        if value is None or not value.strip():
            return None
        limit = settings.CHAT_MAX_SYSTEM_CHARS
        if len(value) > limit:
            raise serializers.ValidationError(
                f"Must be at most {limit} characters; this one has {len(value)}."
            )
        return value

    def validate(self, attrs: dict) -> dict:
        attrs["model"] = attrs.get("model") or _served_model(None)
        problem = max_tokens_problem(attrs.get("max_tokens"), attrs["model"])
        if problem:
            raise serializers.ValidationError({"max_tokens": [problem]})
        return attrs

    def generation_request(self) -> GenerationRequest:
        data = self.validated_data
        return GenerationRequest(
            model=data["model"],
            prompt=data["prompt"],
            system=data.get("system"),
            temperature=data.get("temperature"),
            max_tokens=data.get("max_tokens"),
            top_p=data.get("top_p"),
            top_k=data.get("top_k"),
        )


class _VariablesField(serializers.Field):
    default_error_messages = {"wrong_type": "Must be a JSON object, not {kind}."}

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            self.fail("wrong_type", kind=json_type_name(data))
        return data

    def to_representation(self, value):
        return value


class PromptChatRequestSerializer(_GenerationOptionsSerializer):
    """Body of POST /prompts/<name>/chat and /chat/stream.

    The model and the parameters given here override the prompt version's own;
    whether max_tokens fits the model is checked once the version is known.
    """

    body_example = PROMPT_BODY_EXAMPLE

    variables = _VariablesField(required=False, default=dict)
    version = _optional_integer(1)

    @property
    def overrides(self) -> dict[str, Any]:
        """The generation options the body set, without nulls."""
        data = self.validated_data
        return {
            name: data[name]
            for name in GENERATION_OPTIONS
            if data.get(name) is not None
        }
