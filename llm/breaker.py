"""Circuit breakers that stop calling a failing model provider for a while.

After BREAKER_FAILURE_THRESHOLD consecutive retryable failures a provider's
breaker opens, and calls fail at once with ``circuit_open`` (503) for
BREAKER_COOLDOWN_SECONDS. Then one probe call goes through: its success closes
the breaker, and its failure opens it for another cool-down.

Usage, around everything that reaches the vendor (retries included)::

    async with breaker_for(provider_name(model)):
        completion = await provider.complete(request)

NOTE: the state lives in each process, so with several processes each one
needs its own run of failures before it stops calling the provider.
"""

import logging
import threading
import time
from enum import Enum

from django.conf import settings

from llm.errors import LLMError, ModelBusy, UpstreamUnavailable

logger = logging.getLogger(__name__)


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def counts_as_failure(error: BaseException) -> bool:
    """Return whether an error is a sign that the provider itself is failing.

    Only retryable model errors count. ModelBusy is left out although it is
    retryable: a full local queue is back-pressure from a working model, and
    opening the breaker would turn callers away after the queue has drained.
    """
    return (
        isinstance(error, LLMError)
        and error.retryable
        and not isinstance(error, ModelBusy)
    )


class CircuitBreaker:
    """The breaker state of one provider.

    Transitions happen under a thread lock that is never held across an
    ``await``, so one breaker is safe to share between tasks and threads.
    ``clock`` returns monotonic seconds.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int,
        cooldown_seconds: float,
        clock=time.monotonic,
    ):
        self.name = name
        self.failure_threshold = failure_threshold
        self.cooldown_seconds = cooldown_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        # Counts the times the breaker opened, so that a call that started
        # before an opening cannot close or count against the new state.
        self._generation = 0

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._state is BreakerState.OPEN and self._cooldown_left() <= 0:
                return BreakerState.HALF_OPEN
            return self._state

    def _cooldown_left(self) -> float:
        return self._opened_at + self.cooldown_seconds - self._clock()

    def before_call(self) -> tuple[int, bool]:
        """Admit a call or raise UpstreamUnavailable with code ``circuit_open``.

        Returns the generation the call belongs to and whether it is the probe
        of a half-open breaker; pass both to ``after_call``.
        """
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return self._generation, False
            if self._state is BreakerState.OPEN:
                left = self._cooldown_left()
                if left > 0:
                    raise self._open_error(left)
                self._state = BreakerState.HALF_OPEN
            if self._probe_in_flight:
                # Only one probe runs at a time. The other callers retry shortly.
                raise self._open_error(1.0)
            self._probe_in_flight = True
            return self._generation, True

    def after_call(
        self, generation: int, is_probe: bool, error: BaseException | None
    ) -> None:
        """Record the outcome of a call admitted by ``before_call``.

        ``error`` is None on success. An error that does not count as a failure
        (see ``counts_as_failure``) proves that the provider responded, so it
        counts as a success. A cancelled call or a bug in our own code shows
        nothing about the provider, so it leaves the state unchanged.
        """
        failed = error is not None and counts_as_failure(error)
        neutral = error is not None and not failed and not isinstance(error, LLMError)
        with self._lock:
            if is_probe:
                self._probe_in_flight = False
                if neutral:
                    return
                if failed:
                    self._open(reason="the probe call failed")
                else:
                    self._close()
                return
            if neutral or self._state is not BreakerState.CLOSED:
                return
            if generation != self._generation:
                return
            if not failed:
                self._failures = 0
                return
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open(reason=f"{self._failures} consecutive failures")

    def _open(self, *, reason: str) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._generation += 1
        self._failures = 0
        logger.warning(
            "Circuit breaker for %s opened after %s; calls fail at once for %.0f s",
            self.name,
            reason,
            self.cooldown_seconds,
        )

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        logger.info(
            "Circuit breaker for %s closed: the probe call succeeded", self.name
        )

    def _open_error(self, retry_after: float) -> UpstreamUnavailable:
        error = UpstreamUnavailable(
            f"Calls to the {self.name} provider are paused after repeated failures; "
            f"retry in {max(1, round(retry_after))} s.",
            code="circuit_open",
        )
        error.retry_after = retry_after
        return error


class BreakerCall:
    """Async context manager that runs one call through a breaker."""

    def __init__(self, breaker: CircuitBreaker):
        self._breaker = breaker
        self._generation = 0
        self._is_probe = False
        self._recorded = False

    async def __aenter__(self) -> "BreakerCall":
        self._generation, self._is_probe = self._breaker.before_call()
        return self

    def provider_responded(self) -> None:
        """Close a half-open breaker as soon as its probe gets the first data.

        A streamed probe can last minutes while a client reads slowly, and
        every other call would get ``circuit_open`` until it ended. Outside a
        probe this does nothing, and the call's outcome is recorded at exit.
        """
        if self._is_probe and not self._recorded:
            self._recorded = True
            self._breaker.after_call(self._generation, self._is_probe, None)

    async def __aexit__(self, exc_type, exc, traceback) -> bool:
        if not self._recorded:
            self._breaker.after_call(self._generation, self._is_probe, exc)
        return False


_breakers: dict[str, CircuitBreaker] = {}
_breakers_lock = threading.Lock()
_breakers_clock = time.monotonic


def get_breaker(name: str) -> CircuitBreaker:
    """Return this process's breaker for a provider, created from settings."""
    with _breakers_lock:
        if name not in _breakers:
            _breakers[name] = CircuitBreaker(
                name,
                failure_threshold=settings.BREAKER_FAILURE_THRESHOLD,
                cooldown_seconds=settings.BREAKER_COOLDOWN_SECONDS,
                clock=_breakers_clock,
            )
        return _breakers[name]


def breakers_reset(*, clock=time.monotonic) -> None:
    """Forget every provider's breaker state.

    The next call builds each breaker again from the current settings, with
    ``clock`` (monotonic seconds). Tests call it so that no breaker state
    leaks from one test into the next.
    """
    global _breakers_clock
    with _breakers_lock:
        _breakers.clear()
        _breakers_clock = clock


def breaker_for(name: str) -> BreakerCall:
    """Return a context manager that guards one call to the provider ``name``."""
    return BreakerCall(get_breaker(name))
