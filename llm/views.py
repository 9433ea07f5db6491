"""REST chat endpoints and the Prometheus metrics endpoint.

The chat views are plain async Django views, not DRF views, so under daphne a
slow vendor holds only its own request and never the thread that sync views
share. They read JSON bodies with gateway_project/json_body.py, validate them
with the DRF serializers in llm/serializers.py and return errors in the
gateway's one error shape. Each chat view authenticates the API key, checks
what the key may use and counts the request against its limits through
llm/access.py.
"""

import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from gateway_project.errors import (
    ApiError,
    error_payload,
    json_error_response,
    method_not_allowed,
)
from gateway_project.json_body import json_object_body
from gateway_project.logging import request_id_var
from llm.access import (
    admit_model_call,
    check_metrics_access,
    record_model_usage,
    request_api_key,
)
from llm.keys import api_key_check_prompt, cache_scope_for
from llm.limits import RateLimitDecision, RateLimited
from llm.metrics import metrics_exposition, request_record
from llm.models import ApiKey
from llm.providers.base import GenerationRequest
from llm.serializers import ChatRequestSerializer, PromptChatRequestSerializer
from llm.services import (
    ChatResult,
    StreamDone,
    StreamStart,
    chat_complete,
    chat_stream,
    prompt_chat_request,
)

logger = logging.getLogger(__name__)

# Request Cache-Control directives that make a chat request skip the cache.
_NO_CACHE_DIRECTIVES = {"no-cache", "no-store"}
# Status recorded in metrics for a stream the client closed before its end
# (the nginx convention for "client closed request").
_CLIENT_CLOSED_STATUS = 499


@dataclass
class _Outcome:
    """Metric labels, start time and rate limit state of one chat request."""

    endpoint: str
    started: float
    model: str = "-"
    # Set once the request is counted against its key's limits; its values
    # go out as X-RateLimit-* headers on the response, errors included.
    rate_limit: RateLimitDecision | None = None

    def record(self, status: int) -> None:
        request_record(
            endpoint=self.endpoint,
            model=self.model,
            status=status,
            seconds=time.perf_counter() - self.started,
        )


ChatView = Callable[..., Awaitable[HttpResponse]]


def _chat_endpoint(endpoint: str) -> Callable[[ChatView], ChatView]:
    """Wrap a chat view: POST only, CSRF exempt, errors in the API shape, metrics.

    Once the view has counted the request against its API key's limits, the
    response carries the X-RateLimit-* headers, error responses included.

    The API serves non-browser clients authenticated by API keys, not by
    cookies, so CSRF protection does not apply.
    """

    def decorate(view: ChatView) -> ChatView:
        @csrf_exempt
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            outcome = _Outcome(endpoint=endpoint, started=time.perf_counter())
            if request.method != "POST":
                return _method_not_allowed(request, "POST")
            try:
                response = await view(request, outcome, *args, **kwargs)
            except RateLimited as error:
                outcome.rate_limit = error.decision
                response = json_error_response(error)
            except Exception as error:  # noqa: BLE001 - error_payload logs unknown ones
                response = json_error_response(error)
            if outcome.rate_limit is not None:
                for name, value in outcome.rate_limit.headers().items():
                    response[name] = value
            # A stream records itself when its body ends.
            if not response.streaming:
                outcome.record(response.status_code)
            return response

        return wrapper

    return decorate


def _method_not_allowed(request: HttpRequest, allowed: str) -> HttpResponse:
    response = json_error_response(
        method_not_allowed(request.method, request.path, [allowed])
    )
    response["Allow"] = allowed
    return response


def _cache_allowed(request: HttpRequest, use_cache: bool) -> bool:
    """Return False for "cache": false in the body or a no-cache request header."""
    directives = {
        part.split("=", 1)[0].strip().lower()
        for part in request.headers.get("Cache-Control", "").split(",")
    }
    return use_cache and not (directives & _NO_CACHE_DIRECTIVES)


def _result_response(
    request: HttpRequest, result: ChatResult, extra: dict[str, Any]
) -> JsonResponse:
    response = JsonResponse(
        {
            "response": result.text,
            "model": result.model,
            "latency": round(result.latency, 6),
            "cached": result.cached,
            "finish_reason": result.finish_reason,
            "usage": asdict(result.usage),
            **extra,
            "request_id": request.request_id,
        }
    )
    response["X-Cache"] = result.cache_status
    return response


def _chat_request(request: HttpRequest) -> tuple[GenerationRequest, bool]:
    """Validate a /chat body; return the model request and whether to cache."""
    body = json_object_body(request, example=ChatRequestSerializer.body_example)
    serializer = ChatRequestSerializer(data=body)
    serializer.is_valid(raise_exception=True)
    use_cache = _cache_allowed(request, serializer.use_cache)
    return serializer.generation_request(), use_cache


async def _prompt_chat_request(
    request: HttpRequest, name: str
) -> tuple[GenerationRequest, bool, dict[str, Any]]:
    """Validate a prompt chat body and render the prompt.

    Returns the model request, whether to cache, and the reply's prompt fields.
    """
    body = json_object_body(request, example=PromptChatRequestSerializer.body_example)
    serializer = PromptChatRequestSerializer(data=body)
    serializer.is_valid(raise_exception=True)
    data = serializer.validated_data
    rendered, generation = await prompt_chat_request(
        name=name,
        variables=data["variables"],
        version=data.get("version"),
        overrides=serializer.overrides,
    )
    use_cache = _cache_allowed(request, serializer.use_cache)
    return generation, use_cache, {"prompt": rendered.name, "version": rendered.version}


