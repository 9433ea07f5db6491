import secrets

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


# Personas for the access tests of REST and websockets. They need a database
# that tests may write, so tests that use them mark django_db themselves.
LIMITED_MODEL = "gemini-3.5-flash"
LIMITED_PROMPT = "greeting"
# 23:53:20 UTC: 20 s into a minute, 400 s before midnight.
LIMITER_START = 11574 * 86400 + 86000.0


@pytest.fixture
def owner_key() -> str:
    """A key that may use every model and prompt, without limits."""
    from llm.keys import api_key_create

    _, raw_key = api_key_create(name="owner")
    return raw_key


@pytest.fixture
def limited_key() -> str:
    """A key allowed only LIMITED_MODEL and the prompt LIMITED_PROMPT."""
    from llm.keys import api_key_create

    _, raw_key = api_key_create(
        name="limited",
        allowed_models=[LIMITED_MODEL],
        allowed_prompts=[LIMITED_PROMPT],
    )
    return raw_key


@pytest.fixture
def revoked_key() -> str:
    from llm.keys import api_key_create, api_key_revoke

    key, raw_key = api_key_create(name="revoked")
    api_key_revoke(key)
    return raw_key


@pytest.fixture
def outsider() -> str:
    """A key shaped like a real one (prefix, length, alphabet), never issued."""
    return "gw_" + secrets.token_urlsafe(32)


@pytest.fixture
def clock():
    """The rate limiter's clock, which tests move by hand."""
    from llm.limits import rate_limiter_reset
    from tests.fake_clock import FakeClock

    clock = FakeClock(LIMITER_START)
    rate_limiter_reset(clock=clock)
    return clock


@pytest.fixture
def breaker_clock(settings):
    """The breakers' clock, with a threshold of 2 and a cool-down of 5 s."""
    from llm.breaker import breakers_reset
    from tests.fake_clock import FakeClock

    settings.BREAKER_FAILURE_THRESHOLD = 2
    settings.BREAKER_COOLDOWN_SECONDS = 5
    clock = FakeClock(1000.0)
    breakers_reset(clock=clock)
    return clock
