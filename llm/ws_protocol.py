"""The JSON frames of the chat websocket: decoding client frames, shaping replies.

The consumer in ``llm.consumers`` only moves frames. What a frame means and what
is sent back are plain functions here, so they can be tested and reused without
a socket.
"""

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from gateway_project.errors import ApiError, InvalidField, error_payload
from gateway_project.json_body import check_strings, json_loads, json_object
from gateway_project.logging import request_id_var
from llm.access import admit_model_call, record_model_usage
from llm.keys import (
    BEARER_SUBPROTOCOL,
    ApiKeyMissing,
    api_key_authenticate_async,
    api_key_check_prompt,
    api_key_recheck_async,
    cache_scope_for,
)
from llm.metrics import request_record
from llm.models import ApiKey
from llm.providers.base import GenerationRequest
from llm.serializers import ChatRequestSerializer, PromptChatRequestSerializer
from llm.services import StreamDone, StreamStart, chat_stream, prompt_chat_request

# Frame types that start a model call, and so need an id of their own.
REQUEST_TYPES = ("chat", "prompt")
CLIENT_TYPES = (*REQUEST_TYPES, "cancel", "subscribe", "unsubscribe", "auth")
AUTH_FRAME_EXAMPLE = '{"type": "auth", "key": "<key>"}'
FRAME_EXAMPLE = '{"type": "chat", "id": "1", "prompt": "Hi"}'
MAX_ID_CHARS = 128
# Status recorded in metrics for a request cancelled by its client or by the
# connection closing (the nginx convention for "client closed request").
CLIENT_CLOSED_STATUS = 499


def accepted_subprotocol(scope: dict) -> str | None:
    """Return "bearer" when the client sent its API key as a subprotocol.

    Browsers fail a handshake whose accepted subprotocol they did not offer,
    and the key itself must never be echoed back, so only "bearer" is chosen.
    """
    if BEARER_SUBPROTOCOL in scope.get("subprotocols", []):
        return BEARER_SUBPROTOCOL
    return None


def frame_size(text_data: str | None, bytes_data: bytes | None) -> int:
    """Return the payload size of a websocket frame in bytes."""
    if text_data is not None:
        return len(text_data.encode("utf-8"))
    return len(bytes_data or b"")


def frame_too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        f"The frame has {size} bytes, more than the limit of {limit} "
        "(WS_MAX_FRAME_BYTES): send a shorter message. The connection is closed.",
        code="frame_too_large",
        status_code=413,
    )


def decode_frame(text_data: str | None, bytes_data: bytes | None) -> dict:
    """Parse a client frame into a JSON object; raise ApiError if it is not one."""
    if text_data is None:
        raise ApiError(
            "Binary frames are not accepted: send each message as a JSON text frame.",
            code="unsupported_frame",
        )
    # The REST views read bodies under the same rules.
    value = json_loads(text_data, subject="frame")
    return json_object(value, subject="frame", example=FRAME_EXAMPLE)


def decode_auth_frame(text_data: str | None, bytes_data: bytes | None) -> dict:
    """Parse the first frame of a connection without a key; it must be an auth frame.

    Raises ApiKeyMissing (401) for any other frame, invalid JSON included, so
    a client that has not authenticated learns nothing about the protocol.
    """
    try:
        frame = decode_frame(text_data, bytes_data)
    except ApiError:
        frame = {}
    if frame.get("type") != "auth":
        raise ApiKeyMissing(
            f"The first frame must authenticate: send {AUTH_FRAME_EXAMPLE} before "
            "any other frame, or connect with the header "
            "`Authorization: Bearer <key>`. The connection is closed."
        )
    return frame


async def auth_frame_api_key(frame: dict) -> ApiKey:
    """Authenticate the key of an auth frame.

    Raises ApiKeyMissing, ApiKeyInvalid or ApiKeyRevoked (all 401), or
    InvalidField for a key with NUL or a lone surrogate, which cannot be hashed.
    """
    check_strings(frame)
    raw = frame.get("key")
    if not isinstance(raw, str) or not raw.strip():
        raise ApiKeyMissing(
            f"key is required in the auth frame: send {AUTH_FRAME_EXAMPLE}.",
            field="key",
        )
    return await api_key_authenticate_async(raw)


