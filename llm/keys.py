"""Gateway API keys: creation, authentication and what each key may use.

Every authentication reads the key's row from the database, so a key revoked in
the admin is rejected on the next request in every process. No process caches
keys. Async callers use the ``*_async`` variants, which run the ORM through
``database_sync_to_async``.
"""

import hashlib
import hmac
import logging
import secrets
from datetime import timedelta

from channels.db import database_sync_to_async
from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from rest_framework import status

from gateway_project.errors import ApiError
from llm.models import ApiKey

logger = logging.getLogger(__name__)

KEY_PREFIX = "gw_"
# "gw_" and 8 random characters tell keys apart in the admin and logs. The
# rest of the key still carries about 208 random bits.
DISPLAY_PREFIX_LENGTH = len(KEY_PREFIX) + 8
_SECRET_BYTES = 32
# Longer values are rejected before hashing; real keys have 46 characters.
_MAX_KEY_LENGTH = 128
LAST_USED_INTERVAL = timedelta(minutes=1)
# Browsers cannot set headers on a websocket, so a browser client offers the
# subprotocols ["bearer", "<key>"] and the server accepts "bearer".
BEARER_SUBPROTOCOL = "bearer"


class ApiKeyMissing(ApiError):
    """The request carries no usable API key."""

    status_code = status.HTTP_401_UNAUTHORIZED
    default_code = "unauthenticated"
    default_detail = (
        "An API key is required: send the header `Authorization: Bearer <key>`."
    )


class ApiKeyInvalid(ApiKeyMissing):
    """The API key matches no key of the gateway."""

    default_detail = (
        "The API key is not valid: check that it was copied whole, or ask an "
        "administrator for a new one."
    )


class ApiKeyRevoked(ApiError):
    """The API key was revoked by an administrator."""

    status_code = status.HTTP_401_UNAUTHORIZED
    default_code = "key_revoked"
    default_detail = "The API key was revoked: ask an administrator for a new one."


class ApiKeyForbidden(ApiError):
    """The API key is valid but may not use the requested model or prompt."""

    status_code = status.HTTP_403_FORBIDDEN
    default_code = "forbidden"
    default_detail = "This API key may not do that."


def hash_key(raw: str) -> str:
    """Return the hex SHA-256 of a key.

    A plain hash is enough because the key carries 256 random bits, so there is
    no dictionary to precompute, unlike with passwords.
    """
    return hashlib.sha256(raw.encode()).hexdigest()


def _new_raw_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


def api_key_create(
    *,
    name: str,
    owner=None,
    allowed_models: list[str] | None = None,
    allowed_prompts: list[str] | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    tokens_per_day: int | None = None,
) -> tuple[ApiKey, str]:
    """Create a key and return it with the full key, which is never stored.

    Raises django.core.exceptions.ValidationError naming the invalid field.
    """
    key = ApiKey(
        name=name,
        owner=owner,
        allowed_models=list(allowed_models or []),
        allowed_prompts=list(allowed_prompts or []),
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        tokens_per_day=tokens_per_day,
    )
    raw_key = api_key_assign_secret(key)
    key.full_clean()
    key.save()
    logger.info("Created API key %s (%s)", key.prefix, key.name)
    return key, raw_key


def api_key_assign_secret(key: ApiKey) -> str:
    """Set a new secret's prefix and hash on an unsaved key; return the full key."""
    raw_key = _new_raw_key()
    key.prefix = raw_key[:DISPLAY_PREFIX_LENGTH]
    key.key_hash = hash_key(raw_key)
    return raw_key


def api_key_revoke(key: ApiKey) -> None:
    """Revoke a key for good. Revoking a revoked key changes nothing."""
    if key.revoked:
        return
    key.revoked = True
    key.revoked_at = timezone.now()
    key.save(update_fields=["revoked", "revoked_at"])
    logger.info("Revoked API key %s (%s)", key.prefix, key.name)


def api_key_authenticate(raw: str | None) -> ApiKey:
    """Return the live key for a full key sent by a client.

    Raises ApiKeyMissing, ApiKeyInvalid or ApiKeyRevoked (all 401). Records the
    use in ``last_used_at`` at most once per LAST_USED_INTERVAL.
    """
    if raw is None or not raw.strip():
        raise ApiKeyMissing()
    raw = raw.strip()
    if not raw.startswith(KEY_PREFIX) or len(raw) > _MAX_KEY_LENGTH:
        raise ApiKeyInvalid()

    # The lookup goes by the non-secret prefix and the hash is compared in
    # constant time, so response timing reveals nothing about the secret part.
    digest = hash_key(raw)
    key = None
    for candidate in ApiKey.objects.filter(prefix=raw[:DISPLAY_PREFIX_LENGTH]):
        if hmac.compare_digest(candidate.key_hash, digest):
            key = candidate
    if key is None:
        raise ApiKeyInvalid()
    if key.revoked:
        raise _revoked_error(key)

    _record_use(key)
    return key


