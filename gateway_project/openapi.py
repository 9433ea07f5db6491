"""The OpenAPI document of the REST API, served at /schema and /docs.

drf-spectacular introspects DRF views. The extensions here add the response
shapes that the prompt and readiness views do not declare, so those views
carry no schema code. The chat, metrics and health views are plain async
Django views, which drf-spectacular skips. ``add_plain_view_endpoints``
therefore adds them as documentation-only APIView classes that name the same
request serializers, so drf-spectacular builds their schemas with its own
machinery. ``add_security`` then adds the bearer scheme and the X-Request-ID
header to every operation.
"""

from django.conf import settings
from django.urls import URLPattern, URLResolver, get_resolver
from drf_spectacular.extensions import (
    OpenApiSerializerExtension,
    OpenApiSerializerFieldExtension,
    OpenApiViewExtension,
)
from drf_spectacular.generators import EndpointEnumerator
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import serializers
from rest_framework.views import APIView

from gateway_project import views as gateway_views
from llm import views as llm_views
from llm.providers.base import FINISH_REASONS
from llm.serializers import ChatRequestSerializer, PromptChatRequestSerializer
from prompts_registry import views as prompt_views
from prompts_registry.loading import PROMPT_NAME

BEARER_SCHEME = "bearerAuth"
# Paths a load balancer calls without an API key. /metrics joins them when
# METRICS_PUBLIC is true.
PUBLIC_PATHS = frozenset({"/health", "/ready"})
CACHE_STATUSES = ["hit-l1", "hit-l2", "miss", "bypass"]

ERROR_DESCRIPTIONS = {
    400: "Invalid JSON (code invalid_json) or an invalid field (code "
    "invalid_field), which `error.field` names.",
    401: "The API key is missing, malformed, unknown (code unauthenticated) or "
    "revoked (code key_revoked).",
    403: "The API key may not use this model or prompt (code forbidden).",
    404: "The prompt or its version does not exist (code not_found).",
    413: "The body is larger than MAX_REQUEST_BYTES (code request_too_large).",
    415: "The body is not sent as application/json, or names a charset other "
    "than utf-8 (code unsupported_media_type).",
    422: "The model provider blocked the prompt or the answer (code content_blocked).",
    429: "The API key used up its requests or tokens for this window "
    "(code rate_limited) or its daily token budget (code budget_exceeded), or "
    "the model provider is rate limiting the gateway (code upstream_rate_limited). "
    "Retry-After gives the seconds to wait.",
    500: "The gateway failed unexpectedly (code internal_error). The gateway's "
    "log has the traceback under the request id. On prompt endpoints, also a "
    "prompt version that breaks the template sandbox's rules (code "
    "prompt_invalid).",
    502: "The model provider rejected the gateway's credentials "
    "(code upstream_auth_failed) or returned an unusable response "
    "(code upstream_error).",
    503: "The model provider is unavailable (code upstream_unavailable), its "
    "circuit breaker is open (code circuit_open) or the local model's queue is "
    "full (code model_busy).",
    504: "The model provider did not respond in time (code upstream_timeout).",
}

CHAT_ERRORS = (400, 401, 403, 413, 415, 422, 429, 500, 502, 503, 504)
PROMPT_CHAT_ERRORS = (*CHAT_ERRORS, 404)
ALL_CHAT_STATUSES = (200, *PROMPT_CHAT_ERRORS)


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="Machine-readable error code.")
    message = serializers.CharField(help_text="What failed and how to fix it.")
    field = serializers.CharField(
        required=False,
        help_text="The request field at fault, e.g. max_tokens or variables.topic.",
    )


class ErrorSerializer(serializers.Serializer):
    """The body of every 4xx and 5xx response."""

    error = ErrorDetailSerializer()
    request_id = serializers.CharField()


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class ChatResponseSerializer(serializers.Serializer):
    response = serializers.CharField(help_text="The model's answer.")
    model = serializers.CharField()
    latency = serializers.FloatField(help_text="Seconds the gateway took.")
    cached = serializers.BooleanField()
    finish_reason = serializers.ChoiceField(choices=FINISH_REASONS)
    usage = UsageSerializer()
    request_id = serializers.CharField()


class PromptChatResponseSerializer(ChatResponseSerializer):
    prompt = serializers.CharField(help_text="The prompt's name.")
    version = serializers.IntegerField(help_text="The prompt version rendered.")


# The prompt views name their nested serializers OutputSerializer and
# InputSerializer. These subclasses give each schema component its own name.
class PromptListItemSerializer(prompt_views.PromptListApi.OutputSerializer):
    pass


class PromptListSerializer(serializers.Serializer):
    prompts = PromptListItemSerializer(many=True)


