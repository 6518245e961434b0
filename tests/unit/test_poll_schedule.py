"""When the sweeper looks at a job again (`stages.next_poll_in`): soon after it should
have finished, rarely while it cannot have, and never so late that a slot idles long."""

from __future__ import annotations

import random

import pytest

from pipeline.stages import POLL_CAP, next_poll_in


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
