"""Retry and backoff policy as data plus pure functions.

Nothing here sleeps on its own: `Backoff.delay` and `poll_delay` compute waits, and
`call_with_retry` takes the `sleep` to use, so tests run at full speed with a fake one.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pipeline.errors import PermanentError, TransientError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A server asking for a longer pause than this is treated as asking for this much: a typo
# or a clock-skewed HTTP date must not park a worker for hours.
RETRY_AFTER_MAX = 300.0

# Job polling (see `poll_delay`): the docs suggest 2-3 s; 30 s keeps a stuck job cheap.
POLL_INITIAL = 2.0
POLL_MULTIPLIER = 1.5
POLL_MAX = 30.0
POLL_FIRST_MAX = 300.0
POLL_MIN = 0.5
POLL_JITTER = 0.2


def _jittered(base: float, jitter: float, rng: random.Random | None) -> float:
    """`base` scaled by a uniform factor in [1 - jitter, 1 + jitter], never negative."""
    if jitter <= 0 or base <= 0:
        return max(0.0, base)
    source = rng if rng is not None else random
    return max(0.0, base * (1.0 + source.uniform(-jitter, jitter)))


def cap_retry_after(retry_after: float | None) -> float | None:
    """A server's Retry-After clamped to [0, RETRY_AFTER_MAX], or None."""
    if retry_after is None:
        return None
    return min(max(0.0, float(retry_after)), RETRY_AFTER_MAX)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with proportional jitter and a cap.

    `attempt` is 1-based and counts attempts already made: `delay(1)` is the wait after the
    first failure. `exhausted(n)` says whether attempt `n` was the last one allowed.
    """

    initial: float = 1.0
    multiplier: float = 2.0
    maximum: float = 60.0
    jitter: float = 0.2  # ± fraction of the computed delay
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if self.initial < 0 or self.maximum < 0:
            raise ValueError("backoff delays must be >= 0")
        if self.multiplier < 1:
            raise ValueError("backoff multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff jitter must be within [0, 1]")
        if self.max_attempts < 1:
            raise ValueError("backoff max_attempts must be >= 1")

    def base_delay(self, attempt: int) -> float:
        """The delay after `attempt` before jitter: initial * multiplier**(attempt-1), capped."""
        exponent = max(0, attempt - 1)
        # Stop multiplying once past the cap: multiplier**1000 would overflow a float.
        delay = self.initial
        for _ in range(exponent):
            if delay >= self.maximum:
                break
            delay *= self.multiplier
        return min(delay, self.maximum)

    def delay(
        self,
        attempt: int,
        *,
        rng: random.Random | None = None,
        retry_after: float | None = None,
    ) -> float:
        """Seconds to wait after failed attempt `attempt`; a server's Retry-After is a floor."""
        wait = min(_jittered(self.base_delay(attempt), self.jitter, rng), self.maximum)
        floor = cap_retry_after(retry_after)
        if floor is not None:
            wait = max(wait, floor)
        return wait

    def exhausted(self, attempt: int) -> bool:
        """True when attempt `attempt` was the last one this policy allows."""
        return attempt >= self.max_attempts


# For tests and for callers that must not wait at all (one attempt, no sleep).
NO_RETRY = Backoff(initial=0.0, maximum=0.0, jitter=0.0, max_attempts=1)


def poll_delay(
    *,
    elapsed: float,
    expected: float | None,
    polls: int,
    rng: random.Random | None = None,
) -> float:
    """Seconds until a job should be polled next.

    `elapsed` is seconds since submission, `expected` the typical duration of finished jobs
    of the same model (None when unknown), `polls` how many polls were already made. The
    first poll lands near the expected finish (a fixed 2 s tick wastes requests on jobs
    that take 30 s); later polls back off exponentially from POLL_INITIAL up to POLL_MAX.
    Jitter spreads jobs submitted together so they do not poll in lockstep.
    """
    if polls <= 0:
        if expected is not None and expected > elapsed:
            remaining = min(expected - elapsed, POLL_FIRST_MAX)
            return min(max(POLL_MIN, _jittered(remaining, POLL_JITTER, rng)), POLL_FIRST_MAX)
        base = POLL_INITIAL
    else:
        base = min(POLL_INITIAL * POLL_MULTIPLIER ** min(polls - 1, 64), POLL_MAX)
    return min(max(POLL_MIN, _jittered(base, POLL_JITTER, rng)), POLL_MAX)


def call_with_retry(
    fn: Callable[[], T],
    *,
    backoff: Backoff,
    retry_on: tuple[type[BaseException], ...] = (TransientError,),
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    rng: random.Random | None = None,
) -> T:
    """Call `fn` (which must be idempotent) and retry the errors in `retry_on` with `backoff`.

    A `PermanentError` is never retried, even if `retry_on` names a parent class. The last
    error is re-raised once the policy is exhausted. `on_retry(attempt, exc, delay)` is
    called before each wait.
    """
    attempt = 1
    while True:
        try:
            return fn()
        except retry_on as exc:
            if isinstance(exc, PermanentError) or backoff.exhausted(attempt):
                raise
            wait = backoff.delay(attempt, rng=rng, retry_after=getattr(exc, "retry_after", None))
            if on_retry is not None:
                on_retry(attempt, exc, wait)
            else:
                logger.debug("attempt %d failed (%s); retrying in %.2fs", attempt, exc, wait)
            sleep(wait)
            attempt += 1
