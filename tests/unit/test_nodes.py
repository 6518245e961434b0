"""The node state machine, driven through every transition without a database or a sleep.

`Row` is an in-memory node row; `write` applies a `Change` the way the repository's
conditional UPDATE does (the decided-from state must still hold, and so must the change's
guard), so races and crashes can be played out on a fake clock.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipeline import nodes
from pipeline.nodes import (
    Accepted,
    Cancel,
    Change,
    Claim,
    Dispatch,
    Facts,
    Fail,
    Guard,
    Inc,
    JobCanceled,
    JobFailed,
    NodeState,
    Policy,
    Polled,
    Redispatch,
    Refused,
    Release,
    Renew,
    Stored,
    StoreFailed,
    Succeeded,
    Throttled,
    Unsent,
)
from pipeline.retry import Backoff

T0 = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)
POLICY = Policy(
    lease=90.0,
    max_tries=4,
    resubmit_delay=2.0,
    collect_delay=1.0,
    backoff=Backoff(initial=1.0, multiplier=2.0, maximum=60.0, jitter=0.0, max_attempts=12),
)


@dataclass
class Row:
    """The columns of a node row that transitions read and write."""

    state: NodeState = NodeState.PENDING
    attempts: int = 0
    max_attempts: int = 2
    tries: int = 0
    stores_outputs: bool = True
    error: str | None = None
    hint: str | None = None
    due_at: datetime | None = T0
    claim_owner: str | None = None
    claimed_until: datetime | None = None
    outputs: Any = None
    finished_at: datetime | None = None

    def facts(self) -> Facts:
        return Facts(
            state=self.state,
            attempts=self.attempts,
            max_attempts=self.max_attempts,
            tries=self.tries,
            stores_outputs=self.stores_outputs,
            error=self.error,
        )


def admits(row: Row, change: Change, now: datetime) -> bool:
    """The repository's SQL guards, on a Python row."""
    if change.guard == Guard.OWNER:
        return row.claim_owner == change.owner and (row.claimed_until or now) > now
    if change.guard == Guard.CLAIMABLE:
        return row.claimed_until is not None and (
            row.claim_owner is None or row.claimed_until < now
        )
    if change.guard == Guard.REDISPATCHABLE:
        free_and_due = row.claimed_until is None and (row.due_at is None or row.due_at <= now)
        return free_and_due or (row.claimed_until is not None and row.claimed_until < now)
    return True


def write(row: Row, event: nodes.Event, now: datetime) -> Change | None:
    """Decide, then persist like a conditional UPDATE; None if nothing was written."""
    change = nodes.decide(row.facts(), event, now, POLICY, random.Random(1))
    if change is None or not admits(row, change, now):
        return None
    row.state = change.state
    for name, value in change.values.items():
        setattr(row, name, getattr(row, name) + value.by if isinstance(value, Inc) else value)
    return change


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- one transition at a time --------------------------------------------------------------


def test_a_node_the_sweeper_sends_itself_is_claimed_as_it_is_handed_out() -> None:
    """No claim of its own to write before its POST, and no task can take it meanwhile
    (a duplicate message, a task handed it by an earlier sweep)."""
    row = Row()
    assert write(row, Dispatch("sweeper:1"), at(0))
    assert (row.state, row.tries, row.claim_owner) == (NodeState.SUBMITTING, 1, "sweeper:1")
    assert row.claimed_until == at(90)
    assert not write(row, Claim("a"), at(1))  # held by a live claim
    assert write(row, Renew("sweeper:1"), at(2)) and row.claimed_until == at(92)
    assert write(row, Claim("a"), at(93))  # expired: a task may take it, as after any claim


