import logging

import pytest
import redis
from django.conf import settings

from gateway_project.errors import error_payload
from llm.limits import (
    BudgetExceeded,
    RateLimitDecision,
    RateLimited,
    RateLimiter,
    check_request_async,
    record_usage_async,
)
from llm.models import ApiKey
from tests.fake_clock import FakeClock

# 23:53:20 UTC: 20 s into a minute, 400 s before midnight.
START = 11574 * 86400 + 86000.0


@pytest.fixture
def clock():
    return FakeClock(START)


def make_limiter(clock, *, redis_url=None, window_seconds=60) -> RateLimiter:
    return RateLimiter(
        redis_url=settings.REDIS_URL if redis_url is None else redis_url,
        window_seconds=window_seconds,
        clock=clock,
    )


@pytest.fixture
def limiter(clock):
    return make_limiter(clock)


def api_key(**limits) -> ApiKey:
    # The limiter reads only the primary key, the prefix and the limits.
    return ApiKey(pk=7, name="client", prefix="gw_abcd1234", **limits)


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def test_requests_allowed_up_to_limit_then_rejected(limiter):
    key = api_key(requests_per_minute=3)

    decisions = [limiter.check_request(key) for _ in range(3)]
    with pytest.raises(RateLimited) as caught:
        limiter.check_request(key)

    assert decisions == [
        RateLimitDecision(limit=3, remaining=2, reset=40),
        RateLimitDecision(limit=3, remaining=1, reset=40),
        RateLimitDecision(limit=3, remaining=0, reset=40),
    ]
    assert decisions[0].headers() == {
        "X-RateLimit-Limit": "3",
        "X-RateLimit-Remaining": "2",
        "X-RateLimit-Reset": "40",
    }
    assert caught.value.decision == RateLimitDecision(limit=3, remaining=0, reset=40)
    assert error_payload(caught.value) == (
        429,
        {
            "error": {
                "code": "rate_limited",
                "message": "API key gw_abcd1234… sent more than 3 requests in this "
                "minute; retry in 40 s.",
            },
            "request_id": "-",
        },
        {"Retry-After": "40"},
    )


def test_requests_allowed_again_in_next_window(limiter, clock):
    key = api_key(requests_per_minute=1)
    limiter.check_request(key)
    with pytest.raises(RateLimited):
        limiter.check_request(key)

    clock.advance(40)

    assert limiter.check_request(key) == RateLimitDecision(
        limit=1, remaining=0, reset=60
    )


def test_request_limit_shared_between_processes(clock):
    first_process = make_limiter(clock)
    second_process = make_limiter(clock)
    key = api_key(requests_per_minute=2)

    first_process.check_request(key)
    second_process.check_request(key)

    with pytest.raises(RateLimited):
        first_process.check_request(key)
    with pytest.raises(RateLimited):
        second_process.check_request(key)


