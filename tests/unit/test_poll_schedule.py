"""When the sweeper looks at a job again (`stages.next_poll_in`): soon after it should
have finished, rarely while it cannot have, and never so late that a slot idles long."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.stages import (
    FINALIZING_MIN,
    FIRST_LOOK_MARGIN,
    POLL_CAP,
    JobStarts,
    SweeperState,
    first_look_after,
    next_list_in,
    next_poll_in,
    tight,
)


@pytest.mark.parametrize("expected", [1.0, 3.0, 10.0, 40.0])
def test_the_first_look_lands_just_after_the_expected_finish(expected: float) -> None:
    delay = next_poll_in(0.0, expected, 0, random.Random(1))
    assert expected < delay <= expected * 1.01 + 0.01  # a slot idles at most ~1% of a job


def test_a_job_accepted_a_while_ago_is_looked_at_when_it_should_end() -> None:
    assert 1.0 < next_poll_in(2.0, 3.0, 0) < 1.05


@pytest.mark.parametrize("expected", [1.0, 10.0])
def test_an_overdue_job_is_looked_at_again_after_half_its_delay_so_far(expected: float) -> None:
    rng = random.Random(2)
    late = [next_poll_in(expected + over, expected, 3, rng) for over in (0.0, 2.0, 8.0)]
    assert late[0] == pytest.approx(0.05 * expected, rel=0.11)  # just past due: a short step
    assert late[1] == pytest.approx(max(0.05 * expected, 1.0), rel=0.11)
    assert late[2] == pytest.approx(max(0.05 * expected, 4.0), rel=0.11)
    assert next_poll_in(10_000.0, expected, 40, rng) <= POLL_CAP


def test_without_a_known_duration_looks_come_at_a_fifth_of_the_age() -> None:
    assert next_poll_in(0.0, None, 0) <= 1.0  # a first look soon after submitting
    assert next_poll_in(1.0, None, 1) == 0.25  # never closer than a quarter second
    assert next_poll_in(10.0, None, 5) == pytest.approx(2.0)
    assert next_poll_in(1e6, None, 50) == POLL_CAP


def test_without_a_known_duration_a_finalizing_job_is_looked_at_soon() -> None:
    """Its generation is done and its outputs are being saved: a look a fifth of its age
    later (0.6 s for a 3 s job) would find it ended long before; a fiftieth is enough."""
    assert next_poll_in(2.9, None, 9, finalizing=True) == pytest.approx(0.058)
    assert next_poll_in(0.9, None, 4, finalizing=True) == pytest.approx(FINALIZING_MIN)
    assert next_poll_in(1e6, None, 50, finalizing=True) == POLL_CAP
    assert next_poll_in(2.9, 3.0, 9, finalizing=True) == next_poll_in(2.9, 3.0, 9)


def test_a_tight_models_jobs_are_first_looked_at_when_its_slowest_recent_job_ended() -> None:
    """Durations within a group window (5%): the look at the slowest sees every job ended
    at once; a look at the median would miss the slower half and look again 5% later."""
    samples = [2.97, 2.99, 3.0, 3.02, 3.05]
    assert tight(samples, 0.05)
    assert first_look_after(samples, 0.05) == 3.05
    assert next_poll_in(0.0, first_look_after(samples, 0.05), 0) == pytest.approx(
        3.05 + FIRST_LOOK_MARGIN
    )


def test_a_varying_models_jobs_are_first_looked_at_their_median() -> None:
    samples = [2.1, 2.6, 3.0, 3.4, 3.9]  # +-30%: its list schedule takes over after that
    assert not tight(samples, 0.05)
    assert first_look_after(samples, 0.05) == 3.0
    assert first_look_after([], 0.05) is None


# -- when the one list call for every job in flight is asked (`stages.next_list_in`) ------


def test_jobs_that_always_take_the_same_time_are_listed_when_the_first_should_end() -> None:
    same = [3.0] * 20
    # Three jobs accepted 0, 10 and 500 ms apart: the first two share one call.
    ahead = next_list_in([(1.0, same), (0.99, same), (0.5, same)], window=0.06)
    assert ahead == pytest.approx(2.01)


def test_varying_jobs_are_listed_when_one_finish_is_expected_not_at_each_median() -> None:
    spread = [2.1 + 0.09 * n for n in range(21)]  # 2.1 s to 3.9 s, evenly
    eight = [(0.0, spread)] * 8  # a wave just submitted
    ahead = next_list_in(eight, window=0.0)
    assert ahead is not None
    # One finish among eight is expected early in the spread, long before the median.
    assert 2.1 <= ahead < 2.5
    # A lone job is looked at near its median, then near the median of what is left.
    lone = next_list_in([(0.0, spread)], window=0.0)
    assert lone == pytest.approx(3.0, abs=0.1)
    later = next_list_in([(3.0, spread)], window=0.0)
    assert later is not None and 0.3 < later < 0.6


def test_no_list_is_planned_for_jobs_past_every_known_duration_or_without_one() -> None:
    assert next_list_in([(5.0, [3.0] * 20)], window=0.06) is None
    assert next_list_in([(1.0, [])], window=0.06) is None
    assert next_list_in([], window=0.06) is None


def test_a_jobs_progress_rising_between_two_lists_says_when_it_ends() -> None:
    state = SweeperState(api_host="api")
    assert state.progress_eta("job", 0.2, at=10.0) is None  # one look: no rate yet
    assert state.progress_eta("job", 0.4, at=11.0) == pytest.approx(3.0)  # 0.2 a second
    assert state.progress_eta("job", 0.4, at=12.0) is None  # not rising: no estimate
    assert state.progress_eta("job", 0.7, at=13.0) == pytest.approx(1.0)  # 0.3 a second
    assert state.progress_eta("job", 1.0, at=14.0) is None  # done
    assert state.progress_eta("other", 0.9, at=14.0) is None  # each job its own


def test_a_job_is_timed_from_its_creation_on_our_clock_not_from_the_answer() -> None:
    """Scenario's clock runs 40 ms behind ours here, and its answers take 3 to 9 ms: a
    job's start is its createdAt plus the least gap seen (43 ms), never its answer."""
    starts = JobStarts()
    t0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    skew, ms = timedelta(milliseconds=40), timedelta(milliseconds=1)
    for n, took in enumerate((9, 3, 7)):  # ms from the job's creation to our answer
        created = t0 + timedelta(seconds=n)  # Scenario's clock
        answered = created + skew + took * ms
        started = starts.started(created, answered, sent=answered - 12 * ms)
        assert started <= answered  # never after the answer
        if n:  # the quickest answer taught the skew: each start is its creation on our clock
            assert started == created + skew + 3 * ms
    # a job a reconciliation found, created 2 s before we learnt of it: its late answer
    # teaches nothing, and its start is still its creation
    created = t0 + timedelta(seconds=10)
    assert starts.started(created, created + timedelta(seconds=2)) == created + skew + 3 * ms
    assert min(starts.recent) == pytest.approx(0.043)


