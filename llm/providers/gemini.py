"""Gemini adapter, built on the async client of the google-genai SDK.

Every vendor failure leaves this module as a gateway error, translated in
``upstream_error``. Retries happen only here: the SDK is configured to make one
attempt per call, so a failing request is never retried by two loops at once.
"""

import asyncio
import email.utils
import functools
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from django.conf import settings
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from gateway_project.errors import ApiError, InvalidField
from llm.errors import (
    ContentBlocked,
    UpstreamAuthFailed,
    UpstreamBadResponse,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from llm.providers.base import (
    Completion,
    GenerationRequest,
    Provider,
    StreamEnd,
    Usage,
)

try:
    import httpx
except ImportError:
    httpx = None
try:
    import httpx2
except ImportError:
    httpx2 = None

logger = logging.getLogger(__name__)

# The SDK sends requests with httpx2, or with httpx when only that is installed,
# so the transport errors of both count.
_HTTP_MODULES = tuple(module for module in (httpx, httpx2) if module is not None)
_TIMEOUT_ERRORS = (TimeoutError, *(m.TimeoutException for m in _HTTP_MODULES))
_TRANSPORT_ERRORS = (OSError, *(m.TransportError for m in _HTTP_MODULES))

# Full-jitter exponential backoff: the n-th retry waits a random time between
# 0 and min(_BACKOFF_MAX_SECONDS, _BACKOFF_BASE_SECONDS * 2 ** (n - 1)).
_BACKOFF_BASE_SECONDS = 0.2
_BACKOFF_MAX_SECONDS = 4.0

# Finish reasons (google-genai 3.6 FinishReason) that mean a content filter
# withheld the response.
_BLOCKING_FINISH_REASONS = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
    }
)
# ErrorInfo reasons Gemini sends with a 400 when the API key is wrong.
_API_KEY_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED"})
# Words in Gemini's 400 messages that name a request field, and our field name.
_VENDOR_FIELDS = (
    ("max_output_tokens", "max_tokens"),
    ("maxoutputtokens", "max_tokens"),
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("topp", "top_p"),
    ("top_k", "top_k"),
    ("topk", "top_k"),
    ("system_instruction", "system"),
    ("systeminstruction", "system"),
    ("input token count", "prompt"),
    ("contents", "prompt"),
)
# Google's canonical error statuses. Only these appear in messages and logs,
# because the status field is text from the vendor's response.
_CANONICAL_STATUSES = frozenset(
    {
        "ABORTED",
        "ALREADY_EXISTS",
        "CANCELLED",
        "DATA_LOSS",
        "DEADLINE_EXCEEDED",
        "FAILED_PRECONDITION",
        "INTERNAL",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "OUT_OF_RANGE",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "UNAUTHENTICATED",
        "UNAVAILABLE",
        "UNIMPLEMENTED",
        "UNKNOWN",
    }
)
# The gateway's own words for the statuses of a rejected request. Gemini's
# message is logged, never sent to the caller: it may quote the request, and
# a proxy in between could put anything in it.
_REJECTION_DESCRIPTIONS = {
    "INVALID_ARGUMENT": "a value in the request is invalid",
    "OUT_OF_RANGE": "a value in the request is out of range",
    "FAILED_PRECONDITION": "the API cannot serve the request as the gateway's "
    "Gemini project is set up, for example from its region or without billing",
}
_MAX_VENDOR_MESSAGE_CHARS = 300
# Google API keys, and key=... query parameters, masked in logged messages.
_API_KEY_PATTERN = re.compile(r"AIza[0-9A-Za-z_-]{35}|(?<=key=)[^&\s\"']+")
# Idle connections kept open to Gemini: httpx's default. The pool (httpcore2
# 2.16) checks the socket of every idle connection each time a request starts
# or ends. With as many idle connections as open ones, each of the last
# streams of a 500-stream burst checked hundreds of sockets, which cost
# 0.75 s more CPU in bench/ws_streams than this limit.
_MAX_IDLE_CONNECTIONS = 20


