"""Django settings for the LLM gateway.

Every deployment-specific value comes from an environment variable read through
``gateway_project.env``. The defaults run the gateway on one machine with
SQLite, the local model and no Redis.
"""

import secrets
from pathlib import Path
from urllib.parse import urlparse

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from gateway_project.env import (
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DJANGO_DEBUG", False)


def _secret_key() -> str:
    key = env_str("DJANGO_SECRET_KEY")
    if key:
        return key
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is required when DJANGO_DEBUG is false: set it to a "
            "long random string, or set DJANGO_DEBUG=true for local development "
            "(make manage ARGS=... does)."
        )
    # A local key survives restarts, so admin sessions stay valid between runs.
    key_file = BASE_DIR / ".secret_key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "channels",
    "corsheaders",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "prompts_registry",
    "llm",
]

MIDDLEWARE = [
    "gateway_project.middleware.RequestIdMiddleware",
    # Before every middleware that can respond, so preflights and error
    # responses carry the CORS headers too.
    "corsheaders.middleware.CorsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Subclasses of Django's middlewares whose hooks run on the event loop
    # rather than in a worker thread; see gateway_project/middleware.py.
    "gateway_project.middleware.SessionMiddleware",
    "gateway_project.middleware.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "gateway_project.middleware.AuthenticationMiddleware",
    "gateway_project.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "gateway_project.urls"
WSGI_APPLICATION = "gateway_project.wsgi.application"
ASGI_APPLICATION = "gateway_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict:
    url = env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}")
    try:
        config = dj_database_url.parse(url, conn_max_age=60)
    except (ValueError, KeyError) as error:
        raise ImproperlyConfigured(
            f"DATABASE_URL is not a valid database URL ({error}): use for example "
            "postgres://user:password@host:5432/name or sqlite:////path/db.sqlite3."
        ) from None
    return config


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {
        "NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"  # noqa: E501
    },
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# HTTPS and browser security headers. With DEBUG on, the gateway serves plain
# HTTP on loopback, so the HTTPS-only settings apply only with DEBUG off.
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
# Origins allowed to POST forms to the admin, e.g. https://gateway.example.com.
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
CSRF_FAILURE_VIEW = "gateway_project.errors.csrf_failure"

if not DEBUG:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    # Load balancers probe these over plain HTTP and count a redirect as a
    # failure. The patterns match the path without its leading slash.
    SECURE_REDIRECT_EXEMPT = [r"^health$", r"^ready$"]
    if env_bool("TRUST_X_FORWARDED_PROTO", False):
        # Safe only behind a proxy that overwrites X-Forwarded-Proto: a client
        # that reaches daphne directly could otherwise claim HTTPS.
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    # Preloading is opt-in: once browsers ship a domain in their preload list,
    # removing it takes months. Without it, check --deploy's W021 only reports
    # that the site cannot be submitted to that list, so it is silenced.
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
    if not SECURE_HSTS_PRELOAD:
        SILENCED_SYSTEM_CHECKS = ["security.W021"]

# Browser pages on these origins (https://app.example.com) may call the API.
# Empty allows no cross-origin access. Keys travel in the Authorization
# header, never in cookies, so credentials stay off.
CORS_ALLOWED_ORIGINS = env_list("CORS_ALLOWED_ORIGINS", [])
CORS_ALLOW_METHODS = ["GET", "HEAD", "OPTIONS", "POST"]
CORS_ALLOW_HEADERS = ["authorization", "content-type", "x-request-id", "cache-control"]
CORS_EXPOSE_HEADERS = [
    "X-Request-ID",
    "X-Cache",
    "Retry-After",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
]


# Redis is optional: without it the response cache has one tier and the
# channel layer lives in process memory.
def _redis_url() -> str | None:
    url = env_str("REDIS_URL")
    if url is None:
        return None
    if urlparse(url).scheme not in {"redis", "rediss", "unix"}:
        raise ImproperlyConfigured(
            f"REDIS_URL={url!r} is not a Redis URL: use redis://host:6379/0."
        )
    return url


REDIS_URL = _redis_url()
# Short timeouts make a dead or slow Redis a cache miss instead of a stall.
REDIS_TIMEOUT_SECONDS = env_float("REDIS_TIMEOUT_SECONDS", 0.25, minimum=0.01)

