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
def submit(item_id: int) -> str:
    """Submit one item's generation (exactly once, reconciling an earlier intent)."""
    try:
        return stages.submit_item(runtime.context(), item_id)
    except TransientError as exc:
        logger.warning("submit of item %s deferred: %s", item_id, exc)
        return "deferred"


@app.task(name="pipeline.collect")
def collect(item_ids: Sequence[int]) -> dict[int, str]:
    """Download and store the outputs of succeeded jobs."""
    try:
        return stages.collect_items(runtime.context(), list(item_ids))
    except TransientError as exc:
        logger.warning("collect of items %s deferred: %s", list(item_ids), exc)
        return {}


@app.task(name="pipeline.sweep")
def sweep() -> bool:
    """One sweep (for celery beat or a doorbell); the sweeper thread usually does this."""
    try:
        return stages.sweep(runtime.context(), runtime.sweeper_state()).ran
    except TransientError as exc:
        logger.warning("sweep failed: %s", exc)
        return False
