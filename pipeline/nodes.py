"""A node's life: its states, the events that move it, and the transitions, as pure code.

A node is the unit of work: one Scenario job (with its retries), its input and its outputs.
An item is a small chain or fan-out tree of nodes: the generation, then each recipe step on
every output of the step before it.

    pending ─Dispatch─> submitting ─Accepted─> running ─Succeeded─> collecting ─Stored─> succeeded
      ^ due_at            │ Throttled (429),    │  │  (nothing to store) ────────────> succeeded
      │                   │ Unsent (never sent) │  │
      └───────────────────┘ back to pending     │  └─JobFailed, attempts left: back to pending
                                                └─JobFailed, none left / Refused ──> failed
    submitting, collecting: Release (transient trouble) gives the claim back and sets a timer;
                            Redispatch hands the node to a task again when it is due or its
                            claim expired, and fails it, with its last real error, once the
                            node has been handed out `max_tries` times (a poison node).
    any unfinished node: Cancel ──> canceled; Fail ──> failed.

`decide(facts, event, now, policy)` returns the `Change` to persist, or None when the event
does not apply to the node's state. The repository persists a change with one conditional
UPDATE guarded by the state the decision was made in (and by `Change.guard`), so two workers
racing on one node cannot both move it. Nothing here touches SQL, the network or a clock.

Timers and claims are separate fields: `due_at` says when the sweeper should act next (send
a submit, poll, collect); `claim_owner`/`claimed_until` say which task holds the node and for
how long. Backoff grows with `tries`, the number of times the node was handed to a task.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pipeline.retry import Backoff

MAX_ERROR = 2000  # a stored error message never grows without bound


class NodeState(enum.StrEnum):
    PENDING = "pending"  # waiting for its timer and a parallel-job slot
    SUBMITTING = "submitting"  # handed to a submit task; the job intent may exist
    RUNNING = "running"  # a Scenario job is in flight
    COLLECTING = "collecting"  # the job succeeded; its outputs are being stored
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def holds_slot(self) -> bool:
        """Whether the node counts against the plan's parallel-jobs cap."""
        return self in (NodeState.SUBMITTING, NodeState.RUNNING)


FINAL_STATES = frozenset({NodeState.SUCCEEDED, NodeState.FAILED, NodeState.CANCELED})
UNFINISHED_STATES = frozenset(NodeState) - FINAL_STATES
TASK_STATES = frozenset({NodeState.SUBMITTING, NodeState.COLLECTING})  # handed to tasks
BUSY_STATES = frozenset({NodeState.SUBMITTING, NodeState.RUNNING, NodeState.COLLECTING})


class Guard(enum.StrEnum):
    """What else the row must satisfy, besides still being in the decided-from state."""

    STATE = "state"  # nothing more
    OWNER = "owner"  # claimed by this owner, claim not expired
    CLAIMABLE = "claimable"  # handed out (claimed_until set) and not held by a live task
    REDISPATCHABLE = "redispatchable"  # claim free and due, or claim expired


@dataclass(frozen=True)
class Inc:
    """A column increment, applied in SQL so concurrent writers never lose one."""

    by: int


@dataclass(frozen=True)
class Facts:
    """What a decision needs to know of a node (loaded by the repository)."""

    state: NodeState
    attempts: int = 0
    max_attempts: int = 2
    tries: int = 0
    stores_outputs: bool = False
    error: str | None = None


@dataclass(frozen=True)
class Policy:
    """The timing rules transitions apply."""

    lease: float = 90.0  # a task holding a node longer than this is presumed dead
    max_tries: int = 12  # tasks handed out for one node before it fails (poison guard)
    resubmit_delay: float = 2.0  # wait before a failed generation's next attempt
    collect_delay: float = 10.0  # gather finished nodes up to this long into one collect task
    backoff: Backoff = field(
        default_factory=lambda: Backoff(initial=1.0, multiplier=2.0, maximum=60.0, max_attempts=12)
    )


@dataclass(frozen=True)
class Change:
    """A transition to persist: the new state and the columns to set with it."""

    state: NodeState
    values: dict[str, Any]
    guard: Guard = Guard.STATE
    owner: str | None = None  # for Guard.OWNER
    spawn: bool = False  # the node's outputs feed the recipe's next step: create its nodes


# -- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatch:
    """The sweeper hands a due pending node to a submit task (a parallel-job slot is free),
    or, with an `owner`, takes it for a submission it sends itself (claimed at once)."""

    owner: str | None = None


@dataclass(frozen=True)
class Redispatch:
    """The sweeper hands a submitting/collecting node to a task again: due, or claim expired."""


@dataclass(frozen=True)
class Claim:
    """A task takes the node it was handed."""

    owner: str


@dataclass(frozen=True)
class Renew:
    """A task extends its claim (right before a POST that must not be sent twice)."""

    owner: str