CACHE_TTL_SECONDS = env_int("CACHE_TTL_SECONDS", 86400, minimum=1)
# L1 must never outlive L2, or a process could serve a response that Redis has expired.
CACHE_L1_TTL_SECONDS = min(
    env_int("CACHE_L1_TTL_SECONDS", 300, minimum=1), CACHE_TTL_SECONDS
)
CACHE_L1_MAX_ENTRIES = env_int("CACHE_L1_MAX_ENTRIES", 1000, minimum=1)
# After a Redis failure the cache skips L2 for this long, so requests do not
# each wait for the connect timeout while Redis is down.
CACHE_L2_RETRY_SECONDS = env_float("CACHE_L2_RETRY_SECONDS", 2.0, minimum=0)
# Repeated Redis failures are logged once per interval, with their count.
CACHE_L2_WARNING_INTERVAL_SECONDS = env_float(
    "CACHE_L2_WARNING_INTERVAL_SECONDS", 30.0, minimum=0
)

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
        "LOCATION": "default",
    },
    "l1": {
        "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
        "LOCATION": "llm-l1",
        "TIMEOUT": CACHE_L1_TTL_SECONDS,
        "OPTIONS": {"MAX_ENTRIES": CACHE_L1_MAX_ENTRIES},
    },
}
if REDIS_URL:
    CACHES["l2"] = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "TIMEOUT": CACHE_TTL_SECONDS,
        "KEY_PREFIX": "llmgw:l2",
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.DefaultClient",
            "SOCKET_CONNECT_TIMEOUT": REDIS_TIMEOUT_SECONDS,
            "SOCKET_TIMEOUT": REDIS_TIMEOUT_SECONDS,
            # Values are stored as JSON text, never as pickles.
            "SERIALIZER": "django_redis.serializers.json.JSONSerializer",
        },
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 reads with a 5 s socket timeout by default, which cuts
            # channels_redis's 5 s blocking BZPOPMIN and fails every idle
            # consumer's receive. The read timeout must outlast the pop.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 15}]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

PROMPTS_DIR = Path(env_str("PROMPTS_DIR", str(BASE_DIR / "fixtures" / "prompts")))
# sync_prompts rejects a prompt file larger than this, in bytes, before parsing it.
PROMPT_FILE_MAX_BYTES = env_int("PROMPT_FILE_MAX_BYTES", 256 * 1024, minimum=1024)

REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # The same JSON rules as the chat views and the websocket.
    "DEFAULT_PARSER_CLASSES": ["gateway_project.json_body.JSONBodyParser"],
    # \u escapes for every non-ASCII character, as JsonResponse writes them,
    # so a lone surrogate in a response cannot fail UTF-8 encoding.
    "UNICODE_JSON": False,
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
    "EXCEPTION_HANDLER": "gateway_project.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# The OpenAPI document at /schema and Swagger UI at /docs. The Swagger UI
# assets come from drf-spectacular-sidecar's static files, so /docs works
# without internet access.
SPECTACULAR_SETTINGS = {
    "TITLE": "LLM gateway API",
    "DESCRIPTION": (
        "Chat with language models, stream their answers and render versioned "
        "prompts. Send `Authorization: Bearer <key>` to every endpoint except "
        "/health and /ready, and to /metrics unless METRICS_PUBLIC is true."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "PREPROCESSING_HOOKS": ["gateway_project.openapi.add_plain_view_endpoints"],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "gateway_project.openapi.add_security",
    ],
}

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def gateway_auth_mode(*, debug: bool, allowed_hosts: list[str]) -> str:
    """Read GATEWAY_AUTH and raise ImproperlyConfigured if "off" is unsafe.

    Settings cannot see the address the server binds, so "off" is accepted only
    together with DJANGO_DEBUG=true and ALLOWED_HOSTS naming loopback hosts alone.
    This stops a deployment from running without keys by mistake, but it is no
    network boundary: a client that reaches the port can still send
    ``Host: localhost``, so the server must also bind a loopback address.
    """
    mode = env_choice("GATEWAY_AUTH", "required", ("required", "off"))
    if mode == "required":
        return mode
    problems = []
    if not debug:
        problems.append("DJANGO_DEBUG is false")
    if not allowed_hosts or not set(allowed_hosts) <= LOOPBACK_HOSTS:
        problems.append(f"ALLOWED_HOSTS is {','.join(allowed_hosts) or 'empty'}")
    if problems:
        raise ImproperlyConfigured(
            f"GATEWAY_AUTH=off is rejected because {' and '.join(problems)}. "
            "Without keys anyone who reaches the gateway can use it, so off requires "
            "DJANGO_DEBUG=true and ALLOWED_HOSTS limited to "
            f"{', '.join(sorted(LOOPBACK_HOSTS))}. Otherwise set "
            "GATEWAY_AUTH=required and create a key with `manage.py create_api_key`."
        )
    return mode


