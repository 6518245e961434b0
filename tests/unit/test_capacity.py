"""Learning the plan's parallel-jobs cap from what the API accepts and refuses."""

from __future__ import annotations

from pipeline.capacity import INITIAL, ROUNDS_PER_PROBE, Cap, CapacityStore, cursor_name, pool_of


class Cursors(dict[str, str]):
    def get_cursor(self, name: str) -> str | None:
        return self.get(name)

    def set_cursor(self, name: str, value: str) -> None:
        self[name] = value


def test_an_unknown_plan_starts_small_and_grows_while_every_slot_is_accepted() -> None:
    cap = Cap()
    assert cap.limit(None) == INITIAL
    assert cap.accepted(INITIAL - 1) == cap  # a free slot is no evidence of a higher cap
    for n in range(INITIAL, INITIAL + 5):
        cap = cap.accepted(n)
    assert cap.value == INITIAL + 5


def test_a_refusal_sets_the_cap_to_what_was_running_then_probing_slows_down() -> None:
    cap = Cap(value=12).refused_at(running=8)
    assert (cap.value, cap.refused) == (8, True)
    for _ in range(ROUNDS_PER_PROBE * 8 - 1):
        cap = cap.accepted(8)
    assert cap.value == 8  # one refusal costs at most one retry per ROUNDS_PER_PROBE rounds
    assert cap.accepted(8).value == 9
    assert Cap().refused_at(running=0).value == 1  # never below one
    # Jobs we have not yet seen finish inflate `running`: each refusal still lowers the cap.
    assert Cap(value=7, refused=True).refused_at(running=9).value == 6


def test_a_known_cap_is_never_probed_and_the_ceiling_always_wins() -> None:
    cap = Cap(value=10, known=True)
    assert cap.accepted(10) == cap
    assert cap.limit(ceiling=6) == 6 and cap.limit(ceiling=None) == 10
    assert cap.refused_at(7) == Cap(value=7, known=False, refused=True)
    assert cap.refused_at(12) == Cap(value=9, known=False, refused=True)


def test_caps_are_kept_per_api_key_and_pool_without_the_key_itself() -> None:
    cursors = Cursors()
    store = CapacityStore(cursors, "api.example", "secret-key-123")
    store.known({"custom": 10, "inference": 3})
    store.refused("inference", running=2)
    other = CapacityStore(cursors, "api.example", "another-key")
    assert store.get("custom").value == 10 and store.get("inference").value == 2
    assert other.get("custom") == Cap()
    assert all(
        "secret-key-123" not in name and "secret" not in value for name, value in cursors.items()
    )
    assert cursor_name("h", "k", "custom") != cursor_name("h", "k", "inference")


def test_a_damaged_stored_value_falls_back_to_the_default() -> None:
    assert Cap.loads("{not json") == Cap() and Cap.loads('{"value": "x"}') == Cap()


def test_pools_follow_the_endpoint() -> None:
    assert pool_of("custom") == "custom"
    assert pool_of("txt2img") == pool_of("remove-background") == "inference"
