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
def _empty_caches():
    from django.core.cache import caches

    for alias in settings.CACHES:
        try:
            caches[alias].clear()
        except Exception:  # noqa: BLE001 - a stopped Redis leaves nothing to clear
            pass
    yield