def test_the_whole_happy_life_of_a_node_that_stores_its_outputs() -> None:
    row = Row()
    assert write(row, Dispatch(), at(0))
    assert (row.state, row.tries, row.claim_owner) == (NodeState.SUBMITTING, 1, None)
    assert row.claimed_until == at(90) and row.due_at is None
    assert write(row, Claim("a"), at(1))
    assert row.claim_owner == "a"
    row.attempts += 1  # the intent (written by the repository under the claim)
    assert write(row, Renew("a"), at(2)) and row.claimed_until == at(92)
    assert write(row, Accepted(first_poll=10.0), at(3))
    assert (row.state, row.claim_owner, row.claimed_until) == (NodeState.RUNNING, None, None)
    assert row.due_at == at(13)
    assert write(row, Polled(next_poll=2.0), at(13)) and row.due_at == at(15)
    change = write(row, Succeeded(("asset_1", "asset_2")), at(15))
    assert change is not None and change.spawn
    assert row.state == NodeState.COLLECTING and row.due_at == at(16)
    assert row.outputs == {"ids": ["asset_1", "asset_2"]} and row.tries == 0
    assert write(row, Redispatch(), at(15.5)) is None  # waits for company first
    assert write(row, Redispatch(), at(16)) and row.tries == 1
    assert write(row, Claim("b"), at(16))
    assert write(row, Stored("b"), at(17))
    assert row.state == NodeState.SUCCEEDED and row.finished_at == at(17)


def test_a_node_with_nothing_to_store_succeeds_with_its_job_and_spawns_the_next_step() -> None:
    row = Row(state=NodeState.RUNNING, stores_outputs=False, due_at=at(0))
    change = write(row, Succeeded(("asset_1",), collect_now=True), at(1))
    assert change is not None and change.spawn and row.state == NodeState.SUCCEEDED


def test_collect_now_skips_the_batching_delay() -> None:
    row = Row(state=NodeState.RUNNING, due_at=at(0))
    write(row, Succeeded(("asset_1",), collect_now=True), at(5))
    assert row.state == NodeState.COLLECTING and row.due_at == at(5)


def test_a_429_puts_the_node_back_without_counting_an_attempt() -> None:
    row = Row(state=NodeState.SUBMITTING, attempts=1, claim_owner="a", claimed_until=at(90))
    assert write(row, Throttled(retry_after=7.0, error="429 parallel jobs"), at(1))
    assert (row.state, row.attempts, row.due_at) == (NodeState.PENDING, 0, at(8))
    assert row.claim_owner is None and row.error == "429 parallel jobs"
    row2 = Row(state=NodeState.SUBMITTING, attempts=1)
    write(row2, Throttled(retry_after=None, error="429"), at(1))
    assert row2.due_at == at(1 + POLICY.resubmit_delay)


def test_a_node_never_sent_goes_back_as_if_never_handed_out() -> None:
    """A refill handed out for slots that did not free after all: its claim, try and
    attempt are undone, it is due at once, and only its owner may give it back."""
    row = Row()
    assert write(row, Dispatch("sweeper:1"), at(0))
    row.attempts += 1  # its intent
    assert not write(row, Unsent("another"), at(1))
    assert write(row, Unsent("sweeper:1"), at(1))
    assert (row.state, row.tries, row.attempts, row.due_at) == (NodeState.PENDING, 0, 0, at(1))
    assert (row.claim_owner, row.claimed_until, row.error) == (None, None, None)


def test_a_refused_submission_fails_with_scenarios_error_and_hint() -> None:
    row = Row(state=NodeState.SUBMITTING, attempts=1)
    assert write(row, Refused("400 width must be a multiple of 8", "use 1024"), at(1))
    assert (row.state, row.error, row.hint, row.attempts) == (
        NodeState.FAILED,
        "400 width must be a multiple of 8",
        "use 1024",
        0,
    )


@pytest.mark.parametrize(("tries", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (9, 60.0)])
def test_release_gives_the_claim_back_with_a_backoff_that_grows_with_tries(
    tries: int, delay: float
) -> None:
    row = Row(state=NodeState.SUBMITTING, tries=tries, claim_owner="a", claimed_until=at(90))
    assert write(row, Release("a", "503 upstream"), at(0))
    assert (row.claim_owner, row.claimed_until) == (None, None)
    assert row.due_at == at(delay) and row.error == "503 upstream"


def test_retry_after_is_a_floor_for_the_backoff() -> None:
    row = Row(state=NodeState.COLLECTING, tries=1, claim_owner="a", claimed_until=at(90))
    write(row, Release("a", "slow down", retry_after=30.0), at(0))
    assert row.due_at == at(30)


