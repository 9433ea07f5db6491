"""Chat completions: cache lookup, provider call, cache write and metrics.

REST views and the websocket consumer both call ``chat_complete`` and
``chat_stream``, so caching and accounting behave the same on every transport.
"""

import logging
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from gateway_project.errors import ApiError, InvalidField
from llm.breaker import breaker_for
from llm.cache import CachedAnswer, cache_get, cache_key, cache_set
from llm.errors import UpstreamBadResponse
from llm.metrics import TOKENS, UPSTREAM_ERRORS, UPSTREAM_LATENCY
from llm.providers import get_provider, provider_name, resolve_model
from llm.providers.base import Completion, GenerationRequest, StreamEnd, Usage
from llm.serializers import GENERATION_OPTIONS, max_tokens_problem
from prompts_registry.selectors import RenderedPrompt, prompt_render

logger = logging.getLogger(__name__)

CACHE_MISS = "miss"
CACHE_BYPASS = "bypass"
# A cached answer replayed on a stream is sent in about this many chunks.
_REPLAY_CHUNKS = 4


@dataclass
class ChatResult:
    text: str
    model: str
    finish_reason: str
    usage: Usage
    # "hit-l1", "hit-l2", "miss" or "bypass".
    cache_status: str
    latency: float  # seconds

    @property
    def cached(self) -> bool:
        return self.cache_status.startswith("hit")


@dataclass
class StreamStart:
    """First item of ``chat_stream``, sent once the cache lookup is done."""

    model: str
    cache_status: str


@dataclass
class StreamDone:
    """Last item of ``chat_stream``: the metadata of the whole answer."""

    model: str
    finish_reason: str
    usage: Usage
    cache_status: str
    latency: float  # seconds


async def chat_complete(
    request: GenerationRequest,
    *,
    use_cache: bool = True,
    cache_scope: str | None = None,
) -> ChatResult:
    """Return the model's response to ``request``, from the cache when possible.

    ``cache_scope`` keeps the cache entries of one scope (an API key, say)
    apart from the others. Raises llm.errors.LLMError subclasses when the
    provider fails, and InvalidField when the vendor rejects a parameter.
    """
    started = time.perf_counter()
    key = _cache_key_or_none(request, use_cache, cache_scope)
    if key is not None:
        answer, tier = await cache_get(key)
        if answer is not None:
            return ChatResult(
                text=answer.text,
                model=answer.model,
                finish_reason=answer.finish_reason,
                usage=answer.usage,
                cache_status=f"hit-{tier}",
                latency=time.perf_counter() - started,
            )

    completion = await _provider_complete(request)
    if key is not None and _is_cacheable(completion):
        await cache_set(key, _cached_answer(completion))
    return ChatResult(
        text=completion.text,
        model=completion.model,
        finish_reason=completion.finish_reason,
        usage=completion.usage,
        cache_status=CACHE_MISS if key is not None else CACHE_BYPASS,
        latency=time.perf_counter() - started,
    )


async def chat_stream(
    request: GenerationRequest,
    *,
    use_cache: bool = True,
    cache_scope: str | None = None,
) -> AsyncIterator[StreamStart | str | StreamDone]:
    """Yield StreamStart, the answer's text chunks, then StreamDone.

    A cached answer is replayed as a few chunks. Closing this generator early
    (``aclose`` or task cancellation) closes the provider's stream, which stops
    the vendor call, and caches nothing. ``cache_scope`` works as in
    ``chat_complete``. Raises llm.errors.LLMError subclasses.
    """
    started = time.perf_counter()
    key = _cache_key_or_none(request, use_cache, cache_scope)
    if key is not None:
        answer, tier = await cache_get(key)
        if answer is not None:
            cache_status = f"hit-{tier}"
            yield StreamStart(model=answer.model, cache_status=cache_status)
            for piece in replay_chunks(answer.text):
                yield piece
            yield StreamDone(
                model=answer.model,
                finish_reason=answer.finish_reason,
                usage=answer.usage,
                cache_status=cache_status,
                latency=time.perf_counter() - started,
            )
            return

    cache_status = CACHE_MISS if key is not None else CACHE_BYPASS
    provider = get_provider(request.model)
    # The breaker is entered before StreamStart, so an open circuit fails the
    # request before a view sends any byte. Its scope ends before StreamDone,
    # because a caller that closes this generator after the last item would
    # otherwise turn a finished call into a cancelled one.
    async with breaker_for(provider_name(request.model)) as breaker_call:
        yield StreamStart(model=request.model, cache_status=cache_status)

        upstream = provider.stream(request)
        upstream_started = time.perf_counter()
        pieces: list[str] = []
        end: StreamEnd | None = None
        try:
            async for item in upstream:
                if isinstance(item, StreamEnd):
                    end = item
                    continue
                pieces.append(item)
                breaker_call.provider_responded()
                yield item
        except ApiError as error:
            UPSTREAM_ERRORS.labels(code=error.code).inc()
            raise
        finally:
            # This runs on a normal end, on errors, and when this generator is
            # closed or cancelled at a yield. Closing the provider's generator
            # stops the vendor call it still has open.
            await upstream.aclose()

        if end is None:
            UPSTREAM_ERRORS.labels(code=UpstreamBadResponse.default_code).inc()
            raise UpstreamBadResponse(
                "The model provider ended the stream without a final status; retry."
            )
    _record_upstream_success(request.model, end.usage, upstream_started)
    completion = Completion(
        text="".join(pieces),
        model=end.model,
        finish_reason=end.finish_reason,
        usage=end.usage,
    )
    if key is not None and _is_cacheable(completion):
        await cache_set(key, _cached_answer(completion))
    yield StreamDone(
        model=end.model,
        finish_reason=end.finish_reason,
        usage=end.usage,
        cache_status=cache_status,
        latency=time.perf_counter() - started,
    )


