"""Per-key request and token limits, shared by all processes through Redis.

Limits are counted in fixed windows of RATE_LIMIT_WINDOW_SECONDS aligned to the
epoch, plus one counter per UTC day for the daily token budget. Each counter is
a Redis key with an expiry, changed with INCR/INCRBY inside MULTI/EXEC, so all
processes share one count. When Redis is down or REDIS_URL is unset, each
process counts on its own until Redis responds again.

Per request: ``check_request(key)`` before calling the model, which raises
RateLimited or BudgetExceeded (both 429) and returns the X-RateLimit-* values,
then ``record_usage(key, usage.total_tokens)`` after the answer.
llm/access.py runs both for the chat endpoints.

NOTE: a response's tokens are known only after it is generated, so token
limits admit a request while the count is below the limit. A key can exceed a
token limit by the tokens of the requests it has in flight at that moment.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry
from rest_framework import status

from gateway_project.errors import ApiError

if TYPE_CHECKING:
    from llm.models import ApiKey

logger = logging.getLogger(__name__)

DAY_SECONDS = 86400
# While Redis is failing, it is tried again after this long, so a dead Redis
# costs one timeout per interval instead of one per request.
REDIS_RETRY_SECONDS = 5.0
WARNING_INTERVAL_SECONDS = 60.0
_NAMESPACE = "llmgw:limits"


@dataclass(frozen=True)
class RateLimitDecision:
    """Request limit state for the X-RateLimit-* headers.

    ``limit`` and ``remaining`` count requests in the current window and are
    None for a key without a request limit. ``reset`` is the number of seconds
    until the window ends.
    """

    limit: int | None
    remaining: int | None
    reset: int

    def headers(self) -> dict[str, str]:
        if self.limit is None:
            return {}
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }


UNLIMITED = RateLimitDecision(limit=None, remaining=None, reset=0)


class RateLimited(ApiError):
    """The key used up its requests or tokens for the current window.

    ``decision`` contains the X-RateLimit-* values for the error response.
    """

    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "rate_limited"
    default_detail = "The API key's rate limit is used up; retry later."

    def __init__(self, message: str, *, retry_after: int, decision):
        super().__init__(message)
        self.retry_after = retry_after
        self.decision = decision


class BudgetExceeded(RateLimited):
    """The key used up its tokens for the UTC day."""

    default_code = "budget_exceeded"
    default_detail = "The API key's daily token budget is used up."


@dataclass(frozen=True)
class _CounterKeys:
    requests: str
    window_tokens: str
    day_tokens: str


class _RedisCounters:
    def __init__(self, client: redis.Redis):
        self._client = client

    def count_request(self, keys: _CounterKeys, window_ttl: int, now: float):
        pipe = self._client.pipeline(transaction=True)
        pipe.incr(keys.requests)
        pipe.expire(keys.requests, window_ttl)
        pipe.get(keys.window_tokens)
        pipe.get(keys.day_tokens)
        requests, _, window_tokens, day_tokens = pipe.execute()
        return requests, int(window_tokens or 0), int(day_tokens or 0)

    def add_tokens(self, keys: _CounterKeys, tokens: int, window_ttl: int, now):
        pipe = self._client.pipeline(transaction=True)
        pipe.incrby(keys.window_tokens, tokens)
        pipe.expire(keys.window_tokens, window_ttl)
        pipe.incrby(keys.day_tokens, tokens)
        pipe.expire(keys.day_tokens, 2 * DAY_SECONDS)
        pipe.execute()


class _LocalCounters:
    """The same counters in this process's memory, for when Redis is unusable."""

    def __init__(self):
        self._values: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._next_prune = 0.0

    def _add(self, name: str, amount: int, ttl: float, now: float) -> int:
        value, expires_at = self._values.get(name, (0, 0.0))
        if expires_at <= now:
            value = 0
        value += amount
        self._values[name] = (value, now + ttl)
        return value

    def _get(self, name: str, now: float) -> int:
        value, expires_at = self._values.get(name, (0, 0.0))
        return value if expires_at > now else 0

    def _prune(self, now: float) -> None:
        # Counters of past windows are never read again. Dropping them once a
        # minute bounds memory by the keys active recently.
        if now < self._next_prune:
            return
        self._next_prune = now + 60
        expired = [name for name, (_, end) in self._values.items() if end <= now]
        for name in expired:
            del self._values[name]

    def count_request(self, keys: _CounterKeys, window_ttl: int, now: float):
        with self._lock:
            self._prune(now)
            requests = self._add(keys.requests, 1, window_ttl, now)
            return (
                requests,
                self._get(keys.window_tokens, now),
                self._get(keys.day_tokens, now),
            )

    def add_tokens(self, keys: _CounterKeys, tokens: int, window_ttl: int, now):
        with self._lock:
            self._add(keys.window_tokens, tokens, window_ttl, now)
            self._add(keys.day_tokens, tokens, 2 * DAY_SECONDS, now)