# Gateway API keys and their limits.
GATEWAY_AUTH = gateway_auth_mode(debug=DEBUG, allowed_hosts=ALLOWED_HOSTS)
# "per_key" keeps each API key's cached responses apart from every other key's.
CACHE_SCOPE = env_choice("CACHE_SCOPE", "shared", ("shared", "per_key"))
RATE_LIMIT_WINDOW_SECONDS = env_int("RATE_LIMIT_WINDOW_SECONDS", 60, minimum=1)
BREAKER_FAILURE_THRESHOLD = env_int("BREAKER_FAILURE_THRESHOLD", 5, minimum=1)
BREAKER_COOLDOWN_SECONDS = env_float("BREAKER_COOLDOWN_SECONDS", 30.0, minimum=0.1)
# /metrics requires an API key unless this is true. Prometheus sends one with
# `authorization: {type: Bearer, credentials_file: ...}` in its scrape config;
# set true only when /metrics is reachable from an internal network alone.
METRICS_PUBLIC = env_bool("METRICS_PUBLIC", False)
MAX_REQUEST_BYTES = env_int("MAX_REQUEST_BYTES", 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BYTES

# Language models. A model name maps to the provider that serves it; the
# optional number after a colon is the largest max_tokens a request may ask for.
GEMINI_API_KEY = env_str("GEMINI_API_KEY")
GEMINI_BASE_URL = env_str("GEMINI_BASE_URL")
GEMINI_TIMEOUT_SECONDS = env_float("GEMINI_TIMEOUT_SECONDS", 60.0, minimum=0.1)
# Connections open to Gemini at once, per process. Each stream uses one for
# its whole length. Calls beyond the limit wait for a free connection.
GEMINI_MAX_CONNECTIONS = env_int("GEMINI_MAX_CONNECTIONS", 1000, minimum=1)
# Retries of 429, 5xx and network errors stop once this much time has passed.
UPSTREAM_RETRY_MAX_SECONDS = env_float("UPSTREAM_RETRY_MAX_SECONDS", 8.0, minimum=0)

LOCAL_MODEL_NAME = "smollm2-135m-instruct"
LOCAL_MODEL_PATH = env_str("LOCAL_MODEL_PATH")
LOCAL_MODEL_QUEUE_SIZE = env_int("LOCAL_MODEL_QUEUE_SIZE", 8, minimum=1)
LOCAL_MODEL_CONTEXT_TOKENS = env_int("LOCAL_MODEL_CONTEXT_TOKENS", 2048, minimum=256)


def _served_models() -> dict[str, dict]:
    default_spec = f"{LOCAL_MODEL_NAME}=local:1024"
    if GEMINI_API_KEY:
        default_spec = f"gemini-3.5-flash=gemini:8192,{default_spec}"
    models = {}
    for item in env_list("LLM_MODELS", default_spec.split(",")):
        name, _, rest = item.partition("=")
        provider, _, limit = rest.partition(":")
        if not name or provider not in {"gemini", "local"}:
            raise ImproperlyConfigured(
                f"LLM_MODELS entry {item!r} is invalid: write name=provider or "
                "name=provider:max_tokens, with provider gemini or local."
            )
        try:
            max_tokens = int(limit) if limit else 8192
        except ValueError:
            raise ImproperlyConfigured(
                f"LLM_MODELS entry {item!r} has a max_tokens that is not a number."
            ) from None
        models[name.strip()] = {"provider": provider, "max_tokens": max_tokens}
    return models


LLM_MODELS = _served_models()
DEFAULT_MODEL = env_str(
    "DEFAULT_MODEL", "gemini-3.5-flash" if GEMINI_API_KEY else LOCAL_MODEL_NAME
)
if DEFAULT_MODEL not in LLM_MODELS:
    raise ImproperlyConfigured(
        f"DEFAULT_MODEL={DEFAULT_MODEL!r} is not served: choose one of "
        f"{', '.join(sorted(LLM_MODELS))} or add it to LLM_MODELS."
    )

CHAT_MAX_PROMPT_CHARS = env_int("CHAT_MAX_PROMPT_CHARS", 32000, minimum=1)
CHAT_MAX_SYSTEM_CHARS = env_int("CHAT_MAX_SYSTEM_CHARS", 8000, minimum=1)

# Chat websocket: the requests one connection may stream at once, and the
# largest client frame in bytes (a larger one closes the connection with 4009).
WS_MAX_IN_FLIGHT = env_int("WS_MAX_IN_FLIGHT", 4, minimum=1)
WS_MAX_FRAME_BYTES = env_int("WS_MAX_FRAME_BYTES", 64 * 1024, minimum=1024)
# Seconds a client whose handshake carried no key has to send its auth frame
# before the connection is closed with code 4401.
WS_AUTH_TIMEOUT_SECONDS = env_float("WS_AUTH_TIMEOUT_SECONDS", 5.0, minimum=0.1)

LOG_FORMAT = env_choice("LOG_FORMAT", "text", ("text", "json"))
LOG_LEVEL = env_choice(
    "LOG_LEVEL", "INFO", ("debug", "info", "warning", "error", "critical")
).upper()

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "request_id": {"()": "gateway_project.logging.RequestIdFilter"},
        "skip_upstream_statuses": {
            "()": "gateway_project.logging.SkipUpstreamStatuses"
        },
    },
    "formatters": {
        "text": {
            "format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
        },
        "json": {"()": "gateway_project.logging.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "filters": ["request_id"],
            "formatter": LOG_FORMAT,
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        # Django logs every 4xx and 5xx again; our own handler already did.
        "django.request": {
            "handlers": ["console"],
            "level": "ERROR",
            "filters": ["skip_upstream_statuses"],
            "propagate": False,
        },
        # Every request with a Host outside ALLOWED_HOSTS, which scanners send
        # all day, would log an ERROR with a traceback; the client gets a 400.
        "django.security.DisallowedHost": {
            "handlers": ["console"],
            "level": "CRITICAL",
            "propagate": False,
        },
        # The HTTP clients of google-genai log every request at INFO; the
        # Gemini adapter logs retries and failures itself.
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
    },
}