def test_a_failed_job_is_resubmitted_while_attempts_remain_then_fails_with_its_cause() -> None:
    row = Row(state=NodeState.RUNNING, attempts=1, max_attempts=2)
    assert write(row, JobFailed("inference worker crashed", "try again"), at(0))
    assert (row.state, row.due_at, row.error) == (
        NodeState.PENDING,
        at(2),
        "inference worker crashed",
    )
    row.state, row.attempts = NodeState.RUNNING, 2
    assert write(row, JobFailed("inference worker crashed again", "try later"), at(5))
    assert (row.state, row.error, row.hint) == (
        NodeState.FAILED,
        "inference worker crashed again",
        "try later",
    )


def test_a_canceled_job_cancels_the_node() -> None:
    row = Row(state=NodeState.RUNNING)
    assert write(row, JobCanceled("canceled on Scenario"), at(0))
    assert row.state == NodeState.CANCELED and row.finished_at == at(0)


def test_storing_fails_for_good_only_under_the_claim() -> None:
    row = Row(state=NodeState.COLLECTING, claim_owner="a", claimed_until=at(90))
    assert write(row, StoreFailed("b", "refused"), at(1)) is None
    assert write(row, StoreFailed("a", "key refused by the bucket"), at(1))
    assert row.state == NodeState.FAILED and row.error == "key refused by the bucket"


@pytest.mark.parametrize("state", sorted(nodes.UNFINISHED_STATES))
def test_cancel_and_fail_end_any_unfinished_node(state: NodeState) -> None:
    row = Row(state=state, claim_owner="a", claimed_until=at(90))
    assert write(row, Cancel("the run's deadline passed"), at(0))
    assert (row.state, row.claim_owner, row.due_at) == (NodeState.CANCELED, None, None)
    row = Row(state=state)
    assert write(row, Fail("credentials refused", "check SCENARIO_API_KEY"), at(0))
    assert (row.state, row.hint) == (NodeState.FAILED, "check SCENARIO_API_KEY")


ALL_EVENTS: list[nodes.Event] = [
    Dispatch(),
    Redispatch(),
    Claim("a"),
    Renew("a"),
    Accepted(1.0),
    Throttled(1.0, "429"),
    Unsent("a"),
    Refused("400"),
    Release("a", "503"),
    Polled(1.0),
    Succeeded(("x",)),
    JobFailed("boom"),
    JobCanceled("gone"),
    Stored("a"),
    StoreFailed("a", "no"),
    Cancel("stop"),
    Fail("stop"),
]


@pytest.mark.parametrize("state", sorted(nodes.FINAL_STATES))
def test_a_final_node_ignores_every_event(state: NodeState) -> None:
    for event in ALL_EVENTS:
        assert nodes.decide(Facts(state), event, T0, POLICY) is None


def test_events_that_do_not_belong_to_a_state_change_nothing() -> None:
    allowed = {
        NodeState.PENDING: {Dispatch, Cancel, Fail},
        NodeState.SUBMITTING: {
            Redispatch,
            Claim,
            Renew,
            Accepted,
            Throttled,
            Unsent,
            Refused,
            Release,
            Cancel,
            Fail,
        },
        NodeState.RUNNING: {Polled, Succeeded, JobFailed, JobCanceled, Cancel, Fail},
        NodeState.COLLECTING: {
            Redispatch,
            Claim,
            Renew,
            Release,
            Stored,
            StoreFailed,
            Cancel,
            Fail,
        },
    }
    for state, events in allowed.items():
        for event in ALL_EVENTS:
            decided = nodes.decide(Facts(state, stores_outputs=True), event, T0, POLICY)
            assert (decided is not None) == (type(event) in events), (state, event)


# -- claims and races ----------------------------------------------------------------------


def test_a_second_delivery_of_the_same_task_finds_the_node_claimed() -> None:
    row = Row()
    write(row, Dispatch(), at(0))
    assert write(row, Claim("a"), at(1))
    assert write(row, Claim("b"), at(2)) is None
    assert row.claim_owner == "a"


def test_a_task_whose_claim_expired_cannot_renew_and_so_never_posts() -> None:
    row = Row()
    write(row, Dispatch(), at(0))
    write(row, Claim("a"), at(1))
    assert write(row, Redispatch(), at(60)) is None  # a's claim is still alive
    assert write(row, Redispatch(), at(92))  # a stalled past its claim
    assert write(row, Claim("b"), at(93))
    assert write(row, Renew("a"), at(94)) is None  # a wakes up: it must not POST
    assert write(row, Renew("b"), at(94))