def api_key_recheck(key: ApiKey | None) -> ApiKey | None:
    """Reload a key that authenticated a long-lived connection.

    Call it once per chat frame of a websocket, so that a revoked or deleted
    key stops working on the next frame and changed limits apply at once.
    Raises ApiKeyInvalid or ApiKeyRevoked (401).
    """
    if key is None:
        return None
    fresh = ApiKey.objects.filter(pk=key.pk).first()
    if fresh is None:
        raise ApiKeyInvalid(
            "The API key was deleted: ask an administrator for a new one."
        )
    if fresh.revoked:
        raise _revoked_error(fresh)

    _record_use(fresh)
    return fresh


def _revoked_error(key: ApiKey) -> ApiKeyRevoked:
    return ApiKeyRevoked(
        f"The API key {key.prefix}… was revoked: ask an administrator for a new one."
    )


def _record_use(key: ApiKey) -> None:
    # One write a minute per key at most, however many processes serve it: the
    # UPDATE matches only a row whose stamp is older than the interval.
    now = timezone.now()
    if key.last_used_at and now - key.last_used_at < LAST_USED_INTERVAL:
        return
    stale = Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_INTERVAL)
    ApiKey.objects.filter(stale, pk=key.pk).update(last_used_at=now)
    key.last_used_at = now


def bearer_token(authorization: str | None) -> str | None:
    """Return the key in an ``Authorization: Bearer <key>`` header value.

    Returns None when the header is absent or empty. Raises ApiKeyMissing for
    another scheme or a missing token. The value itself never appears in the
    message, because it may be a secret.
    """
    if authorization is None or not authorization.strip():
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiKeyMissing(
            "The Authorization header is malformed: send `Authorization: Bearer <key>`."
        )
    return token.strip()


def websocket_bearer_token(scope: dict) -> str | None:
    """Return the key of a websocket handshake, or None if it sent none.

    Reads the Authorization header first. Browsers cannot set that header, so a
    client may instead offer the subprotocols ``["bearer", "<key>"]``. The
    consumer must then accept with ``subprotocol=BEARER_SUBPROTOCOL``, never
    echoing the key. The query string is never read, because URLs end up in
    access logs and browser history.
    """
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return bearer_token(value.decode("latin-1"))

    subprotocols = list(scope.get("subprotocols") or [])
    if BEARER_SUBPROTOCOL in subprotocols:
        others = [item for item in subprotocols if item != BEARER_SUBPROTOCOL]
        if len(others) != 1:
            raise ApiKeyMissing(
                "The websocket subprotocols are malformed: offer exactly "
                '["bearer", "<key>"], or send `Authorization: Bearer <key>`.'
            )
        return others[0]
    return None


def api_key_from_header(authorization: str | None) -> ApiKey | None:
    """Authenticate a request by its Authorization header value.

    Returns None only when GATEWAY_AUTH is "off" and the request sent no key. A
    key that is sent is always checked, so a revoked key fails in either mode.
    """
    raw = bearer_token(authorization)
    if raw is None and settings.GATEWAY_AUTH == "off":
        return None
    return api_key_authenticate(raw)


def api_key_from_scope(scope: dict) -> ApiKey | None:
    """Authenticate a websocket handshake; None as in ``api_key_from_header``."""
    raw = websocket_bearer_token(scope)
    if raw is None and settings.GATEWAY_AUTH == "off":
        return None
    return api_key_authenticate(raw)


api_key_authenticate_async = database_sync_to_async(api_key_authenticate)
api_key_from_header_async = database_sync_to_async(api_key_from_header)
api_key_from_scope_async = database_sync_to_async(api_key_from_scope)
api_key_recheck_async = database_sync_to_async(api_key_recheck)


def api_key_check_model(key: ApiKey | None, model: str) -> None:
    """Raise ApiKeyForbidden unless the key may call the model.

    A key with an empty allow list, and the absent key of GATEWAY_AUTH=off, may
    call every model.
    """
    if key is None or not key.allowed_models or model in key.allowed_models:
        return
    raise ApiKeyForbidden(
        f"This API key may not use model {model!r}; it may use "
        f"{', '.join(key.allowed_models)}. Ask an administrator to add the model "
        "to the key's allowed models.",
        field="model",
    )


def api_key_check_prompt(key: ApiKey | None, name: str) -> None:
    """Raise ApiKeyForbidden unless the key may render the registry prompt."""
    if key is None or not key.allowed_prompts or name in key.allowed_prompts:
        return
    raise ApiKeyForbidden(
        f"This API key may not use prompt {name!r}; it may use "
        f"{', '.join(key.allowed_prompts)}. Ask an administrator to add the prompt "
        "to the key's allowed prompts."
    )


def cache_scope_for(key: ApiKey | None) -> str | None:
    """Return the part of a cache key that keeps this API key's entries apart.

    None means cached responses are shared between keys (CACHE_SCOPE=shared, or no key
    under GATEWAY_AUTH=off).
    """
    if settings.CACHE_SCOPE == "per_key" and key is not None:
        return f"key:{key.pk}"
    return None