class PromptVersionSerializer(prompt_views.PromptDetailApi.VersionSerializer):
    pass


class PromptDetailSerializer(prompt_views.PromptDetailApi.OutputSerializer):
    versions = PromptVersionSerializer(many=True)


class PromptRenderRequestSerializer(prompt_views.PromptRenderApi.InputSerializer):
    pass


class PromptRenderResponseSerializer(serializers.Serializer):
    prompt = serializers.CharField()
    version = serializers.IntegerField()
    system = serializers.CharField(allow_null=True)
    user = serializers.CharField(help_text="The rendered text sent to the model.")
    model = serializers.CharField(
        help_text="The version's model, or the gateway's default model."
    )
    parameters = serializers.DictField(
        help_text="The version's temperature, max_tokens, top_p and top_k, as set."
    )


class HealthSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok"])


class ReadySerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ready"])
    checks = serializers.DictField(child=serializers.CharField())


class NotReadySerializer(ErrorSerializer):
    """The error body of /ready, with the state of each dependency."""

    checks = serializers.DictField(
        child=serializers.CharField(), help_text='"ok" or "failed" per dependency.'
    )


def error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    return {
        status: OpenApiResponse(ErrorSerializer, ERROR_DESCRIPTIONS[status])
        for status in statuses
    }


def _response_header(name, kind, statuses, description, **options):
    return OpenApiParameter(
        name,
        kind,
        OpenApiParameter.HEADER,
        description=description,
        response=list(statuses),
        **options,
    )


NAME_PARAMETER = OpenApiParameter(
    "name",
    str,
    OpenApiParameter.PATH,
    required=True,
    # Only names that prompt files may have can exist, so others get 404.
    pattern=PROMPT_NAME.pattern,
    description="The prompt's name, as listed by GET /prompts.",
    # A prompt shipped in fixtures/prompts, the default PROMPTS_DIR.
    examples=[OpenApiExample("summarizer", value="summarizer")],
)
CHAT_EXAMPLE = OpenApiExample(
    "Short answer",
    value={"prompt": "Name three primary colours.", "temperature": 0.2},
    request_only=True,
)
SUMMARIZER_EXAMPLE = OpenApiExample(
    "Summarizer variables",
    value={"variables": {"text": "The meeting moved from Monday to Tuesday."}},
    request_only=True,
)
CACHE_CONTROL_PARAMETER = OpenApiParameter(
    "Cache-Control",
    str,
    OpenApiParameter.HEADER,
    description='"no-cache" or "no-store" skips the response cache, like '
    '"cache": false in the body.',
)
X_CACHE_HEADER = _response_header(
    "X-Cache",
    str,
    [200],
    "Where the answer came from: the process cache (hit-l1), Redis (hit-l2), "
    "the model (miss), or the model without caching (bypass).",
    enum=CACHE_STATUSES,
    required=True,
)
# Sent, on success and on errors alike, once the request was counted against
# the limits of a key that has a request limit.
RATE_LIMIT_HEADERS = [
    _response_header(
        "X-RateLimit-Limit",
        int,
        ALL_CHAT_STATUSES,
        "Requests the API key may send per window.",
    ),
    _response_header(
        "X-RateLimit-Remaining",
        int,
        ALL_CHAT_STATUSES,
        "Requests left in the current window.",
    ),
    _response_header(
        "X-RateLimit-Reset",
        int,
        ALL_CHAT_STATUSES,
        "Seconds until the current window ends.",
    ),
]
RETRY_AFTER_HEADER = _response_header(
    "Retry-After",
    int,
    [429, 503],
    "Seconds to wait before retrying.",
)
CHAT_PARAMETERS = [
    CACHE_CONTROL_PARAMETER,
    X_CACHE_HEADER,
    RETRY_AFTER_HEADER,
    *RATE_LIMIT_HEADERS,
]


class ChatStreamEventSerializer(serializers.Serializer):
    """One server-sent event of a chat stream.

    OpenAPI 3.0 has no way to describe the items of a stream, so this schema
    describes each event, as OpenAPI 3.2's itemSchema does.
    """

    event = serializers.ChoiceField(
        choices=["message", "done", "error"],
        required=False,
        help_text="Absent (message) for a chunk of the answer; done once at the "
        "end; error when the model fails after the stream began.",
    )
    data = serializers.CharField(
        help_text='One line of JSON: {"text": "..."} for a chunk. For done: '
        "model, finish_reason, usage, cached, latency and request_id, plus prompt "
        "and version for a registry prompt. For error: the error body."
    )