def test_a_released_node_is_not_claimable_until_handed_out_again() -> None:
    row = Row(state=NodeState.SUBMITTING, tries=1, claim_owner="a", claimed_until=at(90))
    write(row, Release("a", "timeout"), at(0))
    assert write(row, Claim("stray redelivery"), at(0.5)) is None
    assert write(row, Redispatch(), at(0.5)) is None  # not due yet
    assert write(row, Redispatch(), at(1))
    assert write(row, Claim("b"), at(1))


def test_a_poison_node_fails_with_its_last_real_error_not_a_generic_one() -> None:
    row = Row(state=NodeState.COLLECTING, tries=0, due_at=at(0))
    now = 0.0
    for _ in range(POLICY.max_tries):
        assert write(row, Redispatch(), at(now))
        write(row, Claim("w"), at(now))
        write(row, Release("w", "S3 PutObject of out/1.png: 403 AccessDenied"), at(now))
        now += 120
    assert write(row, Redispatch(), at(now))
    assert row.state == NodeState.FAILED
    assert row.error == (
        f"gave up after {POLICY.max_tries} tries; last error: "
        "S3 PutObject of out/1.png: 403 AccessDenied"
    )


def test_a_node_whose_worker_keeps_dying_says_so() -> None:
    row = Row(state=NodeState.SUBMITTING, tries=POLICY.max_tries, claimed_until=at(0))
    write(row, Redispatch(), at(1))
    assert row.state == NodeState.FAILED and "worker kept dying" in (row.error or "")


# -- crashes between any two writes ----------------------------------------------------------


@dataclass
class World:
    """A node, Scenario's jobs for it, and a fake clock; the submit protocol as writes."""

    row: Row
    now: float = 0.0
    posts: int = 0
    intent_open: bool = False

    def clock(self) -> datetime:
        return at(self.now)

    def submit_protocol(self, owner: str, crash_after: int | None) -> None:
        """The writes of one submit task (as stages.submit_nodes makes them); crash after N."""
        steps = [
            lambda: write(self.row, Claim(owner), self.clock()),
            self._intent,
            lambda: write(self.row, Renew(owner), self.clock()),
            self._post,
            lambda: write(self.row, Accepted(5.0), self.clock()),
        ]
        if self.intent_open:
            # An earlier attempt's intent: reconcile against Scenario's jobs before posting.
            steps = [steps[0], self._reconcile]
        for n, step in enumerate(steps):
            if crash_after is not None and n == crash_after:
                return  # the worker died here
            if step() is None and n == 0:
                return  # not claimed: another task has it

    def _intent(self) -> bool:
        self.row.attempts += 1
        self.intent_open = True
        return True

    def _post(self) -> bool:
        self.posts += 1
        return True

    def _reconcile(self) -> bool:
        if self.posts:  # Scenario has the job: record it instead of posting again
            self.intent_open = False
            return write(self.row, Accepted(5.0), self.clock()) is not None
        self._post()
        self.intent_open = False
        return write(self.row, Accepted(5.0), self.clock()) is not None

    def sweep_until_running(self) -> None:
        """What the sweeper does after a crash: wait out claims, hand the node out again."""
        for _ in range(10):
            if self.row.state == NodeState.RUNNING:
                return
            self.now += POLICY.lease + 1
            event = Dispatch() if self.row.state == NodeState.PENDING else Redispatch()
            if write(self.row, event, self.clock()):
                self.submit_protocol("recovery", crash_after=None)
        raise AssertionError(f"stuck in {self.row.state}")


@pytest.mark.parametrize("crash_after", [0, 1, 2, 3, 4])
def test_a_submit_crashing_between_any_two_writes_posts_exactly_once(crash_after: int) -> None:
    world = World(Row())
    write(world.row, Dispatch(), world.clock())
    world.submit_protocol("a", crash_after=crash_after)
    world.sweep_until_running()
    assert world.posts == 1
    assert world.row.attempts == 1