@_chat_endpoint("chat")
async def chat(request: HttpRequest, outcome: _Outcome) -> HttpResponse:
    key = await request_api_key(request)
    generation, use_cache = _chat_request(request)

    return await _complete_chat(request, outcome, key, generation, use_cache, {})


@_chat_endpoint("chat_stream")
async def chat_stream_view(request: HttpRequest, outcome: _Outcome) -> HttpResponse:
    key = await request_api_key(request)
    generation, use_cache = _chat_request(request)

    return await _stream_chat(request, outcome, key, generation, use_cache, {})


@_chat_endpoint("prompt_chat")
async def prompt_chat(request: HttpRequest, outcome: _Outcome, name: str):
    key = await request_api_key(request)
    api_key_check_prompt(key, name)
    generation, use_cache, extra = await _prompt_chat_request(request, name)

    return await _complete_chat(request, outcome, key, generation, use_cache, extra)


@_chat_endpoint("prompt_chat_stream")
async def prompt_chat_stream(request: HttpRequest, outcome: _Outcome, name: str):
    key = await request_api_key(request)
    api_key_check_prompt(key, name)
    generation, use_cache, extra = await _prompt_chat_request(request, name)

    return await _stream_chat(request, outcome, key, generation, use_cache, extra)


async def _complete_chat(
    request: HttpRequest,
    outcome: _Outcome,
    key: ApiKey | None,
    generation: GenerationRequest,
    use_cache: bool,
    extra: dict[str, Any],
) -> JsonResponse:
    """Admit the model call under the key's limits and return the whole response."""
    outcome.model = generation.model
    outcome.rate_limit = await admit_model_call(key, generation.model)

    result = await chat_complete(
        generation, use_cache=use_cache, cache_scope=cache_scope_for(key)
    )
    await record_model_usage(key, result.cache_status, result.usage)
    return _result_response(request, result, extra)


async def _stream_chat(
    request: HttpRequest,
    outcome: _Outcome,
    key: ApiKey | None,
    generation: GenerationRequest,
    use_cache: bool,
    extra: dict[str, Any],
) -> StreamingHttpResponse:
    """Admit the model call under the key's limits and stream the response."""
    outcome.model = generation.model
    outcome.rate_limit = await admit_model_call(key, generation.model)

    events = chat_stream(
        generation, use_cache=use_cache, cache_scope=cache_scope_for(key)
    )
    return await _event_stream_response(request, events, outcome, key, extra)


async def _event_stream_response(
    request: HttpRequest,
    events: AsyncIterator,
    outcome: _Outcome,
    key: ApiKey | None,
    extra: dict[str, Any],
) -> StreamingHttpResponse:
    """Start ``events`` and return it as a text/event-stream response.

    StreamStart and the first chunk are read before the response exists, so an
    error of the cache lookup or of the provider's first step still becomes a
    JSON error response with its own status instead of a 200 stream.
    """
    try:
        start: StreamStart = await anext(events)
        first = await anext(events)
    except BaseException:
        # Also on cancellation, when the client left before the first chunk.
        await events.aclose()
        raise

    body = _event_stream_body(request.request_id, first, events, outcome, key, extra)
    response = StreamingHttpResponse(body, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    # Tells nginx and similar proxies to pass each event on at once.
    response["X-Accel-Buffering"] = "no"
    response["X-Cache"] = start.cache_status
    return response


async def _event_stream_body(
    request_id: str,
    first: str | StreamDone,
    events: AsyncIterator,
    outcome: _Outcome,
    key: ApiKey | None,
    extra: dict[str, Any],
) -> AsyncIterator[bytes]:
    # RequestIdMiddleware resets its context variable before Django iterates a
    # streaming body, so log lines from here on need it set again.
    request_id_var.set(request_id)
    status = _CLIENT_CLOSED_STATUS
    try:
        item = first
        while not isinstance(item, StreamDone):
            yield _sse_event({"text": item})
            item = await anext(events)
        # NOTE: a stream the client closes early is never counted, although
        # the provider may have generated tokens until the close.
        await record_model_usage(key, item.cache_status, item.usage)
        done = {
            "model": item.model,
            "finish_reason": item.finish_reason,
            "usage": asdict(item.usage),
            "cached": item.cache_status.startswith("hit"),
            "latency": round(item.latency, 6),
            **extra,
            "request_id": request_id,
        }
        status = 200
        yield _sse_event(done, event="done")
    except Exception as error:  # noqa: BLE001 - error_payload logs unknown ones
        # The status line has gone out, so the error travels as an event.
        status, body, _headers = error_payload(error)
        logger.warning(
            "Chat stream failed after it began: %s (%s)",
            body["error"]["code"],
            status,
        )
        yield _sse_event(body, event="error")
    finally:
        # Closing the service's generator closes the provider stream when the
        # client disconnected; after a normal end it does nothing.
        # NOTE: Django 5.2 closes only its own wrapper of this generator. When
        # the client leaves while a chunk is being sent, or before the body
        # starts, this block waits for asyncio's finalizer of async generators.
        await events.aclose()
        outcome.record(status)


def _sse_event(data: dict, event: str | None = None) -> bytes:
    # json.dumps escapes newlines, so the payload always fits one data line.
    payload = json.dumps(data, separators=(",", ":"))
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n".encode()


# Scrapers send no CSRF token, and the view changes nothing: a POST gets 405.
@csrf_exempt
async def metrics(request: HttpRequest) -> HttpResponse:
    """Serve this process's metrics in the Prometheus text format."""
    if request.method not in ("GET", "HEAD"):
        return _method_not_allowed(request, "GET")
    try:
        await check_metrics_access(request)
    except ApiError as error:
        return json_error_response(error)
    payload, content_type = metrics_exposition()
    return HttpResponse(payload, content_type=content_type)