def _redis_client(url: str) -> redis.Redis:
    # No retries: a failing Redis must cost one short timeout, after which the
    # limiter counts locally (redis-py 8 retries ten times by default).
    return redis.Redis.from_url(
        url,
        socket_timeout=settings.REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=settings.REDIS_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 0),
    )


class RateLimiter:
    """Checks and counts per-key limits; one instance serves a whole process.

    ``clock`` returns Unix time in seconds. It decides the windows, so every
    process needs a synchronized clock (NTP) for the windows to line up.
    """

    def __init__(
        self,
        *,
        redis_url: str | None,
        window_seconds: int,
        clock=time.time,
    ):
        self.window_seconds = window_seconds
        self._clock = clock
        self._redis = _RedisCounters(_redis_client(redis_url)) if redis_url else None
        self._local = _LocalCounters()
        self._redis_retry_at = 0.0
        self._redis_failing = False
        self._last_warning_at: float | None = None
        self._warning_lock = threading.Lock()

    def check_request(self, key: ApiKey | None) -> RateLimitDecision:
        """Count one request of the key and raise if any of its limits is used up.

        Raises BudgetExceeded when the daily token budget is spent, RateLimited
        when the tokens or requests of this window are. A rejected request
        still counts towards the request limit of its window.
        """
        if key is None or not _has_limits(key):
            return UNLIMITED
        now = self._clock()
        window = int(now // self.window_seconds)
        reset = math.ceil((window + 1) * self.window_seconds - now)
        keys = _counter_keys(key, window, now)

        requests, window_tokens, day_tokens = self._with_counters(
            lambda counters: counters.count_request(keys, 2 * self.window_seconds, now)
        )

        limit = self._requests_per_window(key)
        decision = RateLimitDecision(
            limit=limit,
            remaining=None if limit is None else max(0, limit - requests),
            reset=reset,
        )
        if key.tokens_per_day is not None and day_tokens >= key.tokens_per_day:
            until_midnight = math.ceil(DAY_SECONDS - now % DAY_SECONDS)
            raise BudgetExceeded(
                f"API key {key.prefix}… used {day_tokens} of its "
                f"{key.tokens_per_day} tokens for today (UTC); the budget renews "
                f"at 00:00 UTC, in {until_midnight} s.",
                retry_after=until_midnight,
                decision=decision,
            )
        tokens_limit = self._tokens_per_window(key)
        if tokens_limit is not None and window_tokens >= tokens_limit:
            raise RateLimited(
                f"API key {key.prefix}… used {window_tokens} of its {tokens_limit} "
                f"tokens for this {self._window_text()}; retry in {reset} s.",
                retry_after=reset,
                decision=decision,
            )
        if limit is not None and requests > limit:
            raise RateLimited(
                f"API key {key.prefix}… sent more than {limit} requests in this "
                f"{self._window_text()}; retry in {reset} s.",
                retry_after=reset,
                decision=decision,
            )
        return decision

    def record_usage(self, key: ApiKey | None, tokens: int) -> None:
        """Add the tokens of a model response to the key's window and day counters.

        Keys without a token limit are not counted, so a limit added later
        counts from that moment on.
        """
        if key is None or tokens <= 0:
            return
        if key.tokens_per_minute is None and key.tokens_per_day is None:
            return
        now = self._clock()
        window = int(now // self.window_seconds)
        keys = _counter_keys(key, window, now)
        self._with_counters(
            lambda counters: counters.add_tokens(
                keys, tokens, 2 * self.window_seconds, now
            )
        )

    def _requests_per_window(self, key: ApiKey) -> int | None:
        return self._scale_per_minute(key.requests_per_minute)

    def _tokens_per_window(self, key: ApiKey) -> int | None:
        return self._scale_per_minute(key.tokens_per_minute)

    def _scale_per_minute(self, per_minute: int | None) -> int | None:
        # The key stores limits per minute; a different window length scales
        # them, so a 10 s window allows a sixth of the minute's amount.
        if per_minute is None:
            return None
        return max(1, math.ceil(per_minute * self.window_seconds / 60))

    def _window_text(self) -> str:
        if self.window_seconds == 60:
            return "minute"
        return f"{self.window_seconds} s window"

    def _with_counters(self, operation):
        now = self._clock()
        if self._redis is not None and now >= self._redis_retry_at:
            try:
                result = operation(self._redis)
            except (redis.RedisError, OSError) as error:
                self._redis_retry_at = now + REDIS_RETRY_SECONDS
                self._redis_failing = True
                self._warn(
                    now,
                    "Redis failed (%s): rate limits are counted per process, so "
                    "each process allows the full limit",
                    error,
                )
            else:
                if self._redis_failing:
                    self._redis_failing = False
                    logger.info("Redis responds again: rate limits are shared again")
                return result
        elif self._redis is None:
            self._warn(
                now,
                "REDIS_URL is not set: rate limits are counted per process, so "
                "each process allows the full limit",
            )
        return operation(self._local)

    def _warn(self, now: float, message: str, *args) -> None:
        with self._warning_lock:
            last = self._last_warning_at
            if last is not None and now - last < WARNING_INTERVAL_SECONDS:
                return
            self._last_warning_at = now
        logger.warning(message, *args)


def _has_limits(key: ApiKey) -> bool:
    return any(
        limit is not None
        for limit in (
            key.requests_per_minute,
            key.tokens_per_minute,
            key.tokens_per_day,
        )
    )


def _counter_keys(key: ApiKey, window: int, now: float) -> _CounterKeys:
    day = int(now // DAY_SECONDS)
    return _CounterKeys(
        requests=f"{_NAMESPACE}:{key.pk}:requests:{window}",
        window_tokens=f"{_NAMESPACE}:{key.pk}:tokens:{window}",
        day_tokens=f"{_NAMESPACE}:{key.pk}:day-tokens:{day}",
    )


_limiter: RateLimiter | None = None
_limiter_lock = threading.Lock()
_limiter_clock = time.time


def get_rate_limiter() -> RateLimiter:
    """Return this process's limiter, created from settings on first use."""
    global _limiter
    with _limiter_lock:
        if _limiter is None:
            _limiter = RateLimiter(
                redis_url=settings.REDIS_URL,
                window_seconds=settings.RATE_LIMIT_WINDOW_SECONDS,
                clock=_limiter_clock,
            )
        return _limiter


def rate_limiter_reset(*, clock=time.time) -> None:
    """Forget this process's limiter and its per-process counters.

    The next request builds a new limiter from the current settings, with
    ``clock`` (Unix seconds). Counts already in Redis stay. Tests call it so
    that no Redis failure state or fallback count leaks into the next test.
    """
    global _limiter, _limiter_clock
    with _limiter_lock:
        _limiter = None
        _limiter_clock = clock


def check_request(key: ApiKey | None) -> RateLimitDecision:
    """Count a request of the key; raise RateLimited or BudgetExceeded (429)."""
    return get_rate_limiter().check_request(key)


def record_usage(key: ApiKey | None, tokens: int) -> None:
    """Count the tokens a model reported for a response, streamed or not."""
    get_rate_limiter().record_usage(key, tokens)


# Redis calls block, so async callers run them on a worker thread instead of
# the event loop. Neither function touches the ORM.
check_request_async = sync_to_async(check_request, thread_sensitive=False)
record_usage_async = sync_to_async(record_usage, thread_sensitive=False)
