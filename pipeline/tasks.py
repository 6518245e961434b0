"""Celery tasks: ids in, call the stage, never raise into Celery.

A task that hits a transient error simply leaves the item's lease to expire; the sweeper
re-dispatches it with backoff. No `self.retry(countdown=...)` chains: on Redis a countdown
longer than the visibility timeout is redelivered again and again (celery#2599, #4400).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pipeline import runtime, stages
from pipeline.celery_app import app
from pipeline.errors import TransientError

logger = logging.getLogger(__name__)


@app.task(name="pipeline.submit")
def submit(node_ids: Sequence[int] | int, dispatched_at: float | None = None) -> dict[int, str]:
    """Submit the jobs of nodes handed out together (each exactly once, reconciling an
    earlier intent) at `dispatched_at` (epoch seconds). A message from before batches
    carries one id."""
    batch = [node_ids] if isinstance(node_ids, int) else list(node_ids)
    try:
        return stages.submit_nodes(runtime.context(), batch, dispatched_at)
    except TransientError as exc:
        logger.warning("submit of nodes %s deferred: %s", batch, exc)
        _note(batch, exc)
        return {}
    except Exception as exc:
        logger.exception("submit of nodes %s failed unexpectedly", batch)
        _note(batch, exc)
        return {}


@app.task(name="pipeline.collect")
def collect(node_ids: Sequence[int]) -> dict[int, str]:
    """Download and store the outputs of succeeded jobs."""
    try:
        return stages.collect_nodes(runtime.context(), list(node_ids))
    except TransientError as exc:
        logger.warning("collect of nodes %s deferred: %s", list(node_ids), exc)
        _note(node_ids, exc)
        return {}
    except Exception as exc:
        logger.exception("collect of nodes %s failed unexpectedly", list(node_ids))
        _note(node_ids, exc)
        return {}


def _note(node_ids: Sequence[int], exc: BaseException) -> None:
    """Keep the cause on the nodes: if it keeps happening, they fail with it."""
    try:
        ctx = runtime.context()
    except Exception:  # what failed the task fails here too; the claims expire all the same
        logger.warning("could not record the error of nodes %s", list(node_ids))
        return
    stages.note_errors(ctx, node_ids, exc)


@app.task(name="pipeline.warm")
def warm() -> None:
    """Sent once as an in-process worker starts, so that a run's first wave does not pay
    for first times on its way to its first submission (see `stages.warm`)."""
    try:
        stages.warm(runtime.context())
    except Exception as exc:  # an optimisation only: whatever failed fails again, later
        logger.debug("warm-up failed: %s", exc)


@app.task(name="pipeline.sweep")
def sweep() -> bool:
    """One sweep (for celery beat or a doorbell); the sweeper thread usually does this."""
    try:
        return stages.sweep(runtime.context(), runtime.sweeper_state()).ran
    except TransientError as exc:
        logger.warning("sweep failed: %s", exc)
        return False


@app.task(name="pipeline.scheduled")
def scheduled(folder: str) -> int:
    """Celery beat's nightly entry: one run per manifest in `folder` (pipeline/schedule.py)."""
    from pipeline.schedule import start_scheduled_runs

    return start_scheduled_runs(folder)
