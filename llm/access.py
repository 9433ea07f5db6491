"""Access control of the chat endpoints: API keys, allow lists and rate limits.

A REST chat request goes through these steps, in this order:

1. ``request_api_key`` authenticates the Authorization header (401) before
   the body is read.
2. The view validates the body. A prompt endpoint calls
   ``keys.api_key_check_prompt`` before it renders the prompt, so a 404 or a
   400 reveals nothing about prompts the key may not use.
3. ``admit_model_call`` checks the final model against the key's allow list
   (403), then counts the request against the key's limits (429). Rejected
   requests of steps 1 and 2 therefore never use up the key's limits.
4. After the response, ``record_model_usage`` adds the tokens the provider
   reported to the key's token counters.

A websocket authenticates once, with ``websocket_api_key`` at the handshake
or, when the handshake carries no key, with its first frame. Then, for each
chat frame, it reloads its key with ``keys.api_key_recheck_async`` and runs
steps 2 to 4.
"""

from django.conf import settings
from django.http import HttpRequest

from llm.keys import (
    api_key_authenticate_async,
    api_key_check_model,
    api_key_from_header_async,
    websocket_bearer_token,
)
from llm.limits import (
    UNLIMITED,
    RateLimitDecision,
    check_request_async,
    record_usage_async,
)
from llm.models import ApiKey
from llm.providers.base import Usage


async def request_api_key(request: HttpRequest) -> ApiKey | None:
    """Authenticate an HTTP request by its ``Authorization: Bearer`` header.

    Returns None only under GATEWAY_AUTH=off when the request sends no key.
    The query string is never read, because URLs end up in access logs.
    Raises ApiKeyMissing, ApiKeyInvalid or ApiKeyRevoked (all 401).
    """
    authorization = request.headers.get("Authorization")
    if authorization is None and settings.GATEWAY_AUTH == "off":
        # Nothing to look up, so skip the database call's thread hop.
        return None
    return await api_key_from_header_async(authorization)


async def websocket_api_key(scope: dict) -> ApiKey | None:
    """Authenticate a websocket handshake by its header or bearer subprotocol.

    Returns None when the handshake carries no key, in either GATEWAY_AUTH
    mode, because the client may still send its key in an auth frame. Raises
    ApiKeyMissing, ApiKeyInvalid or ApiKeyRevoked (all 401) for a key that is
    malformed, unknown or revoked. The query string is never read.
    """
    raw = websocket_bearer_token(scope)
    if raw is None:
        return None
    return await api_key_authenticate_async(raw)


async def admit_model_call(key: ApiKey | None, model: str) -> RateLimitDecision:
    """Check that the key may call ``model``, then count one request of the key.

    Returns the X-RateLimit-* values for the response. Raises ApiKeyForbidden
    (403), or RateLimited or BudgetExceeded (429) with the values attached.
    """
    api_key_check_model(key, model)
    if key is None:
        # Requests without a key (GATEWAY_AUTH=off) have no limits to count.
        return UNLIMITED
    return await check_request_async(key)


async def record_model_usage(key: ApiKey | None, cache_status: str, usage: Usage):
    """Add the tokens of a model response to the key's minute and day counts.

    A cached response cost the provider nothing, so a cache hit adds nothing.
    """
    if key is None or cache_status.startswith("hit"):
        return
    await record_usage_async(key, usage.total_tokens)


async def check_metrics_access(request: HttpRequest) -> None:
    """Raise 401 unless the request may read /metrics.

    With METRICS_PUBLIC off (the default) a scraper needs a valid API key, as
    every other endpoint does, apart from /health and /ready.
    """
    if settings.METRICS_PUBLIC:
        return
    await request_api_key(request)