def _cache_key_or_none(
    request: GenerationRequest, use_cache: bool, cache_scope: str | None
) -> str | None:
    if not use_cache:
        return None
    return cache_key(request, provider_name(request.model), cache_scope)


async def _provider_complete(request: GenerationRequest) -> Completion:
    provider = get_provider(request.model)
    # An open breaker raises circuit_open here, before the provider is called,
    # so that error is not counted among the provider's errors.
    async with breaker_for(provider_name(request.model)):
        started = time.perf_counter()
        try:
            completion = await provider.complete(request)
        except ApiError as error:
            UPSTREAM_ERRORS.labels(code=error.code).inc()
            raise
    _record_upstream_success(request.model, completion.usage, started)
    return completion


def _record_upstream_success(model: str, usage: Usage, started: float) -> None:
    UPSTREAM_LATENCY.labels(model=model).observe(time.perf_counter() - started)
    TOKENS.labels(model=model, kind="prompt").inc(usage.prompt_tokens)
    TOKENS.labels(model=model, kind="completion").inc(usage.completion_tokens)


def _is_cacheable(completion: Completion) -> bool:
    """Return whether a completion is complete enough to replay to later callers.

    A truncated, blocked, failed or cancelled answer, and one without text,
    would be replayed to every later caller of the same request, so only an
    answer with text and finish reason "stop" is cached.
    """
    return completion.finish_reason == "stop" and bool(completion.text.strip())


def _cached_answer(completion: Completion) -> CachedAnswer:
    return CachedAnswer(
        text=completion.text,
        model=completion.model,
        finish_reason=completion.finish_reason,
        usage=completion.usage,
    )


def replay_chunks(text: str, count: int = _REPLAY_CHUNKS) -> list[str]:
    """Split ``text`` into about ``count`` pieces that join back to ``text``.

    Cuts fall at word starts where the text has spaces, else anywhere.
    """
    if not text:
        return []
    target = max(1, math.ceil(len(text) / count))
    pieces = []
    start = 0
    for match in re.finditer(r"\s+(?=\S)", text):
        if match.end() - start >= target:
            pieces.append(text[start : match.end()])
            start = match.end()
    pieces.append(text[start:])
    if len(pieces) == 1 and len(text) > target:
        pieces = [text[index : index + target] for index in range(0, len(text), target)]
    return pieces


async def prompt_chat_request(
    *,
    name: str,
    variables: dict,
    version: int | None,
    overrides: dict[str, Any],
) -> tuple[RenderedPrompt, GenerationRequest]:
    """Render a registry prompt and build the model request it describes.

    The version's model and parameters apply unless ``overrides`` sets them.
    Raises NotFound for an unknown prompt or version, and InvalidField for bad
    variables, a rendered text above the length limits or a max_tokens above
    the model's limit.
    """
    rendered = await database_sync_to_async(prompt_render)(
        name=name, variables=variables, version=version
    )

    options = {
        option: value
        for option, value in rendered.parameters.items()
        if option in GENERATION_OPTIONS and value is not None
    }
    options.update(overrides)
    model = options.pop("model", None)
    if model is None and rendered.model and rendered.model not in settings.LLM_MODELS:
        # The caller sent no model, so an error naming the request's field
        # alone would point at the wrong place.
        raise InvalidField(
            f"Prompt {rendered.name} v{rendered.version} names model "
            f"{rendered.model!r}, which this gateway does not serve: send a "
            f"model override ({', '.join(sorted(settings.LLM_MODELS))}), or "
            "serve that model through LLM_MODELS.",
            field="model",
        )
    model = resolve_model(model or rendered.model)
    problem = max_tokens_problem(options.get("max_tokens"), model)
    if problem:
        source = "request" if "max_tokens" in overrides else "prompt version"
        raise InvalidField(
            f"max_tokens: {problem} The value comes from the {source}; "
            "send a smaller max_tokens.",
            field="max_tokens",
        )

    generation = GenerationRequest(
        model=model,
        prompt=rendered.user,
        system=rendered.system or None,
        **options,
    )
    return rendered, generation