@dataclass(frozen=True)
class Accepted:
    """Scenario accepted the job (or reconciliation found it); first look after `first_poll`."""

    first_poll: float


@dataclass(frozen=True)
class Unsent:
    """A node claimed for a POST that was never sent (its slot did not free after all):
    it goes back to wait, as if never handed out. Its intent is deleted with it."""

    owner: str


@dataclass(frozen=True)
class Throttled:
    """The POST was refused by a limit (429): nothing was created or billed."""

    retry_after: float | None
    error: str


@dataclass(frozen=True)
class Refused:
    """The POST was refused for good (4xx): the node fails with Scenario's error."""

    error: str
    hint: str | None = None


@dataclass(frozen=True)
class Release:
    """Transient trouble (5xx, timeout, storage or database down): try again later."""

    owner: str
    error: str
    retry_after: float | None = None


@dataclass(frozen=True)
class Polled:
    """The job is still running; look again after `next_poll` seconds."""

    next_poll: float


@dataclass(frozen=True)
class Succeeded:
    """The job succeeded with these output assets."""

    asset_ids: tuple[str, ...]
    collect_now: bool = False  # nothing else is about to finish: no batching delay


@dataclass(frozen=True)
class JobFailed:
    error: str
    hint: str | None = None


@dataclass(frozen=True)
class JobCanceled:
    error: str


@dataclass(frozen=True)
class Stored:
    """Every output is stored and recorded."""

    owner: str


@dataclass(frozen=True)
class StoreFailed:
    """Storing failed for good (a refused key, a conflict): the node fails with the cause."""

    owner: str
    error: str
    hint: str | None = None


@dataclass(frozen=True)
class Cancel:
    reason: str


@dataclass(frozen=True)
class Fail:
    reason: str
    hint: str | None = None


# Events whose change depends on nothing but the node's state (and the clock): the repository
# may decide one of them once for many nodes in that state and persist it with one UPDATE.
STATE_ONLY_EVENTS = (Dispatch, Claim, Renew, Accepted, Stored)

Event = (
    Dispatch
    | Redispatch
    | Claim
    | Renew
    | Accepted
    | Unsent
    | Throttled
    | Refused
    | Release
    | Polled
    | Succeeded
    | JobFailed
    | JobCanceled
    | Stored
    | StoreFailed
    | Cancel
    | Fail
)


# -- transitions ---------------------------------------------------------------------------


def cut(text: str | None) -> str | None:
    """An error message short enough to store and show."""
    if text is None or len(text) <= MAX_ERROR:
        return text
    return text[: MAX_ERROR - 1] + "…"


def _at(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=max(0.0, seconds))


def _free() -> dict[str, Any]:
    return {"claim_owner": None, "claimed_until": None}


def _finish(now: datetime, error: str | None = None, hint: str | None = None) -> dict[str, Any]:
    values: dict[str, Any] = {**_free(), "due_at": None, "finished_at": now}
    if error is not None:
        values["error"] = cut(error)
    if hint is not None:
        values["hint"] = cut(hint)
    return values