class GeminiProvider(Provider):
    name = "gemini"

    async def complete(self, request: GenerationRequest) -> Completion:
        schedule = _RetrySchedule(request.model)
        while True:
            try:
                client = _sdk_client()
                response = await client.aio.models.generate_content(
                    model=request.model,
                    contents=request.prompt,
                    config=generation_config(request),
                )
                return _completion(response, request.model)
            except Exception as exc:
                cause = exc
                error = upstream_error(exc, model=request.model)
            if not await schedule.wait_before_retry(error, cause):
                raise error from cause

    async def stream(
        self, request: GenerationRequest
    ) -> AsyncIterator[str | StreamEnd]:
        # The response is read by a separate task because cancelling that task
        # is the one way to close the SDK's nested generators, and with them
        # the HTTP response, at once. Closing only the outer generator would
        # leave the connection open until garbage collection.
        queue: asyncio.Queue = asyncio.Queue()
        reader = asyncio.create_task(self._read_stream(request, queue))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, ApiError):
                    raise item
                yield item
                if isinstance(item, StreamEnd):
                    return
        finally:
            reader.cancel()
            await asyncio.wait([reader])

    async def _read_stream(self, request: GenerationRequest, queue: asyncio.Queue):
        """Put the stream's chunks, then a StreamEnd or an error, on ``queue``."""
        schedule = _RetrySchedule(request.model)
        while True:
            sent_text = False
            try:
                async for item in _stream_once(request):
                    queue.put_nowait(item)
                    sent_text = sent_text or isinstance(item, str)
                return
            except Exception as exc:
                cause = exc
                error = upstream_error(exc, model=request.model)
            # A retry after the first chunk would resend text the caller has.
            if sent_text or not await schedule.wait_before_retry(error, cause):
                error.__cause__ = cause
                queue.put_nowait(error)
                return


async def _stream_once(request: GenerationRequest) -> AsyncIterator[str | StreamEnd]:
    client = _sdk_client()
    responses = await client.aio.models.generate_content_stream(
        model=request.model,
        contents=request.prompt,
        config=generation_config(request),
    )
    vendor_finish_reason = None
    usage = Usage()
    sent_text = False
    async for response in responses:
        _raise_if_prompt_blocked(response)
        if response.usage_metadata is not None:
            usage = _usage(response.usage_metadata)
        if not response.candidates:
            continue
        candidate = response.candidates[0]
        text = _candidate_text(candidate)
        if text:
            sent_text = True
            yield text
        if candidate.finish_reason:
            vendor_finish_reason = _enum_value(candidate.finish_reason)

    if not sent_text and vendor_finish_reason in _BLOCKING_FINISH_REASONS:
        raise _answer_blocked(vendor_finish_reason)
    if vendor_finish_reason is None:
        # Gemini puts a finish reason on the last event of every stream it
        # completes, so without one the stream was probably cut short. The
        # answer ends with finish reason "other" and is not cached.
        logger.warning(
            "Gemini stream for model %s ended without a finish reason", request.model
        )
    yield StreamEnd(
        model=request.model,
        finish_reason=normalize_finish_reason(vendor_finish_reason),
        usage=usage,
    )


def generation_config(request: GenerationRequest) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(
        system_instruction=request.system,
        temperature=request.temperature,
        max_output_tokens=request.max_tokens,
        top_p=request.top_p,
        top_k=request.top_k,
        # Without tools there is nothing to call, and the SDK would log that
        # function calling is enabled on every request.
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        # Automatic continuation re-sends a stream that broke off, which is a
        # retry outside the adapter's loop and its time limit.
        automatic_continuation=False,
    )


def normalize_finish_reason(vendor_reason: str | None) -> str:
    """Map a Gemini finish reason to one of ``base.FINISH_REASONS``."""
    if vendor_reason == "STOP":
        return "stop"
    if vendor_reason == "MAX_TOKENS":
        return "length"
    if vendor_reason in _BLOCKING_FINISH_REASONS:
        return "safety"
    return "other"


