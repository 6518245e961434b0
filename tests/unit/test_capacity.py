"""Learning the plan's parallel-jobs cap from what the API accepts and refuses."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.capacity import (
    INITIAL,
    LIMITS_TTL,
    ROUNDS_PER_PROBE,
    Cap,
    CapacityStore,
    cursor_name,
    pool_of,
)
from pipeline.stages import Tuning


class Cursors(dict[str, str]):
    def get_cursor(self, name: str) -> str | None:
        return self.get(name)

    def get_cursors(self, names: Sequence[str]) -> dict[str, str]:
        return {name: self[name] for name in names if name in self}

    def set_cursor(self, name: str, value: str) -> None:
        self[name] = value


def test_an_unknown_plan_starts_at_one_batch_and_grows_by_half_when_the_api_takes_it() -> None:
    cap = Cap()
    assert cap.limit(None) == INITIAL == Tuning().submit_batch  # a first wave: one step
    assert cap.accepted(INITIAL, waiting=False) == cap  # no demand, no evidence
    for running in range(1, INITIAL):  # the first jobs, accepted one by one: no news yet
        assert cap.accepted(running, waiting=True) == cap
    cap = cap.accepted(INITIAL, waiting=True)
    assert cap.value == 15
    assert cap.accepted(14, waiting=True) == cap  # taken, but the cap was not full
    assert cap.accepted(15, waiting=True).value == 22


def test_a_refusal_sets_the_cap_to_one_above_what_was_running_then_probing_slows_down() -> None:
    cap = Cap(value=12).refused_at(running=7, sent_at=100.0, now=101.0)
    assert (cap.value, cap.refused, cap.lowered_at) == (8, True, 101.0)
    # The rest of the burst, sent under the cap of 12, is refused too: that is no news.
    assert cap.refused_at(running=7, sent_at=100.5, now=101.2) == cap
    for _ in range(ROUNDS_PER_PROBE * 8 - 1):
        cap = cap.accepted(8, waiting=True)
    assert cap.value == 8  # one refusal costs at most one retry per ROUNDS_PER_PROBE rounds
    assert cap.accepted(8, waiting=True).value == 9
    assert cap.accepted(5, waiting=True).value == 8  # a free slot: nothing learnt
    assert Cap().refused_at(running=0, sent_at=0, now=1).value == 1  # never below one
    # Jobs we have not yet seen finish inflate `running`: a submission sent under the
    # lowered cap and refused still lowers it, so it settles on the API's.
    later = Cap(value=7, refused=True, lowered_at=101.0).refused_at(9, sent_at=102, now=103)
    assert later.value == 6


def test_a_known_cap_is_never_probed_and_the_ceiling_always_wins() -> None:
    cap = Cap(value=10, known=True)
    assert cap.accepted(10, waiting=True) == cap
    assert cap.limit(ceiling=6) == 6 and cap.limit(ceiling=None) == 10
    assert cap.refused_at(6, 0, 1) == Cap(value=7, refused=True, lowered_at=1)
    assert cap.refused_at(12, 0, 1) == Cap(value=9, refused=True, lowered_at=1)


def test_caps_are_kept_per_api_key_and_pool_without_the_key_itself() -> None:
    cursors = Cursors()
    store = CapacityStore(cursors, "api.example", "secret-key-123")
    store.known({"custom": 10, "inference": 3})
    store.refused("inference", running=2, sent_at=0.0, now=1.0)
    other = CapacityStore(cursors, "api.example", "another-key")
    assert store.get("custom").value == 10 and store.get("inference").value == 2
    assert other.get("custom") == Cap()
    assert store.get_all() == {"custom": store.get("custom"), "inference": store.get("inference")}
    assert other.get_all() == {"custom": Cap(), "inference": Cap()}
    assert all(
        "secret-key-123" not in name and "secret" not in value for name, value in cursors.items()
    )
    assert cursor_name("h", "k", "custom") != cursor_name("h", "k", "inference")


def test_a_damaged_stored_value_falls_back_to_the_default() -> None:
    assert Cap.loads("{not json") == Cap() and Cap.loads('{"value": "x"}') == Cap()


def test_pools_follow_the_endpoint() -> None:
    assert pool_of("custom") == "custom"
    assert pool_of("txt2img") == pool_of("remove-background") == "inference"


def test_the_plans_limits_are_asked_for_at_most_once_a_day_per_key() -> None:
    cursors = Cursors()
    store = CapacityStore(cursors, "api.example", "key-a")
    assert store.limits_due(now=1000.0)
    store.limits_asked(now=1000.0)
    assert not store.limits_due(now=1000.0 + 3600)
    assert store.limits_due(now=1000.0 + LIMITS_TTL + 1)
    assert store.limits_due(now=500.0)  # a clock set back does not silence it for a day
    assert CapacityStore(cursors, "api.example", "key-b").limits_due(now=1000.0 + 3600)