def auth_timed_out(seconds: float) -> ApiKeyMissing:
    return ApiKeyMissing(
        f"No API key arrived within {seconds:g} s of connecting: send "
        f"{AUTH_FRAME_EXAMPLE} as the first frame, or connect with the header "
        "`Authorization: Bearer <key>`. The connection is closed."
    )


def already_authenticated(key: ApiKey) -> ApiError:
    return ApiError(
        f"This connection is already authenticated with API key {key.prefix}…: "
        "open a new connection to use another key.",
        code="already_authenticated",
    )


def client_id_of(frame: dict) -> str | None:
    """Return the frame's id when it is a string, so errors can echo it."""
    value = frame.get("id")
    return value if isinstance(value, str) else None


def validate_frame(frame: dict) -> str:
    """Check the frame's strings, type and id and return the type.

    Raises InvalidField. The strings are checked here rather than in
    ``decode_frame``, so the error frame can carry the frame's id.
    """
    check_strings(frame)
    frame_type = frame.get("type")
    if frame_type not in CLIENT_TYPES:
        raise InvalidField(
            f"type must be one of {', '.join(CLIENT_TYPES)}; got {frame_type!r}.",
            field="type",
        )

    value = frame.get("id")
    id_required = frame_type in (*REQUEST_TYPES, "cancel")
    if value is None and not id_required:
        return frame_type
    if value is None:
        raise InvalidField(
            f"id is required in a {frame_type} frame: send a string that is unique "
            "among your requests in flight.",
            field="id",
        )
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_CHARS:
        raise InvalidField(
            f"id must be a string of 1 to {MAX_ID_CHARS} characters.", field="id"
        )
    return frame_type


def subscription_prompt(frame: dict) -> str:
    """Return the prompt name of a subscribe or unsubscribe frame."""
    name = frame.get("prompt")
    if not isinstance(name, str) or not name:
        raise InvalidField(
            "prompt is required: send the name of a prompt in the registry.",
            field="prompt",
        )
    return name


def request_fields(frame: dict) -> dict:
    """Return the frame without the websocket envelope (type and id)."""
    return {key: value for key, value in frame.items() if key not in ("type", "id")}


@dataclass(frozen=True)
class ModelCall:
    """A validated chat or prompt frame, ready for ``chat_stream``."""

    request: GenerationRequest
    use_cache: bool
    # Set for prompt frames: which registry prompt and version were rendered.
    prompt: dict[str, Any] | None = None


def chat_model_call(fields: dict) -> ModelCall:
    """Validate a chat frame's fields as the REST chat endpoint does."""
    serializer = ChatRequestSerializer(data=fields)
    serializer.is_valid(raise_exception=True)
    return ModelCall(serializer.generation_request(), serializer.use_cache)


async def prompt_model_call(fields: dict, key: ApiKey | None) -> ModelCall:
    """Render a prompt frame's registry prompt and apply the frame's overrides."""
    fields = dict(fields)
    name = fields.pop("name", None)
    if not isinstance(name, str) or not name:
        raise InvalidField(
            "name is required: send the name of a prompt in the registry.",
            field="name",
        )
    api_key_check_prompt(key, name)
    serializer = PromptChatRequestSerializer(data=fields)
    serializer.is_valid(raise_exception=True)
    data = serializer.validated_data
    rendered, request = await prompt_chat_request(
        name=name,
        variables=data["variables"],
        version=data.get("version"),
        overrides=serializer.overrides,
    )
    prompt = {"prompt": rendered.name, "version": rendered.version}
    return ModelCall(request, serializer.use_cache, prompt)