@pytest.mark.parametrize("crash_after", [0, 1, 2])
def test_a_collect_crashing_between_any_two_writes_is_handed_out_again(crash_after: int) -> None:
    row = Row(state=NodeState.RUNNING, due_at=at(0))
    write(row, Succeeded(("a1",)), at(0))
    now = 1.0
    writes = [
        lambda: write(row, Redispatch(), at(now)),
        lambda: write(row, Claim("a"), at(now)),
        lambda: write(row, Stored("a"), at(now)),
    ]
    for n, step in enumerate(writes):
        if n == crash_after:
            break
        assert step()
    now += POLICY.lease + 1
    assert write(row, Redispatch(), at(now))
    assert write(row, Claim("b"), at(now))
    assert write(row, Stored("b"), at(now))
    assert row.state == NodeState.SUCCEEDED


# -- births and items --------------------------------------------------------------------------


def test_a_reused_node_is_born_with_its_outputs_and_pays_nothing() -> None:
    assert nodes.born(reused_outputs=None, stores_outputs=True, now=T0) == (
        NodeState.PENDING,
        {"due_at": T0},
    )
    state, values = nodes.born(reused_outputs=("a1",), stores_outputs=False, now=T0)
    assert state == NodeState.SUCCEEDED and values["outputs"] == {"ids": ["a1"]}
    state, values = nodes.born(reused_outputs=("a1",), stores_outputs=True, now=T0)
    assert state == NodeState.COLLECTING and values["due_at"] == T0


@pytest.mark.parametrize(
    ("states", "status"),
    [
        ([], "pending"),
        ([NodeState.PENDING], "pending"),
        ([NodeState.SUCCEEDED, NodeState.PENDING], "running"),
        ([NodeState.SUCCEEDED, NodeState.RUNNING], "running"),
        ([NodeState.SUCCEEDED, NodeState.SUCCEEDED], "succeeded"),
        ([NodeState.SUCCEEDED, NodeState.FAILED, NodeState.CANCELED], "failed"),
        ([NodeState.SUCCEEDED, NodeState.CANCELED], "canceled"),
        ([NodeState.FAILED, NodeState.COLLECTING], "running"),
    ],
)
def test_an_items_status_comes_from_its_nodes(states: list[NodeState], status: str) -> None:
    assert nodes.item_status(states) == status


def test_errors_are_cut_before_they_are_stored() -> None:
    row = Row(state=NodeState.RUNNING, attempts=2)
    write(row, JobFailed("x" * 100_000), at(0))
    assert row.error is not None and len(row.error) == nodes.MAX_ERROR


def test_apply_mirrors_a_persisted_change() -> None:
    facts = Facts(NodeState.PENDING, tries=2)
    change = nodes.decide(facts, Dispatch(), T0, POLICY)
    assert change is not None
    assert nodes.apply(facts, change) == replace(facts, state=NodeState.SUBMITTING, tries=3)


def test_moves_item_is_false_only_where_no_item_status_can_change() -> None:
    """The repository skips deriving an item again after a move `moves_item` calls inert;
    check that against every item of up to three other nodes."""
    others = [
        list(combo)
        for size in range(3)
        for combo in itertools.combinations_with_replacement(list(NodeState), size)
    ]
    for before, after in itertools.product(NodeState, repeat=2):
        changes = any(
            nodes.item_status([before, *rest]) != nodes.item_status([after, *rest])
            for rest in others
        )
        assert changes <= nodes.moves_item(before, after), (before, after)
    assert not nodes.moves_item(NodeState.SUBMITTING, NodeState.RUNNING)
    assert nodes.moves_item(NodeState.COLLECTING, NodeState.SUCCEEDED)


@pytest.mark.parametrize("event", [Dispatch(), Claim("w"), Renew("w"), Accepted(3.0), Stored("w")])
def test_a_state_only_event_decides_the_same_whatever_else_the_node_holds(event: Any) -> None:
    """The repository decides these once for a batch of nodes in one state."""
    assert isinstance(event, nodes.STATE_ONLY_EVENTS)
    rng = random.Random(5)
    for state in NodeState:
        plain = nodes.decide(Facts(state), event, T0, POLICY)
        for _ in range(20):
            facts = Facts(
                state,
                attempts=rng.randrange(4),
                max_attempts=rng.randrange(1, 4),
                tries=rng.randrange(6),
                stores_outputs=rng.random() < 0.5,
                error=rng.choice([None, "boom"]),
            )
            assert nodes.decide(facts, event, T0, POLICY, rng) == plain
