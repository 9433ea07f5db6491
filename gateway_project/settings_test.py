"""Settings for the test suite: real Redis started privately, fast hashing."""

import os

from tests.redis_server import start_session_server

REDIS_SERVER = start_session_server()

os.environ.update(
    {
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": "test-only-secret-key-not-for-deployment",
        # The test client speaks plain HTTP, so a redirect to HTTPS would
        # answer every request with a 301.
        "SECURE_SSL_REDIRECT": "false",
        "REDIS_URL": REDIS_SERVER.url,
        "LOG_LEVEL": "info",
        # A test that forgets the fake Gemini server gets a refused connection
        # on the discard port instead of reaching the real vendor.
        "GEMINI_API_KEY": "test-gemini-key",
        "GEMINI_BASE_URL": "http://127.0.0.1:9",
        "UPSTREAM_RETRY_MAX_SECONDS": "0.5",
        "LLM_MODELS": "gemini-3.5-flash=gemini:8192,smollm2-135m-instruct=local:512",
        "DEFAULT_MODEL": "gemini-3.5-flash",
    }
)

from gateway_project.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DATABASES["default"] = {  # noqa: F405
    "ENGINE": "django.db.backends.sqlite3",
    "NAME": ":memory:",
}