STREAM_RESPONSE = OpenApiResponse(
    ChatStreamEventSerializer,
    "Server-sent events: the chunks of the answer, then one done or error "
    "event. Errors found before the first chunk are JSON responses with their "
    "own status instead.",
)


# Documentation-only views: drf-spectacular reads their annotations and
# method docstrings, and no URL routes a request to them.


class ChatSchema(APIView):
    @extend_schema(
        operation_id="chat",
        summary="Send a prompt to a model and return the whole answer",
        tags=["chat"],
        request=ChatRequestSerializer,
        parameters=CHAT_PARAMETERS,
        examples=[CHAT_EXAMPLE],
        responses={200: ChatResponseSerializer, **error_responses(*CHAT_ERRORS)},
    )
    def post(self, request):
        """Identical requests are served from the response cache unless the
        body sets "cache": false or the request sends Cache-Control: no-cache."""


class ChatStreamSchema(APIView):
    @extend_schema(
        operation_id="chat_stream",
        summary="Send a prompt to a model and stream the answer",
        tags=["chat"],
        request=ChatRequestSerializer,
        parameters=CHAT_PARAMETERS,
        examples=[CHAT_EXAMPLE],
        responses={
            (200, "text/event-stream"): STREAM_RESPONSE,
            **error_responses(*CHAT_ERRORS),
        },
    )
    def post(self, request):
        """A cached response is replayed as chunks."""


class PromptChatSchema(APIView):
    @extend_schema(
        operation_id="prompt_chat",
        summary="Render a registry prompt and return the model's answer",
        tags=["chat"],
        request=PromptChatRequestSerializer,
        parameters=[NAME_PARAMETER, *CHAT_PARAMETERS],
        examples=[SUMMARIZER_EXAMPLE],
        responses={
            200: PromptChatResponseSerializer,
            **error_responses(*PROMPT_CHAT_ERRORS),
        },
    )
    def post(self, request, name):
        """Renders the prompt's active version, or the version sent. The model
        and parameters in the body override the version's own."""


class PromptChatStreamSchema(APIView):
    @extend_schema(
        operation_id="prompt_chat_stream",
        summary="Render a registry prompt and stream the model's answer",
        tags=["chat"],
        request=PromptChatRequestSerializer,
        parameters=[NAME_PARAMETER, *CHAT_PARAMETERS],
        examples=[SUMMARIZER_EXAMPLE],
        responses={
            (200, "text/event-stream"): STREAM_RESPONSE,
            **error_responses(*PROMPT_CHAT_ERRORS),
        },
    )
    def post(self, request, name):
        """Renders the prompt like POST /prompts/{name}/chat."""


class MetricsSchema(APIView):
    @extend_schema(
        operation_id="metrics",
        summary="Return this process's metrics in the Prometheus text format",
        tags=["operations"],
        responses={
            (200, "text/plain"): OpenApiTypes.STR,
            **error_responses(401),
        },
    )
    def get(self, request):
        """Each process counts its own requests, so scrape every process. An
        API key is required unless METRICS_PUBLIC is true."""


class HealthSchema(APIView):
    @extend_schema(
        operation_id="health",
        summary="Report that the process is up",
        tags=["operations"],
        responses={200: HealthSerializer},
    )
    def get(self, request):
        """Checks no dependency: GET /ready checks the database and Redis."""


# The plain Django views and the classes that describe them.
PLAIN_VIEW_SCHEMAS = {
    gateway_views.health: HealthSchema,
    llm_views.chat: ChatSchema,
    llm_views.chat_stream_view: ChatStreamSchema,
    llm_views.prompt_chat: PromptChatSchema,
    llm_views.prompt_chat_stream: PromptChatStreamSchema,
    llm_views.metrics: MetricsSchema,
}


def _url_patterns(patterns, prefix=""):
    """Yield ``(route regex, view)`` for every URL pattern, resolvers included."""
    for pattern in patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            yield from _url_patterns(pattern.url_patterns, route)
        elif isinstance(pattern, URLPattern):
            yield route, pattern.callback


def add_plain_view_endpoints(endpoints):
    """Preprocessing hook: add the plain views found in the URLconf.

    Their routes come from the URLconf, so the documented paths follow
    llm/urls.py.
    """
    enumerator = EndpointEnumerator()
    added = []
    for route, callback in _url_patterns(get_resolver().url_patterns):
        schema_view = PLAIN_VIEW_SCHEMAS.get(callback)
        if schema_view is None:
            continue
        callback = schema_view.as_view()
        path = enumerator.get_path_from_regex(route)
        for method in enumerator.get_allowed_methods(callback):
            added.append((path, route, method, callback))
    return [*endpoints, *added]


