"""Backoff, poll scheduling and call_with_retry, all without sleeping."""

from __future__ import annotations

import itertools
import random

import pytest

from pipeline.errors import ApiPermanentError, ApiTransientError, PipelineError, TransientError
from pipeline.retry import (
    POLL_FIRST_MAX,
    POLL_INITIAL,
    POLL_MAX,
    POLL_MIN,
    RETRY_AFTER_MAX,
    Backoff,
    call_with_retry,
    poll_delay,
)

NO_JITTER = Backoff(initial=1.0, multiplier=2.0, maximum=60.0, jitter=0.0, max_attempts=5)


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 32.0), (7, 60.0), (50, 60.0), (10_000, 60.0)],
)
def test_delay_grows_exponentially_up_to_the_cap(attempt: int, expected: float) -> None:
    assert NO_JITTER.delay(attempt) == expected


@pytest.mark.parametrize("jitter", [0.1, 0.2, 0.5, 1.0])
def test_jitter_stays_within_bounds_and_actually_varies(jitter: float) -> None:
    policy = Backoff(initial=4.0, maximum=100.0, jitter=jitter)
    rng = random.Random(1234)
    samples = [policy.delay(1, rng=rng) for _ in range(2000)]
    assert min(samples) >= 4.0 * (1 - jitter) and min(samples) >= 0
    assert max(samples) <= 4.0 * (1 + jitter)
    assert len(set(samples)) > 1000
    # Proportional jitter is centred on the base delay.
    assert abs(sum(samples) / len(samples) - 4.0) < 4.0 * jitter * 0.1


def test_jitter_never_exceeds_the_maximum() -> None:
    policy = Backoff(initial=1.0, maximum=10.0, jitter=0.5)
    rng = random.Random(7)
    assert max(policy.delay(20, rng=rng) for _ in range(1000)) <= 10.0


def test_same_seed_gives_same_delays() -> None:
    policy = Backoff()
    first = [policy.delay(3, rng=random.Random(5)) for _ in range(3)]
    assert first == [policy.delay(3, rng=random.Random(5)) for _ in range(3)]


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        (None, 2.0),  # no header: the backoff alone
        (0.5, 2.0),  # shorter than the backoff: backoff wins
        (45.0, 45.0),  # the server's floor wins, even above `maximum` of 10 s
        (10_000.0, RETRY_AFTER_MAX),  # absurd values are capped
        (-3.0, 2.0),  # negative values are ignored
    ],
)
def test_retry_after_is_a_floor(retry_after: float | None, expected: float) -> None:
    policy = Backoff(initial=2.0, maximum=10.0, jitter=0.0)
    assert policy.delay(1, retry_after=retry_after) == expected


@pytest.mark.parametrize(("attempt", "exhausted"), [(1, False), (2, False), (3, True), (4, True)])
def test_exhausted_after_max_attempts(attempt: int, exhausted: bool) -> None:
    assert Backoff(max_attempts=3).exhausted(attempt) is exhausted


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": -1}, {"multiplier": 0.5}, {"jitter": 1.5}, {"max_attempts": 0}],
)
def test_invalid_policies_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- poll_delay


def test_first_poll_lands_near_the_expected_duration() -> None:
    rng = random.Random(3)
    delays = [poll_delay(elapsed=0.0, expected=30.0, polls=0, rng=rng) for _ in range(500)]
    assert all(24.0 <= d <= 36.0 for d in delays)
    # Jobs submitted together spread out instead of polling in lockstep.
    assert max(delays) - min(delays) > 5.0


def test_first_poll_counts_time_already_elapsed() -> None:
    rng = random.Random(3)
    assert 8.0 <= poll_delay(elapsed=20.0, expected=30.0, polls=0, rng=rng) <= 12.0


def test_first_poll_of_a_very_slow_model_is_capped() -> None:
    assert poll_delay(elapsed=0.0, expected=3600.0, polls=0) <= POLL_FIRST_MAX


@pytest.mark.parametrize(("elapsed", "expected"), [(0.0, None), (40.0, 30.0)])
def test_first_poll_without_a_usable_expectation_uses_the_short_initial(
    elapsed: float, expected: float | None
) -> None:
    rng = random.Random(9)
    delay = poll_delay(elapsed=elapsed, expected=expected, polls=0, rng=rng)
    assert POLL_INITIAL * 0.8 <= delay <= POLL_INITIAL * 1.2


def test_later_polls_back_off_up_to_the_cap() -> None:
    medians = []
    for polls in range(1, 15):
        rng = random.Random(polls)
        samples = sorted(
            poll_delay(elapsed=100.0, expected=30.0, polls=polls, rng=rng) for _ in range(101)
        )
        assert samples[0] >= POLL_MIN and samples[-1] <= POLL_MAX
        medians.append(samples[50])
    # Non-decreasing, give or take jitter once the cap is reached.
    assert all(later >= earlier * 0.95 for earlier, later in itertools.pairwise(medians))
    assert medians[0] < 3.0 and medians[-1] > POLL_MAX * 0.75


def test_poll_delay_is_never_below_the_minimum() -> None:
    assert poll_delay(elapsed=29.99, expected=30.0, polls=0) >= POLL_MIN


# ---------------------------------------------------------------- call_with_retry


class Flaky:
    """Fails with the given errors in turn, then returns 'ok'."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


FAST = Backoff(initial=1.0, multiplier=2.0, maximum=60.0, jitter=0.0, max_attempts=4)


def test_retries_transient_errors_then_succeeds() -> None:
    slept: list[float] = []
    fn = Flaky(ApiTransientError("503"), TransientError("blip"))
    assert call_with_retry(fn, backoff=FAST, sleep=slept.append) == "ok"
    assert fn.calls == 3
    assert slept == [1.0, 2.0]


def test_stops_at_once_on_a_permanent_error() -> None:
    slept: list[float] = []
    fn = Flaky(ApiPermanentError("400 bad input"))
    with pytest.raises(ApiPermanentError, match="bad input"):
        call_with_retry(fn, backoff=FAST, retry_on=(PipelineError,), sleep=slept.append)
    assert fn.calls == 1 and slept == []


def test_errors_not_named_are_not_retried() -> None:
    fn = Flaky(KeyError("bug"))
    with pytest.raises(KeyError):
        call_with_retry(fn, backoff=FAST, sleep=lambda _: None)
    assert fn.calls == 1


def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    slept: list[float] = []
    fn = Flaky(*[TransientError(f"fail {i}") for i in range(10)])
    with pytest.raises(TransientError, match="fail 3"):
        call_with_retry(fn, backoff=FAST, sleep=slept.append)
    assert fn.calls == 4
    assert slept == [1.0, 2.0, 4.0]


def test_honours_retry_after_and_reports_each_retry() -> None:
    slept: list[float] = []
    seen: list[tuple[int, str, float]] = []
    fn = Flaky(ApiTransientError("429", retry_after=7.5))
    call_with_retry(
        fn,
        backoff=FAST,
        sleep=slept.append,
        on_retry=lambda attempt, exc, delay: seen.append((attempt, str(exc), delay)),
    )
    assert slept == [7.5]
    assert seen == [(1, "429", 7.5)]