def test_a_start_is_never_before_its_post_was_sent_whatever_the_clocks_do() -> None:
    """Scenario's clock falls 1 s behind ours: the gaps learnt before would put the next
    jobs' starts 1 s early, until they leave the window; the time the POST left bounds it."""
    starts = JobStarts()
    t0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    ms = timedelta(milliseconds=1)
    starts.started(t0, t0 + 5 * ms, sent=t0 - 5 * ms)  # clocks agree; answers take 5 ms
    sent = t0 + timedelta(seconds=2)  # ours; Scenario's clock now says a second less
    answered = sent + 10 * ms
    assert starts.started(sent - timedelta(seconds=1) + 5 * ms, answered, sent) == sent
    # and a clock that jumps the other way makes starts late, never after their answer
    created = answered + timedelta(seconds=1)
    assert starts.started(created, answered, sent) == answered


def test_a_post_that_scenario_takes_long_to_create_does_not_make_looks_early() -> None:
    """Scenario may work on a POST (auth, validation, credits) before it creates the job
    and stamps its createdAt, while a list call has no such work before it reads: the time
    from our send to a job's createdAt is not a list call's way there. Our clock and
    Scenario's agree here; every POST takes 20 ms before its job is created and 1 ms to
    answer after. A job's start must never be before its creation, or each first look,
    timed from it, would reach Scenario before the job ends and cost a second list call."""
    starts = JobStarts()
    t0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    ms = timedelta(milliseconds=1)
    for n in range(20):
        sent = t0 + timedelta(seconds=n)
        created = sent + 20 * ms
        started = starts.started(created, created + ms, sent)
        assert created <= started <= created + ms