def add_security(result, generator, request, public):
    """Postprocessing hook: add bearer auth and the X-Request-ID response header.

    Every endpoint except those in PUBLIC_PATHS, and /metrics when
    METRICS_PUBLIC is true, needs a gateway API key.
    """
    public_paths = PUBLIC_PATHS | ({"/metrics"} if settings.METRICS_PUBLIC else set())
    components = result.setdefault("components", {})
    components.setdefault("securitySchemes", {})[BEARER_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "A gateway API key, created in the admin or with "
        "`manage.py create_api_key`: `Authorization: Bearer gw_...`.",
    }
    components.setdefault("headers", {})["X-Request-ID"] = {
        "schema": {"type": "string"},
        "required": True,
        "description": "The request's id: the client's X-Request-ID when it is "
        "1-128 characters of letters, digits and ._:-, otherwise a new one.",
    }
    request_id_header = {"$ref": "#/components/headers/X-Request-ID"}
    for path, operations in result["paths"].items():
        for operation in operations.values():
            if path not in public_paths:
                operation["security"] = [{BEARER_SCHEME: []}]
            for response in operation["responses"].values():
                response.setdefault("headers", {})["X-Request-ID"] = request_id_header
    return result


class StrictObjectSerializerExtension(OpenApiSerializerExtension):
    """Mark chat request bodies as closed objects: unknown fields get 400."""

    target_class = "llm.serializers._GenerationOptionsSerializer"
    match_subclasses = True

    def map_serializer(self, auto_schema, direction):
        schema = auto_schema._map_serializer(
            self.target, direction, bypass_extensions=True
        )
        schema["additionalProperties"] = False
        return schema


class StrictRenderRequestExtension(StrictObjectSerializerExtension):
    target_class = "gateway_project.openapi.PromptRenderRequestSerializer"
    match_subclasses = False


class VariablesFieldExtension(OpenApiSerializerFieldExtension):
    target_class = "llm.serializers._VariablesField"

    def map_serializer_field(self, auto_schema, direction):
        return {
            "type": "object",
            "additionalProperties": {},
            "description": "Values for the prompt's variables, by name.",
        }


class PositiveIntegerFieldExtension(OpenApiSerializerFieldExtension):
    target_class = "prompts_registry.views.StrictPositiveIntegerField"

    def map_serializer_field(self, auto_schema, direction):
        return {"type": "integer", "minimum": 1}


def annotated(view_class: type[APIView], **methods) -> type[APIView]:
    """Return a subclass of ``view_class`` with ``methods``' schema annotations.

    The subclass keeps the annotations off the view that serves requests.
    """
    return extend_schema_view(**methods)(type(view_class.__name__, (view_class,), {}))


class PromptListApiSchema(OpenApiViewExtension):
    target_class = "prompts_registry.views.PromptListApi"

    def view_replacement(self):
        return annotated(
            self.target,
            get=extend_schema(
                operation_id="prompt_list",
                summary="List the prompts the API key may use",
                tags=["prompts"],
                responses={200: PromptListSerializer, **error_responses(401, 500)},
            ),
        )


class PromptDetailApiSchema(OpenApiViewExtension):
    target_class = "prompts_registry.views.PromptDetailApi"

    def view_replacement(self):
        return annotated(
            self.target,
            get=extend_schema(
                operation_id="prompt_detail",
                summary="Show a prompt and all its versions",
                tags=["prompts"],
                parameters=[NAME_PARAMETER],
                responses={
                    200: PromptDetailSerializer,
                    **error_responses(401, 403, 404, 500),
                },
            ),
        )


class PromptRenderApiSchema(OpenApiViewExtension):
    target_class = "prompts_registry.views.PromptRenderApi"

    def view_replacement(self):
        return annotated(
            self.target,
            post=extend_schema(
                operation_id="prompt_render",
                summary="Render a prompt version with variables, without a model",
                tags=["prompts"],
                parameters=[NAME_PARAMETER],
                request=PromptRenderRequestSerializer,
                examples=[SUMMARIZER_EXAMPLE],
                responses={
                    200: PromptRenderResponseSerializer,
                    **error_responses(400, 401, 403, 404, 413, 415, 500),
                },
            ),
        )


class ReadySchema(OpenApiViewExtension):
    target_class = "gateway_project.views.ready"

    def view_replacement(self):
        return annotated(
            self.target,
            get=extend_schema(
                operation_id="ready",
                summary="Report whether the database and Redis respond",
                tags=["operations"],
                responses={
                    200: ReadySerializer,
                    503: OpenApiResponse(
                        NotReadySerializer, "A dependency failed (code not_ready)."
                    ),
                },
            ),
        )