def upstream_error(exc: Exception, *, model: str) -> ApiError:
    """Translate a failed Gemini call into the gateway's error for it.

    The result is an ``llm.errors`` type, or ``InvalidField`` when Gemini
    rejected a value the caller sent. Messages never contain the API key.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, genai_errors.APIError):
        return _status_error(exc, model)
    if isinstance(exc, _TIMEOUT_ERRORS):
        return UpstreamTimeout(
            "Gemini did not respond within GEMINI_TIMEOUT_SECONDS="
            f"{settings.GEMINI_TIMEOUT_SECONDS:g} s; retry later."
        )
    if isinstance(exc, _TRANSPORT_ERRORS):
        return UpstreamUnavailable(
            f"The connection to Gemini failed ({type(exc).__name__}); retry later."
        )
    # pydantic's ValidationError, raised for a malformed response, is a ValueError.
    if isinstance(exc, genai_errors.UnknownApiResponseError | ValueError):
        return UpstreamBadResponse("Gemini sent a response the gateway cannot parse.")
    logger.error("Gemini call for model %s failed unexpectedly", model, exc_info=exc)
    return UpstreamBadResponse("The call to Gemini failed unexpectedly.")


def _status_error(exc: genai_errors.APIError, model: str) -> ApiError:
    status = _status_label(exc)
    if exc.code in (401, 403) or _error_reason(exc) in _API_KEY_REASONS:
        # Gemini's own message is left out: the key is the operator's concern.
        return UpstreamAuthFailed(
            f"Gemini rejected the gateway's API key ({status}); an operator must "
            "fix GEMINI_API_KEY."
        )
    if exc.code == 429:
        error = UpstreamRateLimited(
            f"Gemini is rate limiting the gateway ({status}); retry later."
        )
        error.retry_after = _retry_after(exc)
        return error
    if exc.code == 408:
        return UpstreamTimeout(f"Gemini timed out the request ({status}).")
    if exc.code >= 500:
        return UpstreamUnavailable(f"Gemini is unavailable ({status}); retry later.")
    if exc.code == 404:
        return UpstreamBadResponse(
            f"Gemini does not serve the model {model!r} ({status}); an operator "
            "must fix LLM_MODELS."
        )
    return _rejection_error(exc, model, status)


def _rejection_error(exc: genai_errors.APIError, model: str, status: str) -> ApiError:
    """Translate a 4xx that rejects the request itself, logging Gemini's message."""
    vendor_message = _loggable_message(exc.message or "")
    logger.warning(
        "Gemini rejected a request for model %s (%s): %s", model, status, vendor_message
    )
    field = _rejected_field(vendor_message) if exc.code == 400 else None
    if field is not None:
        return InvalidField(
            f"Gemini rejected {field} ({status}): send a {field} that the model "
            f"{model} accepts.",
            field=field,
        )
    description = _REJECTION_DESCRIPTIONS.get(exc.status, "the request was rejected")
    return UpstreamBadResponse(
        f"Gemini rejected the request ({status}): {description}. The gateway's log "
        "has Gemini's message under the request id."
    )


def _status_label(exc: genai_errors.APIError) -> str:
    """Return the HTTP status and, when it is a canonical one, Google's status."""
    if exc.status in _CANONICAL_STATUSES:
        return f"{exc.code} {exc.status}"
    return str(exc.code)


def _loggable_message(message: str) -> str:
    """Return a vendor message shortened to one line, with API keys masked."""
    api_key = settings.GEMINI_API_KEY
    if api_key:
        message = message.replace(api_key, "[redacted]")
    message = _API_KEY_PATTERN.sub("[redacted]", message)
    return " ".join(message.split())[:_MAX_VENDOR_MESSAGE_CHARS]


def _error_reason(exc: genai_errors.APIError) -> str | None:
    for detail in _error_details(exc):
        if detail.get("reason"):
            return detail["reason"]
    return None


def _error_details(exc: genai_errors.APIError) -> list[dict]:
    body = exc.details if isinstance(exc.details, dict) else {}
    details = body.get("error", body).get("details")
    if not isinstance(details, list):
        return []
    return [detail for detail in details if isinstance(detail, dict)]


def _retry_after(exc: genai_errors.APIError) -> float | None:
    """Return the seconds Gemini requests to wait, from Retry-After or RetryInfo."""
    headers = getattr(exc.response, "headers", None) or {}
    header = headers.get("retry-after")
    if header:
        seconds = _parse_retry_after(header)
        if seconds is not None:
            return seconds
    for detail in _error_details(exc):
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(0.0, float(delay[:-1]))
            except ValueError:
                continue
    return None


def _parse_retry_after(value: str) -> float | None:
    """Parse a Retry-After value: seconds, or an HTTP date (RFC 9110)."""
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _rejected_field(vendor_message: str) -> str | None:
    lowered = vendor_message.lower()
    for vendor_word, field in _VENDOR_FIELDS:
        if vendor_word in lowered:
            return field
    return None


def _error_label(exc: Exception) -> str:
    """Describe a failure for logs by its status or class, never by its text."""
    if isinstance(exc, genai_errors.APIError):
        return _status_label(exc)
    return type(exc).__name__


