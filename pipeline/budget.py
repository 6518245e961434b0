"""Budgets: a run never spends more than its cap by more than one submission's cost.

A run's budget (`run --budget CU` or the manifest's `budget:`) is stored on its row with
what it spent (`spent_cu`: CU billed) and what is reserved (`reserved_cu`: the priced cost
of POSTs under way). Before each POST, `gate` prices the node with a dry run (cached by
request for the process) and reserves that cost with one conditional UPDATE:

    UPDATE runs SET reserved_cu = reserved_cu + :price
     WHERE id = :run AND budget_reached_at IS NULL
       AND spent_cu + reserved_cu + :price <= budget_cu

so any number of workers can never reserve together more than the budget (the row is the
lock on PostgreSQL; SQLite serialises writers). An accepted POST settles its reservation
with the CU billed (the POST's `creativeUnitsCost`, else the job's `billing.cuCost`, else the
priced cost); a refused, throttled or failed POST releases it. The first refusal for the
budget marks the run (`budget_reached_at`): no submission is made after it, the node is
canceled and so are the run's pending nodes, with the reason "budget of N CU reached: M CU
billed". Jobs already in flight finish and are stored.

Only `stages.submit_nodes` calls in here (a few lines around the POST).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from pipeline import nodes
from pipeline.errors import PermanentError, TransientError
from pipeline.models import JobRow, NodeRow, RunRow
from pipeline.nodes import NodeState

if TYPE_CHECKING:
    from pipeline.repository import Repository, SubmitWork
    from pipeline.stages import Context

logger = logging.getLogger(__name__)

EPSILON = 1e-9
_budgets: dict[str, float | None] = {}  # run id -> budget (it never changes once recorded)
_prices: dict[str, float] = {}  # request fingerprint -> CU (dry runs cost nothing but time)
_lock = threading.Lock()


class Refused:
    """`gate`'s answer when the node may not be submitted (already handled)."""

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome


def run_budget(repo: Repository, run_id: str) -> float | None:
    """The run's budget in CU (None: no cap)."""
    with _lock:
        if run_id in _budgets:
            return _budgets[run_id]
    with repo.session() as s:
        budget = s.execute(select(RunRow.budget_cu).where(RunRow.id == run_id)).scalar()
    with _lock:
        _budgets[run_id] = budget
    return budget


def fingerprint(model: str, endpoint: str, body: dict[str, Any]) -> str:
    """What decides a request's price (the same request: the same node key)."""
    return json.dumps([model, endpoint, body], sort_keys=True, separators=(",", ":"))


def price(ctx: Context, model: str, endpoint: str, body: dict[str, Any]) -> float:
    """A request's cost in CU by dry run, cached for the process."""
    key = fingerprint(model, endpoint, body)
    with _lock:
        if key in _prices:
            return _prices[key]
    cost = ctx.client.dry_run(model, body, endpoint)
    with _lock:
        _prices[key] = cost
    return cost


def gate(ctx: Context, work: SubmitWork, owner: str, row_id: int) -> float | Refused:
    """Reserve the node's priced cost before its POST: the CU reserved, or Refused."""
    budget = run_budget(ctx.repo, work.run_id)
    if budget is None:
        return 0.0
    try:
        cost = price(ctx, work.model, work.endpoint, work.body)
    except TransientError as exc:
        ctx.repo.transition(
            work.node_id, nodes.Release(owner, f"pricing failed: {exc}", exc.retry_after)
        )
        return Refused("released")
    except PermanentError:
        cost = 0.0  # the POST will be refused the same way; it reports why
    if reserve(ctx.repo, work.run_id, cost):
        return cost
    spent = stop(ctx.repo, work.run_id, work.node_id, row_id, budget)
    logger.warning(
        "run %s: budget of %s CU reached (%s CU billed); node %s not submitted",
        work.run_id,
        _cu(budget),
        _cu(spent),
        work.node_id,
    )
    return Refused("over-budget")


def reserve(repo: Repository, run_id: str, amount: float) -> bool:
    """Reserve `amount` CU of the run's budget atomically; False if it would not fit."""
    with repo.session() as s:
        done = s.execute(
            update(RunRow)
            .where(
                RunRow.id == run_id,
                RunRow.budget_cu.is_not(None),
                RunRow.budget_reached_at.is_(None),
                RunRow.spent_cu + RunRow.reserved_cu + amount <= RunRow.budget_cu + EPSILON,
            )
            .values(reserved_cu=RunRow.reserved_cu + amount)
            .execution_options(synchronize_session=False)
        ).rowcount
    return bool(done)


def settle(repo: Repository, run_id: str, reserved: float, billed: float | None) -> None:
    """A POST was accepted: its reservation becomes the CU billed."""
    if run_budget(repo, run_id) is None:
        return
    cost = reserved if billed is None else billed
    with repo.session() as s:
        s.execute(
            update(RunRow)
            .where(RunRow.id == run_id)
            .values(
                reserved_cu=RunRow.reserved_cu - reserved,
                spent_cu=RunRow.spent_cu + cost,
            )
            .execution_options(synchronize_session=False)
        )


def release(repo: Repository, run_id: str, reserved: float) -> None:
    """A POST was not accepted (refused, throttled, failed): nothing billed, free its CU."""
    if not reserved:
        return
    with repo.session() as s:
        s.execute(
            update(RunRow)
            .where(RunRow.id == run_id)
            .values(reserved_cu=RunRow.reserved_cu - reserved)
            .execution_options(synchronize_session=False)
        )


@contextmanager
def held(repo: Repository, run_id: str, reserved: float) -> Iterator[None]:
    """Around the POST: a failure of any kind releases the reservation."""
    try:
        yield
    except BaseException:
        release(repo, run_id, reserved)
        raise


def stop(repo: Repository, run_id: str, node_id: int, row_id: int, budget: float) -> float:
    """The budget is reached: cancel this node and the run's pending ones; the CU billed."""
    now = repo.now()
    with repo.session() as s:
        s.execute(
            update(RunRow)
            .where(RunRow.id == run_id, RunRow.budget_reached_at.is_(None))
            .values(budget_reached_at=now)
            .execution_options(synchronize_session=False)
        )
        spent = float(s.execute(select(RunRow.spent_cu).where(RunRow.id == run_id)).scalar() or 0.0)
        reason = f"budget of {_cu(budget)} CU reached: {_cu(spent)} CU billed"
        job = s.get(JobRow, row_id)
        if job is not None and job.scenario_job_id is None:
            job.error = reason
            job.finished_at = now
        pending = list(
            s.execute(
                select(NodeRow.id).where(
                    NodeRow.run_id == run_id, NodeRow.state == NodeState.PENDING
                )
            ).scalars()
        )
    repo.transition_many([node_id, *pending], nodes.Cancel(reason))
    return spent


def _cu(value: float) -> str:
    return f"{value:g}"