async def request_frames(
    frame_type: str, client_id: str, fields: dict, key: ApiKey | None
) -> AsyncIterator[dict]:
    """Run a chat or prompt request and yield the frames to send, in order.

    ``key`` is the API key the socket authenticated with (None when
    GATEWAY_AUTH is off). It is read again first, so a key revoked while the
    socket is open stops working, and its allow lists and limits apply to each
    request. Closing this generator closes the model stream, which stops the
    upstream call, and the service caches nothing from a stream that did not
    finish.
    """
    # With GATEWAY_AUTH off there is no key, and skipping these calls saves
    # each request its trips to a worker thread.
    if key is not None:
        key = await api_key_recheck_async(key)
    if frame_type == "chat":
        call = chat_model_call(fields)
    else:
        call = await prompt_model_call(fields, key)
    if key is not None:
        await admit_model_call(key, call.request.model)

    stream = chat_stream(
        call.request, use_cache=call.use_cache, cache_scope=cache_scope_for(key)
    )
    async with aclosing(stream):
        async for item in stream:
            if isinstance(item, StreamStart):
                yield start_frame(client_id, item, call.prompt)
            elif isinstance(item, StreamDone):
                if key is not None:
                    await record_model_usage(key, item.cache_status, item.usage)
                yield done_frame(client_id, item)
            else:
                yield {"type": "token", "id": client_id, "text": item}


@dataclass
class RequestOutcome:
    """Metrics of one websocket chat or prompt request."""

    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    model: str = "-"
    # 499, nginx's "client closed request", until the request ends otherwise.
    status: int = CLIENT_CLOSED_STATUS

    def observe(self, frame: dict) -> None:
        if frame["type"] == "start":
            self.model = frame["model"]
        elif frame["type"] == "done":
            self.status = 200

    def record(self) -> None:
        request_record(
            endpoint=self.endpoint,
            model=self.model,
            status=self.status,
            seconds=time.perf_counter() - self.started,
        )


def start_frame(
    client_id: str, start: StreamStart, prompt: dict[str, Any] | None = None
) -> dict:
    return {
        "type": "start",
        "id": client_id,
        "request_id": request_id_var.get(),
        "model": start.model,
        "cached": start.cache_status.startswith("hit"),
        **(prompt or {}),
    }


def done_frame(client_id: str, done: StreamDone) -> dict:
    return {
        "type": "done",
        "id": client_id,
        "finish_reason": done.finish_reason,
        "usage": {
            "prompt_tokens": done.usage.prompt_tokens,
            "completion_tokens": done.usage.completion_tokens,
            "total_tokens": done.usage.total_tokens,
        },
        "latency": round(done.latency, 6),
        "cached": done.cache_status.startswith("hit"),
    }


def request_error(client_id: str | None, error: Exception) -> tuple[int, dict]:
    """Return the HTTP status the REST API would use and the error frame.

    The frame carries the REST API's error body, plus ``retry_after`` in
    whole seconds where the REST response would send a Retry-After header
    (rate limits, an open circuit breaker). Unknown errors are logged.
    """
    status, body, headers = error_payload(error)
    frame = {"type": "error", "id": client_id, **body}
    if "Retry-After" in headers:
        frame["retry_after"] = int(headers["Retry-After"])
    return status, frame


def error_frame(client_id: str | None, error: Exception) -> dict:
    return request_error(client_id, error)[1]


def authenticated_frame(client_id: str | None, key: ApiKey) -> dict:
    # The prefix identifies the key in the admin; the full key is never sent back.
    return {"type": "authenticated", "id": client_id, "key_prefix": key.prefix}


def cancelled_frame(client_id: str) -> dict:
    return {"type": "cancelled", "id": client_id}


def subscription_frame(frame_type: str, client_id: str | None, prompt: str) -> dict:
    return {"type": frame_type, "id": client_id, "prompt": prompt}


def prompt_activated_frame(client_id: str | None, event: dict[str, Any]) -> dict:
    return {
        "type": "prompt_activated",
        "id": client_id,
        "prompt": event["prompt"],
        "version": event["version"],
        "previous_version": event["previous_version"],
    }
