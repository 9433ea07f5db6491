import asyncio
import logging

import pytest
from django.test import override_settings

from gateway_project.errors import error_payload
from llm.breaker import (
    BreakerCall,
    BreakerState,
    CircuitBreaker,
    breaker_for,
    get_breaker,
)
from llm.errors import (
    ContentBlocked,
    ModelBusy,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tests.fake_clock import FakeClock


@pytest.fixture
def clock():
    return FakeClock(1000.0)


@pytest.fixture
def breaker(clock):
    return CircuitBreaker(
        "gemini", failure_threshold=3, cooldown_seconds=30, clock=clock
    )


async def run(breaker, error: Exception | None = None) -> str:
    """Run one call through the breaker; return "ok", or the error's code."""
    try:
        async with BreakerCall(breaker):
            if error is not None:
                raise error
    except Exception as raised:  # noqa: BLE001 - the test inspects any outcome
        return raised.code
    return "ok"


async def open_breaker(breaker) -> None:
    for _ in range(breaker.failure_threshold):
        await run(breaker, UpstreamTimeout())
    assert breaker.state is BreakerState.OPEN


async def test_breaker_opens_after_threshold_failures(breaker):
    outcomes = [await run(breaker, UpstreamUnavailable()) for _ in range(2)]

    assert outcomes == ["upstream_unavailable", "upstream_unavailable"]
    assert breaker.state is BreakerState.CLOSED

    assert await run(breaker, UpstreamTimeout()) == "upstream_timeout"
    assert breaker.state is BreakerState.OPEN


async def test_open_breaker_fails_fast_with_remaining_cooldown(breaker, clock):
    await open_breaker(breaker)
    clock.advance(12)
    reached_provider = False

    with pytest.raises(UpstreamUnavailable) as caught:
        async with BreakerCall(breaker):
            reached_provider = True

    assert reached_provider is False
    assert caught.value.code == "circuit_open"
    assert caught.value.retry_after == 18
    status, body, headers = error_payload(caught.value)
    assert status == 503
    assert body["error"] == {
        "code": "circuit_open",
        "message": "Calls to the gemini provider are paused after repeated "
        "failures; retry in 18 s.",
    }
    assert headers == {"Retry-After": "18"}


async def test_success_resets_consecutive_failures(breaker):
    await run(breaker, UpstreamTimeout())
    await run(breaker, UpstreamTimeout())

    await run(breaker)
    await run(breaker, UpstreamTimeout())
    await run(breaker, UpstreamTimeout())

    assert breaker.state is BreakerState.CLOSED


async def test_non_retryable_errors_do_not_count(breaker):
    for _ in range(5):
        assert await run(breaker, ContentBlocked()) == "content_blocked"
        assert await run(breaker, ModelBusy()) == "model_busy"

    assert breaker.state is BreakerState.CLOSED


async def test_bugs_and_cancellation_do_not_count(breaker):
    for _ in range(5):
        with pytest.raises(KeyError):
            async with BreakerCall(breaker):
                raise KeyError("bug")
        with pytest.raises(asyncio.CancelledError):
            async with BreakerCall(breaker):
                raise asyncio.CancelledError()

    assert breaker.state is BreakerState.CLOSED


async def test_half_open_probe_success_closes(breaker, clock):
    await open_breaker(breaker)
    clock.advance(30)

    assert breaker.state is BreakerState.HALF_OPEN
    assert await run(breaker) == "ok"
    assert breaker.state is BreakerState.CLOSED
    assert await run(breaker) == "ok"


async def test_half_open_probe_failure_reopens(breaker, clock):
    await open_breaker(breaker)
    clock.advance(30)

    assert await run(breaker, UpstreamTimeout()) == "upstream_timeout"

    assert breaker.state is BreakerState.OPEN
    clock.advance(29)
    assert await run(breaker) == "circuit_open"
    clock.advance(1)
    assert await run(breaker) == "ok"
    assert breaker.state is BreakerState.CLOSED


async def test_half_open_admits_one_probe_at_a_time(breaker, clock):
    await open_breaker(breaker)
    clock.advance(30)
    probe_started = asyncio.Event()
    finish_probe = asyncio.Event()

    async def probe():
        async with BreakerCall(breaker):
            probe_started.set()
            await finish_probe.wait()

    task = asyncio.create_task(probe())
    await probe_started.wait()

    assert await run(breaker) == "circuit_open"
    finish_probe.set()
    await task
    assert breaker.state is BreakerState.CLOSED
    assert await run(breaker) == "ok"


async def test_cancelled_probe_lets_next_call_probe(breaker, clock):
    await open_breaker(breaker)
    clock.advance(30)

    with pytest.raises(asyncio.CancelledError):
        async with BreakerCall(breaker):
            raise asyncio.CancelledError()

    assert breaker.state is BreakerState.HALF_OPEN
    assert await run(breaker) == "ok"
    assert breaker.state is BreakerState.CLOSED


async def test_call_started_before_opening_is_ignored(breaker, clock):
    slow_call = BreakerCall(breaker)
    await slow_call.__aenter__()
    await open_breaker(breaker)
    clock.advance(30)
    await run(breaker)

    await slow_call.__aexit__(UpstreamTimeout, UpstreamTimeout(), None)
    await run(breaker, UpstreamTimeout())
    await run(breaker, UpstreamTimeout())

    assert breaker.state is BreakerState.CLOSED


async def test_opening_logs_a_warning(breaker, caplog):
    caplog.set_level(logging.WARNING, logger="llm.breaker")

    await open_breaker(breaker)

    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "Circuit breaker for gemini opened after 3 consecutive failures; calls "
        "fail at once for 30 s"
    ]


@override_settings(BREAKER_FAILURE_THRESHOLD=2, BREAKER_COOLDOWN_SECONDS=60)
async def test_breaker_for_shares_one_breaker_per_provider():
    name = "provider-for-sharing-test"

    for _ in range(2):
        with pytest.raises(UpstreamTimeout):
            async with breaker_for(name):
                raise UpstreamTimeout()

    with pytest.raises(UpstreamUnavailable) as caught:
        async with breaker_for(name):
            pass
    assert caught.value.code == "circuit_open"
    assert get_breaker(name).failure_threshold == 2
    assert get_breaker(name).cooldown_seconds == 60
    assert get_breaker("another-provider").state is BreakerState.CLOSED


async def test_streamed_probe_closes_at_first_data(breaker, clock):
    await open_breaker(breaker)
    clock.advance(30)
    first_data = asyncio.Event()
    finish_probe = asyncio.Event()

    async def streamed_probe():
        async with BreakerCall(breaker) as call:
            call.provider_responded()
            first_data.set()
            await finish_probe.wait()

    task = asyncio.create_task(streamed_probe())
    await first_data.wait()

    assert breaker.state is BreakerState.CLOSED
    assert await run(breaker) == "ok"
    finish_probe.set()
    await task


async def test_response_outside_probe_defers_to_exit(breaker):
    for _ in range(breaker.failure_threshold - 1):
        await run(breaker, UpstreamTimeout())

    try:
        async with BreakerCall(breaker) as call:
            call.provider_responded()
            raise UpstreamTimeout()
    except UpstreamTimeout:
        pass

    assert breaker.state is BreakerState.OPEN