def decide(
    facts: Facts,
    event: Event,
    now: datetime,
    policy: Policy,
    rng: random.Random | None = None,
) -> Change | None:
    """The change `event` makes to a node in `facts.state`, or None if it does not apply."""
    state = facts.state
    if state.final:
        return None
    match event:
        case Cancel(reason=reason):
            return Change(NodeState.CANCELED, _finish(now, reason))
        case Fail(reason=reason, hint=hint):
            return Change(NodeState.FAILED, _finish(now, reason, hint))
        case Dispatch(owner=owner) if state == NodeState.PENDING:
            values: dict[str, Any] = {"claim_owner": owner, "claimed_until": _at(now, policy.lease)}
            return Change(NodeState.SUBMITTING, values | {"due_at": None, "tries": Inc(1)})
        case Redispatch() if state in TASK_STATES:
            if facts.tries >= policy.max_tries:
                cause = facts.error or "its task was lost every time (a worker kept dying)"
                message = f"gave up after {facts.tries} tries; last error: {cause}"
                return Change(NodeState.FAILED, _finish(now, message), Guard.REDISPATCHABLE)
            values = {"claim_owner": None, "claimed_until": _at(now, policy.lease)}
            values |= {"due_at": None, "tries": Inc(1)}
            return Change(state, values, Guard.REDISPATCHABLE)
        case Claim(owner=owner) if state in TASK_STATES:
            values = {"claim_owner": owner, "claimed_until": _at(now, policy.lease)}
            return Change(state, values, Guard.CLAIMABLE)
        case Renew(owner=owner) if state in TASK_STATES:
            return Change(state, {"claimed_until": _at(now, policy.lease)}, Guard.OWNER, owner)
        case Release(owner=owner, error=error, retry_after=retry_after) if state in TASK_STATES:
            delay = policy.backoff.delay(max(1, facts.tries), rng=rng, retry_after=retry_after)
            values = _free() | {"due_at": _at(now, delay), "error": cut(error)}
            return Change(state, values, Guard.OWNER, owner)
        case Accepted(first_poll=first) if state == NodeState.SUBMITTING:
            # Not guarded by the claim: the job exists, whoever learnt of it records it.
            return Change(NodeState.RUNNING, _free() | {"due_at": _at(now, first)})
        case Unsent(owner=owner) if state == NodeState.SUBMITTING:
            values = _free() | {"due_at": now, "attempts": Inc(-1), "tries": Inc(-1)}
            return Change(NodeState.PENDING, values, Guard.OWNER, owner)
        case Throttled(retry_after=retry_after, error=error) if state == NodeState.SUBMITTING:
            delay = retry_after if retry_after is not None else policy.resubmit_delay
            values = _free() | {"due_at": _at(now, delay), "attempts": Inc(-1)}
            return Change(NodeState.PENDING, values | {"error": cut(error)})
        case Refused(error=error, hint=hint) if state == NodeState.SUBMITTING:
            return Change(NodeState.FAILED, _finish(now, error, hint) | {"attempts": Inc(-1)})
        case Polled(next_poll=next_poll) if state == NodeState.RUNNING:
            return Change(state, {"due_at": _at(now, next_poll)})
        case Succeeded(asset_ids=ids, collect_now=collect_now) if state == NodeState.RUNNING:
            outputs = {"outputs": {"ids": list(ids)}, "error": None, "hint": None}
            if not facts.stores_outputs:
                return Change(NodeState.SUCCEEDED, _finish(now) | outputs, spawn=True)
            due = now if collect_now else _at(now, policy.collect_delay)
            values = _free() | outputs | {"due_at": due, "tries": 0}
            return Change(NodeState.COLLECTING, values, spawn=True)
        case JobFailed(error=error, hint=hint) if state == NodeState.RUNNING:
            if facts.attempts < facts.max_attempts:
                due = _at(now, policy.resubmit_delay)
                retry: dict[str, Any] = {"due_at": due, "error": cut(error), "hint": cut(hint)}
                return Change(NodeState.PENDING, retry)
            return Change(NodeState.FAILED, _finish(now, error, hint))
        case JobCanceled(error=error) if state == NodeState.RUNNING:
            return Change(NodeState.CANCELED, _finish(now, error))
        case Stored(owner=owner) if state == NodeState.COLLECTING:
            values = _finish(now) | {"error": None, "hint": None}
            return Change(NodeState.SUCCEEDED, values, Guard.OWNER, owner)
        case StoreFailed(owner=owner, error=error, hint=hint) if state == NodeState.COLLECTING:
            return Change(NodeState.FAILED, _finish(now, error, hint), Guard.OWNER, owner)
    return None


def born(
    *, reused_outputs: tuple[str, ...] | None, stores_outputs: bool, now: datetime
) -> tuple[NodeState, dict[str, Any]]:
    """A new node's state: pending, or, when an identical node succeeded before, its outputs.

    A reused node pays nothing: it is succeeded at once, or collecting when its outputs
    must be stored (downloaded again only where the stored bytes differ).
    """
    if reused_outputs is None:
        return NodeState.PENDING, {"due_at": now}
    values: dict[str, Any] = {"outputs": {"ids": list(reused_outputs)}}
    if stores_outputs:
        return NodeState.COLLECTING, values | {"due_at": now}
    return NodeState.SUCCEEDED, values | {"due_at": None, "finished_at": now}


def item_status(states: Iterable[NodeState]) -> str:
    """An item's status from its nodes' states (the values of `models.ItemStatus`)."""
    seen = set(states)
    if not seen:
        return "pending"
    if seen - FINAL_STATES:
        return "pending" if seen == {NodeState.PENDING} else "running"
    if NodeState.FAILED in seen:
        return "failed"
    if NodeState.CANCELED in seen:
        return "canceled"
    return "succeeded"


def moves_item(before: NodeState, after: NodeState) -> bool:
    """Whether a node going from `before` to `after` can change its item's status.

    Not when it stays where it is or goes from one busy state to another: an item with a
    busy node is running whatever its other nodes are (`item_status`), so the repository
    need not derive it again for the hot transitions (accepted, succeeded into collecting).
    """
    return before != after and not (before in BUSY_STATES and after in BUSY_STATES)


def apply(facts: Facts, change: Change) -> Facts:
    """The facts after a change (for reasoning and tests; the repository does this in SQL)."""
    values = dict(change.values)
    updates: dict[str, Any] = {"state": change.state}
    for name in ("attempts", "tries"):
        if name in values:
            value = values[name]
            updates[name] = getattr(facts, name) + value.by if isinstance(value, Inc) else value
    if "error" in values:
        updates["error"] = values["error"]
    return Facts(**{**facts.__dict__, **updates})
