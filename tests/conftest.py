import pytest
from django.conf import settings


@pytest.fixture
def redis_server():
    """The suite's Redis server; a test may stop it, and it is running again after."""
    server = settings.REDIS_SERVER
    yield server
    if not server.running:
        server.start()


@pytest.fixture
def fake_gemini(settings):
    """A fake Gemini server on 127.0.0.1 that GEMINI_BASE_URL points at."""
    from tests.fake_gemini import FakeGemini

    server = FakeGemini()
    server.start()
    settings.GEMINI_BASE_URL = server.base_url
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_breakers_and_limiter():
    """Closed breakers and a new rate limiter, built from the test's settings."""
    from llm.breaker import breakers_reset
    from llm.limits import rate_limiter_reset

    breakers_reset()
    rate_limiter_reset()
    yield
    breakers_reset()
    rate_limiter_reset()


@pytest.fixture
def gateway_key(transactional_db):
    """A gateway API key without limits, sent by the helpers in chat_support.

    The key is committed (transactional_db), because async views read it
    through another thread's database connection.
    """
    from llm.keys import api_key_create
    from tests import chat_support

    _, raw_key = api_key_create(name="chat tests")
    chat_support.use_api_key(raw_key)
    yield raw_key
    chat_support.use_api_key(None)


@pytest.fixture(autouse=True)
def _empty_caches():
    from django.core.cache import caches

    for alias in settings.CACHES:
        try:
            caches[alias].clear()
        except Exception:  # noqa: BLE001 - a stopped Redis leaves nothing to clear
            pass
    yield
