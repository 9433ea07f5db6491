"""Cross-origin access from browsers, through django-cors-headers."""

import pytest
from django.conf import settings
from django.test import AsyncClient, Client
from django.utils.module_loading import import_string

from tests.chat_support import post_json

ALLOWED_ORIGIN = "https://app.example.com"
OTHER_ORIGIN = "https://evil.example.net"
EXPOSED_HEADERS = (
    "X-Request-ID, X-Cache, Retry-After, X-RateLimit-Limit, "
    "X-RateLimit-Remaining, X-RateLimit-Reset"
)


@pytest.fixture(autouse=True)
def allowed_origin(settings):
    settings.CORS_ALLOWED_ORIGINS = [ALLOWED_ORIGIN]


def preflight(origin: str):
    return Client().options(
        "/chat",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_preflight_from_allowed_origin():
    response = preflight(ALLOWED_ORIGIN)

    assert response.status_code == 200
    assert response["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert response["Access-Control-Allow-Methods"] == "GET, HEAD, OPTIONS, POST"
    assert response["Access-Control-Allow-Headers"] == (
        "authorization, content-type, x-request-id, cache-control"
    )
    assert "Access-Control-Allow-Credentials" not in response
    assert response["X-Request-ID"]


def test_preflight_from_other_origin_gets_no_cors_headers():
    response = preflight(OTHER_ORIGIN)

    cors_headers = [name for name in response.headers if name.startswith("Access-")]
    assert cors_headers == []


async def test_chat_response_to_allowed_origin(fake_gemini, gateway_key):
    response = await post_json("/chat", {"prompt": "Hi"}, origin=ALLOWED_ORIGIN)

    assert response.status_code == 200
    assert response["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert response["Access-Control-Expose-Headers"] == EXPOSED_HEADERS
    assert response["X-Cache"] == "miss"


async def test_chat_response_to_other_origin(fake_gemini, gateway_key):
    response = await post_json("/chat", {"prompt": "Hi"}, origin=OTHER_ORIGIN)

    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response
    assert "Access-Control-Expose-Headers" not in response


async def test_error_response_to_allowed_origin():
    response = await AsyncClient().get("/chat", headers={"Origin": ALLOWED_ORIGIN})

    assert response.status_code == 405
    assert response["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN


def test_no_origin_is_allowed_by_default(settings):
    settings.CORS_ALLOWED_ORIGINS = []

    response = preflight(ALLOWED_ORIGIN)

    assert "Access-Control-Allow-Origin" not in response


def test_every_middleware_is_async_capable():
    # A sync-only middleware would make Django run async views on a thread.
    sync_only = [
        path
        for path in settings.MIDDLEWARE
        if not getattr(import_string(path), "async_capable", False)
    ]

    assert sync_only == []