def test_counters_in_redis_expire(limiter):
    key = api_key(requests_per_minute=5, tokens_per_day=1000)

    limiter.check_request(key)
    limiter.record_usage(key, 10)

    client = redis_client()
    names = sorted(name.decode() for name in client.keys("llmgw:limits:7:*"))
    window, day = int(START // 60), int(START // 86400)
    assert names == [
        f"llmgw:limits:7:day-tokens:{day}",
        f"llmgw:limits:7:requests:{window}",
        f"llmgw:limits:7:tokens:{window}",
    ]
    for name in names:
        assert 0 < client.ttl(name) <= 2 * 86400, name


def test_window_length_scales_per_minute_limits(clock):
    limiter = make_limiter(clock, window_seconds=10)
    key = api_key(requests_per_minute=30)

    decision = limiter.check_request(key)

    assert decision == RateLimitDecision(limit=5, remaining=4, reset=10)


def test_key_without_limits_is_not_counted(limiter):
    key = api_key()

    decision = limiter.check_request(key)
    limiter.record_usage(key, 500)

    assert decision.headers() == {}
    assert redis_client().keys("llmgw:limits:*") == []


def test_absent_key_is_not_limited(limiter):
    assert limiter.check_request(None).headers() == {}
    limiter.record_usage(None, 100)


def test_tokens_per_minute_checked_before_call(limiter, clock):
    key = api_key(tokens_per_minute=100)
    limiter.check_request(key)
    limiter.record_usage(key, 60)
    limiter.check_request(key)
    limiter.record_usage(key, 50)

    with pytest.raises(RateLimited) as caught:
        limiter.check_request(key)

    assert caught.value.code == "rate_limited"
    assert caught.value.retry_after == 40
    assert str(caught.value.detail) == (
        "API key gw_abcd1234… used 110 of its 100 tokens for this minute; retry "
        "in 40 s."
    )
    clock.advance(40)
    assert limiter.check_request(key).headers() == {}


def test_tokens_per_day_exceeded_until_midnight(limiter, clock):
    key = api_key(tokens_per_day=1000, requests_per_minute=100)
    limiter.check_request(key)
    limiter.record_usage(key, 999)
    limiter.check_request(key)
    limiter.record_usage(key, 1)

    with pytest.raises(BudgetExceeded) as caught:
        limiter.check_request(key)

    status, body, headers = error_payload(caught.value)
    assert status == 429
    assert body["error"] == {
        "code": "budget_exceeded",
        "message": "API key gw_abcd1234… used 1000 of its 1000 tokens for today "
        "(UTC); the budget renews at 00:00 UTC, in 400 s.",
    }
    assert headers == {"Retry-After": "400"}
    assert caught.value.decision.limit == 100

    clock.advance(60)
    with pytest.raises(BudgetExceeded):
        limiter.check_request(key)
    clock.advance(340)
    assert limiter.check_request(key).remaining == 99


def test_daily_budget_shared_between_processes(clock):
    first_process = make_limiter(clock)
    second_process = make_limiter(clock)
    key = api_key(tokens_per_day=100)

    first_process.record_usage(key, 100)

    with pytest.raises(BudgetExceeded):
        second_process.check_request(key)


def test_falls_back_to_local_counts_when_redis_stops(
    limiter, clock, redis_server, caplog
):
    caplog.set_level(logging.WARNING, logger="llm.limits")
    key = api_key(requests_per_minute=2, tokens_per_day=50)
    redis_server.stop()

    decisions = [limiter.check_request(key) for _ in range(2)]
    with pytest.raises(RateLimited):
        limiter.check_request(key)
    clock.advance(10)
    with pytest.raises(RateLimited):
        limiter.check_request(key)
    limiter.record_usage(key, 50)
    clock.advance(40)
    with pytest.raises(BudgetExceeded):
        limiter.check_request(key)

    assert [decision.remaining for decision in decisions] == [1, 0]
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert warnings[0].startswith("Redis failed (")
    assert warnings[0].endswith(
        "rate limits are counted per process, so each process allows the full limit"
    )


def test_fallback_warning_repeats_at_most_once_a_minute(
    limiter, clock, redis_server, caplog
):
    caplog.set_level(logging.WARNING, logger="llm.limits")
    key = api_key(requests_per_minute=1000)
    redis_server.stop()

    for _ in range(30):
        limiter.check_request(key)
        clock.advance(5)

    assert len(caplog.records) == 3


def test_shared_counts_resume_when_redis_returns(clock, redis_server):
    first_process = make_limiter(clock)
    second_process = make_limiter(clock)
    key = api_key(requests_per_minute=2)
    redis_server.stop()
    first_process.check_request(key)

    redis_server.start()
    clock.advance(6)
    first_process.check_request(key)
    second_process.check_request(key)

    with pytest.raises(RateLimited):
        second_process.check_request(key)


def test_counts_locally_without_redis_url(clock, caplog):
    caplog.set_level(logging.WARNING, logger="llm.limits")
    limiter = make_limiter(clock, redis_url="")
    key = api_key(requests_per_minute=1)

    limiter.check_request(key)
    with pytest.raises(RateLimited):
        limiter.check_request(key)

    assert [record.getMessage() for record in caplog.records] == [
        "REDIS_URL is not set: rate limits are counted per process, so each "
        "process allows the full limit"
    ]


async def test_async_entry_points_use_shared_limiter():
    key = api_key(tokens_per_day=10)

    await check_request_async(key)
    await record_usage_async(key, 10)

    with pytest.raises(BudgetExceeded):
        await check_request_async(key)