class _RetrySchedule:
    """Retries with backoff until UPSTREAM_RETRY_MAX_SECONDS have passed.

    No retry starts later than that after the first attempt began, but an
    attempt that started in time may run on for up to GEMINI_TIMEOUT_SECONDS.
    """

    def __init__(self, model: str):
        self.model = model
        self.retries = 0
        self.deadline = time.monotonic() + settings.UPSTREAM_RETRY_MAX_SECONDS

    async def wait_before_retry(self, error: ApiError, cause: Exception) -> bool:
        """Sleep before the next attempt; return False when none may follow."""
        if not getattr(error, "retryable", False):
            return False
        ceiling = min(_BACKOFF_MAX_SECONDS, _BACKOFF_BASE_SECONDS * 2**self.retries)
        delay = random.uniform(0, ceiling)
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)
        if time.monotonic() + delay > self.deadline:
            return False
        self.retries += 1
        logger.warning(
            "Gemini call for model %s failed (%s), retry %d in %.2f s",
            self.model,
            _error_label(cause),
            self.retries,
            delay,
        )
        await asyncio.sleep(delay)
        return True


@functools.lru_cache(maxsize=8)
def _cached_client(
    api_key: str, base_url: str | None, timeout_seconds: float, max_connections: int
) -> genai.Client:
    options = types.HttpOptions(
        base_url=base_url,
        # With httpx the timeout applies to connecting and to each read, so a
        # stream may run longer in total as long as chunks keep arriving.
        timeout=round(timeout_seconds * 1000),
        # One attempt per SDK call: the adapter's own loop does the retries.
        retry_options=types.HttpRetryOptions(attempts=1),
        async_client_args={"limits": _connection_limits(max_connections)},
    )
    return genai.Client(api_key=api_key, vertexai=False, http_options=options)


def _connection_limits(max_connections: int):
    """Build the connection pool limits of the SDK's async HTTP client.

    httpx and httpx2 both default to 100 connections, so without this a
    101st concurrent stream would wait for another stream to end.
    """
    # httpx2 first, as the SDK (google-genai 3.6) prefers it. Both clients
    # read only the attributes of the limits object, so either works with
    # either client.
    module = httpx2 or httpx
    return module.Limits(
        max_connections=max_connections,
        max_keepalive_connections=_MAX_IDLE_CONNECTIONS,
    )


def _sdk_client() -> genai.Client:
    """Return the SDK client for the current settings, made once per setting."""
    api_key = settings.GEMINI_API_KEY
    if not api_key:
        raise UpstreamAuthFailed(
            "GEMINI_API_KEY is not set, so the gateway cannot call Gemini; an "
            "operator must set it."
        )
    return _cached_client(
        api_key,
        settings.GEMINI_BASE_URL,
        settings.GEMINI_TIMEOUT_SECONDS,
        settings.GEMINI_MAX_CONNECTIONS,
    )


def _completion(response: types.GenerateContentResponse, model: str) -> Completion:
    _raise_if_prompt_blocked(response)
    if not response.candidates:
        raise UpstreamBadResponse(
            "Gemini returned a response without candidates or prompt feedback."
        )
    candidate = response.candidates[0]
    text = _candidate_text(candidate)
    vendor_finish_reason = _enum_value(candidate.finish_reason)
    if not text and vendor_finish_reason in _BLOCKING_FINISH_REASONS:
        raise _answer_blocked(vendor_finish_reason)
    return Completion(
        text=text,
        model=model,
        finish_reason=normalize_finish_reason(vendor_finish_reason),
        usage=_usage(response.usage_metadata),
    )


def _raise_if_prompt_blocked(response: types.GenerateContentResponse) -> None:
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason:
        reason = _enum_value(feedback.block_reason)
        raise ContentBlocked(
            f"Gemini blocked the prompt (block reason {reason}). Change the "
            "prompt and try again."
        )


def _answer_blocked(vendor_finish_reason: str) -> ContentBlocked:
    return ContentBlocked(
        f"Gemini withheld the answer (finish reason {vendor_finish_reason}). "
        "Change the prompt and try again."
    )


def _candidate_text(candidate: types.Candidate) -> str:
    if candidate.content is None or not candidate.content.parts:
        return ""
    # Thought summaries of thinking models are not part of the response text.
    return "".join(
        part.text for part in candidate.content.parts if part.text and not part.thought
    )


def _usage(metadata: types.GenerateContentResponseUsageMetadata | None) -> Usage:
    if metadata is None:
        return Usage()
    prompt_tokens = metadata.prompt_token_count or 0
    # Gemini bills a thinking model's thought tokens as output tokens.
    completion_tokens = (metadata.candidates_token_count or 0) + (
        metadata.thoughts_token_count or 0
    )
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=metadata.total_token_count or prompt_tokens + completion_tokens,
    )


def _enum_value(value) -> str | None:
    """Return the wire name of an SDK enum value, which may also be a plain str."""
    if value is None:
        return None
    return getattr(value, "value", value)
