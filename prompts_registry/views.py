from django.conf import settings
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway_project.json_body import json_object_body, unknown_fields_message
from llm.keys import api_key_check_prompt, api_key_from_header
from llm.serializers import PROMPT_BODY_EXAMPLE
from prompts_registry.selectors import (
    prompt_get,
    prompt_list,
    prompt_render,
    prompt_versions,
)


class StrictPositiveIntegerField(serializers.Field):
    """A JSON integer of at least 1. Unlike IntegerField, it rejects "2" and 2.0."""

    default_error_messages = {"invalid": "{field} must be a positive integer."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int) or data < 1:
            self.fail("invalid", field=self.field_name)
        return data

    def to_representation(self, value):
        return value


class GatewayKeyApiView(APIView):
    """An APIView that authenticates the gateway API key of every request.

    ``self.api_key`` is None only under GATEWAY_AUTH=off when no key is sent.
    A missing, invalid or revoked key is rejected with 401 before the body is
    parsed.
    """

    api_key = None

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        self.api_key = api_key_from_header(request.headers.get("Authorization"))

    def allowed_prompt_names(self) -> list[str] | None:
        """Return the prompts the key may use, or None when it may use all."""
        if self.api_key is None or not self.api_key.allowed_prompts:
            return None
        return list(self.api_key.allowed_prompts)


class PromptSummarySerializer(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField()
    active_version = serializers.IntegerField(
        source="active_version.version", allow_null=True
    )


class PromptListApi(GatewayKeyApiView):
    class OutputSerializer(PromptSummarySerializer):
        version_count = serializers.IntegerField()

    def get(self, request):
        queryset = prompt_list(names=self.allowed_prompt_names())
        prompts = self.OutputSerializer(queryset, many=True).data
        return Response({"prompts": prompts})


class PromptDetailApi(GatewayKeyApiView):
    class VersionSerializer(serializers.Serializer):
        version = serializers.IntegerField()
        description = serializers.CharField()
        # Null when the version sets no model, so the default model applies.
        model = serializers.CharField(allow_null=True)
        parameters = serializers.JSONField()
        variables = serializers.JSONField()
        created_at = serializers.DateTimeField()
        active = serializers.SerializerMethodField()

        def to_representation(self, instance):
            data = super().to_representation(instance)
            data["model"] = data["model"] or None
            return data

        def get_active(self, version) -> bool:
            return version.pk == self.context["active_version_id"]

    class OutputSerializer(PromptSummarySerializer):
        updated_at = serializers.DateTimeField()
        versions = serializers.SerializerMethodField()

        def get_versions(self, prompt) -> list:
            return PromptDetailApi.VersionSerializer(
                prompt_versions(prompt=prompt),
                many=True,
                context={"active_version_id": prompt.active_version_id},
            ).data

    def get(self, request, name):
        api_key_check_prompt(self.api_key, name)
        prompt = prompt_get(name=name)
        return Response(self.OutputSerializer(prompt).data)


class PromptRenderApi(GatewayKeyApiView):
    """Render a prompt version with variables, without calling a model."""

    class InputSerializer(serializers.Serializer):
        variables = serializers.DictField(
            required=False,
            default=dict,
            error_messages={
                "not_a_dict": "variables must be a JSON object of variable names "
                "and values.",
                "null": "variables must be a JSON object of variable names and values.",
            },
        )
        # Null or absent means the prompt's active version.
        version = StrictPositiveIntegerField(required=False, allow_null=True)

        def to_internal_value(self, data):
            if isinstance(data, dict):
                unknown = sorted(set(data) - set(self.fields))
                if unknown:
                    message = unknown_fields_message(unknown, list(self.fields))
                    raise serializers.ValidationError({unknown[0]: message})
            return super().to_internal_value(data)

    def post(self, request, name):
        api_key_check_prompt(self.api_key, name)
        # The underlying HttpRequest, because DRF's request.data treats a body
        # without Content-Length, such as a chunked one, as empty.
        body = json_object_body(request._request, example=PROMPT_BODY_EXAMPLE)
        serializer = self.InputSerializer(data=body)
        serializer.is_valid(raise_exception=True)
        rendered = prompt_render(
            name=name,
            variables=serializer.validated_data["variables"],
            version=serializer.validated_data.get("version"),
        )
        return Response(
            {
                "prompt": rendered.name,
                "version": rendered.version,
                "system": rendered.system,
                "user": rendered.user,
                "model": rendered.model or settings.DEFAULT_MODEL,
                "parameters": rendered.parameters,
            }
        )
