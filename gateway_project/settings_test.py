"""Settings for the test suite: real Redis started privately, fast hashing."""

import os

from tests.redis_server import start_session_server

REDIS_SERVER = start_session_server()

os.environ.update(
    {
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": "test-only-secret-key-not-for-deployment",
        "REDIS_URL": REDIS_SERVER.url,
        "LOG_LEVEL": "info",
    }
)

from gateway_project.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DATABASES["default"] = {  # noqa: F405
    "ENGINE": "django.db.backends.sqlite3",
    "NAME": ":memory:",
}
