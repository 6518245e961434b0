"""Every query the pipeline makes. Methods run one transaction each and return plain values.

Concurrency rules (they hold on SQLite and PostgreSQL alike):
- Only the sweeper (one holder of the `sweeper` lease at a time) moves items from
  `pending` to `submitting` and job rows from in-flight to terminal.
- A task may act on an item only after claiming it with a conditional UPDATE that sets
  `lease_owner`; a second delivery of the same message finds the lease taken and drops out.
- A lease that expires (a worker died) makes the item due again for the sweeper.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from pipeline.db import make_sessionmaker, translate_errors
from pipeline.models import (
    FINAL_ITEM_STATUSES,
    IN_FLIGHT_ITEM_STATUSES,
    AssetRole,
    AssetRow,
    CursorRow,
    ItemInputRow,
    ItemRow,
    ItemStatus,
    JobRow,
    JobState,
    LeaseRow,
    ManifestRow,
    ObjectRow,
    RunRow,
    RunStatus,
    utcnow,
)

T = TypeVar("T")


@dataclass(frozen=True)
class NewItem:
    """An item to record in a new run, already expanded from the manifest."""

    manifest_item_id: str
    line: int
    item_key: str
    prompt: str | None
    seed: int
    model: str
    trained_model: str | None
    params: dict[str, Any]
    body: dict[str, Any]
    num_outputs: int
    output_template: str
    inputs: Sequence[tuple[str, str, str, int | None]] = ()  # (role, path, sha256, asset row id)
    skipped_from_id: int | None = None


@dataclass(frozen=True)
class SubmitWork:
    """What a submit task needs, read under its claim."""

    item_id: int
    run_id: str
    model: str
    body: dict[str, Any]
    attempts: int
    max_attempts: int
    open_intent_id: int | None
    open_intent_at: datetime | None


@dataclass(frozen=True)
class InFlightJob:
    """A submitted job the poller is watching."""

    row_id: int
    scenario_job_id: str
    item_id: int
    model: str
    state: JobState
    polls: int
    accepted_at: datetime
    next_poll_at: datetime | None
    last_polled_at: datetime | None


@dataclass(frozen=True)
class CollectWork:
    """One succeeded item whose outputs must be stored."""

    item_id: int
    run_id: str
    manifest_name: str
    manifest_item_id: str
    item_key: str
    seed: int
    model: str
    trained_model: str | None
    output_template: str
    job_row_id: int
    scenario_job_id: str
    asset_ids: tuple[str, ...]
    stored: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (key, sha256)


@dataclass(frozen=True)
class StoredOutput:
    """A verified stored object of an item, as the skip check needs it."""

    item_id: int
    index: int
    key: str
    sha256: str


def new_run_id() -> str:
    """A sortable, unique run id: run_<utc timestamp>_<random>."""
    return "run_" + utcnow().strftime("%Y%m%dT%H%M%S") + "_" + uuid.uuid4().hex[:8]


class Repository:
    """All reads and writes of the lineage database."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self._sessions = make_sessionmaker(engine)
        self.now = clock

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with translate_errors(), self._sessions.begin() as session:
            yield session

    # -- runs ---------------------------------------------------------------------------

    def find_stored_outputs(self, item_keys: Iterable[str]) -> dict[str, list[StoredOutput]]:
        """For each item_key, the objects of the newest item that stored all its outputs."""
        keys = list(set(item_keys))
        found: dict[str, list[StoredOutput]] = {}
        with self._tx() as s:
            for chunk in _chunks(keys, 500):
                rows = s.execute(
                    select(ItemRow)
                    .where(ItemRow.item_key.in_(chunk), ItemRow.status == ItemStatus.SUCCEEDED)
                    .options(selectinload(ItemRow.objects))
                    .order_by(ItemRow.id.desc())
                ).scalars()
                for item in rows:
                    if item.item_key in found or len(item.objects) < item.num_outputs:
                        continue
                    found[item.item_key] = [
                        StoredOutput(item.id, o.output_index, o.key, o.sha256) for o in item.objects
                    ]
        return found

    def key_owners(self, keys: Iterable[str]) -> dict[str, str]:
        """For stored keys among `keys`: the item_key whose output each one holds."""
        wanted = list(set(keys))
        owners: dict[str, str] = {}
        with self._tx() as s:
            for chunk in _chunks(wanted, 500):
                rows = s.execute(
                    select(ObjectRow.key, ItemRow.item_key)
                    .join(ItemRow, ObjectRow.item_id == ItemRow.id)
                    .where(ObjectRow.key.in_(chunk))
                ).all()
                owners.update({key: item_key for key, item_key in rows})
        return owners

    def record_run(
        self,
        *,
        manifest_name: str,
        manifest_path: str,
        manifest_sha256: str,
        manifest_body: str,
        items: Sequence[NewItem],
        trigger: str = "run",
        force: bool = False,
        sandbox: bool = False,
        storage_url: str,
        api_host: str | None,
        git_sha: str | None = None,
        deadline_at: datetime | None = None,
        max_attempts: int = 2,
    ) -> str:
        """Record the manifest, a run and its items in one transaction; return the run id."""
        run_id = new_run_id()
        now = self.now()
        with self._tx() as s:
            manifest = s.execute(
                select(ManifestRow).where(
                    ManifestRow.name == manifest_name, ManifestRow.sha256 == manifest_sha256
                )
            ).scalar_one_or_none()
            if manifest is None:
                manifest = ManifestRow(
                    name=manifest_name,
                    path=manifest_path,
                    sha256=manifest_sha256,
                    body=manifest_body,
                    created_at=now,
                )
                s.add(manifest)
                s.flush()
            run = RunRow(
                id=run_id,
                manifest_id=manifest.id,
                trigger=trigger,
                status=RunStatus.RUNNING,
                force=force,
                sandbox=sandbox,
                git_sha=git_sha,
                api_host=api_host,
                storage_url=storage_url,
                created_at=now,
                deadline_at=deadline_at,
            )
            s.add(run)
            for spec in items:
                skipped = spec.skipped_from_id is not None
                item = ItemRow(
                    run_id=run_id,
                    manifest_item_id=spec.manifest_item_id,
                    line=spec.line,
                    item_key=spec.item_key,
                    prompt=spec.prompt,
                    seed=spec.seed,
                    model=spec.model,
                    trained_model=spec.trained_model,
                    params=spec.params,
                    body=spec.body,
                    num_outputs=spec.num_outputs,
                    output_template=spec.output_template,
                    status=ItemStatus.SKIPPED if skipped else ItemStatus.PENDING,
                    max_attempts=max_attempts,
                    skipped_from_id=spec.skipped_from_id,
                    created_at=now,
                    updated_at=now,
                    finished_at=now if skipped else None,
                )
                s.add(item)
                s.flush()
                for role, path, sha, asset_row_id in spec.inputs:
                    s.add(
                        ItemInputRow(
                            item_id=item.id, role=role, path=path, sha256=sha, asset_id=asset_row_id
                        )
                    )
            s.flush()
            _refresh_run_status(s, run, now)
        return run_id

    def latest_run_id(self) -> str | None:
        """The id of the newest run, if any."""
        with self._tx() as s:
            return s.execute(
                select(RunRow.id).order_by(RunRow.created_at.desc(), RunRow.id.desc()).limit(1)
            ).scalar_one_or_none()

    def run_exists(self, run_id: str) -> bool:
        with self._tx() as s:
            return s.get(RunRow, run_id) is not None

    def reopen_items(
        self, run_id: str, manifest_item_ids: Sequence[str] | None, extra_attempts: int
    ) -> list[str]:
        """Put a run's failed or canceled items back to work as new attempts.

        An item whose last job succeeded (it failed while storing) goes back to collecting,
        so its outputs are fetched again without paying for a new generation.
        Returns the manifest item ids reopened.
        """
        now = self.now()
        reopened: list[str] = []
        with self._tx() as s:
            run = s.get(RunRow, run_id)
            if run is None:
                return []
            query = select(ItemRow).where(
                ItemRow.run_id == run_id,
                ItemRow.status.in_([ItemStatus.FAILED, ItemStatus.CANCELED]),
            )
            if manifest_item_ids:
                query = query.where(ItemRow.manifest_item_id.in_(list(manifest_item_ids)))
            for item in s.execute(query.options(selectinload(ItemRow.jobs))).scalars():
                last = item.jobs[-1] if item.jobs else None
                collected_before = last is not None and last.state == JobState.SUCCESS
                item.status = ItemStatus.COLLECTING if collected_before else ItemStatus.PENDING
                item.max_attempts = item.attempts + extra_attempts
                item.dispatches = 0
                item.error = None
                item.hint = None
                item.lease_owner = None
                item.lease_until = None if not collected_before else now
                item.next_attempt_at = None
                item.finished_at = None
                item.updated_at = now
                reopened.append(item.manifest_item_id)
            if reopened:
                run.status = RunStatus.RUNNING
                run.finished_at = None
                run.error = None
                run.deadline_at = None
        return reopened

    def set_deadline(self, run_id: str, deadline_at: datetime | None) -> None:
        with self._tx() as s:
            s.execute(update(RunRow).where(RunRow.id == run_id).values(deadline_at=deadline_at))

    def run_progress(self, run_id: str) -> dict[str, int]:
        """Item counts by status for one run (cheap; used by --wait)."""
        with self._tx() as s:
            rows = s.execute(
                select(ItemRow.status, func.count())
                .where(ItemRow.run_id == run_id)
                .group_by(ItemRow.status)
            ).all()
        return {str(status): int(n) for status, n in rows}

    def run_status(self, run_id: str) -> RunStatus | None:
        with self._tx() as s:
            run = s.get(RunRow, run_id)
            return run.status if run else None

    def run_report(self, run_id: str) -> dict[str, Any] | None:
        """The run document of interface.md, built from SQL."""
        with self._tx() as s:
            run = s.execute(
                select(RunRow)
                .where(RunRow.id == run_id)
                .options(
                    selectinload(RunRow.manifest),
                    selectinload(RunRow.items).selectinload(ItemRow.jobs),
                    selectinload(RunRow.items)
                    .selectinload(ItemRow.objects)
                    .selectinload(ObjectRow.asset),
                )
            ).scalar_one_or_none()
            if run is None:
                return None
            skipped_sources = {i.skipped_from_id for i in run.items if i.skipped_from_id}
            sources: dict[int, ItemRow] = {}
            if skipped_sources:
                for src in s.execute(
                    select(ItemRow)
                    .where(ItemRow.id.in_(skipped_sources))
                    .options(selectinload(ItemRow.objects).selectinload(ObjectRow.asset))
                ).scalars():
                    sources[src.id] = src
            counts = {"total": len(run.items), "succeeded": 0, "failed": 0, "skipped": 0}
            counts.update({"canceled": 0, "pending": 0})
            cost = 0.0
            items = []
            for item in run.items:
                bucket = {
                    ItemStatus.SUCCEEDED: "succeeded",
                    ItemStatus.FAILED: "failed",
                    ItemStatus.SKIPPED: "skipped",
                    ItemStatus.CANCELED: "canceled",
                }.get(item.status, "pending")
                counts[bucket] += 1
                cost += sum(j.cost_cu or 0.0 for j in item.jobs)
                holder = sources.get(item.skipped_from_id or -1, item)
                items.append(
                    {
                        "id": item.manifest_item_id,
                        "item_key": item.item_key,
                        "status": str(item.status),
                        "attempts": item.attempts,
                        "jobs": [j.scenario_job_id for j in item.jobs if j.scenario_job_id],
                        "error": item.error,
                        "hint": item.hint,
                        "seed": item.seed,
                        "prompt": item.prompt,
                        "outputs": [_output_doc(o) for o in holder.objects],
                    }
                )
            return {
                "run_id": run.id,
                "manifest": {
                    "name": run.manifest.name,
                    "path": run.manifest.path,
                    "sha256": run.manifest.sha256,
                },
                "status": str(run.status),
                "trigger": run.trigger,
                "created_at": run.created_at.isoformat(),
                "finished_at": run.finished_at.isoformat() if run.finished_at else None,
                "error": run.error,
                "counts": counts,
                "creative_units": round(cost, 4),
                "items": items,
            }

    # -- the sweeper ----------------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take or renew the named lease; True if `holder` now holds it."""
        now = self.now()
        until = now + timedelta(seconds=ttl)
        with self._tx() as s:
            taken = s.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.name == name,
                    or_(
                        LeaseRow.holder == holder,
                        LeaseRow.expires_at.is_(None),
                        LeaseRow.expires_at < now,
                    ),
                )
                .values(holder=holder, expires_at=until)
            ).rowcount  # type: ignore[attr-defined]  # CursorResult for DML
            if taken:
                return True
            if s.get(LeaseRow, name) is not None:
                return False
        try:
            with self._tx() as s:
                s.add(LeaseRow(name=name, holder=holder, expires_at=until))
            return True
        except IntegrityError:
            return False

    def release_lease(self, name: str, holder: str) -> None:
        with self._tx() as s:
            s.execute(
                update(LeaseRow)
                .where(LeaseRow.name == name, LeaseRow.holder == holder)
                .values(holder=None, expires_at=None)
            )

    def get_cursor(self, name: str) -> str | None:
        with self._tx() as s:
            row = s.get(CursorRow, name)
            return row.value if row else None

    def set_cursor(self, name: str, value: str) -> None:
        with self._tx() as s:
            row = s.get(CursorRow, name)
            if row is None:
                s.add(CursorRow(name=name, value=value, updated_at=self.now()))
            else:
                row.value = value

    def in_flight_count(self) -> int:
        """Items holding a parallel-job slot: being submitted or running remotely."""
        with self._tx() as s:
            return int(
                s.execute(
                    select(func.count())
                    .select_from(ItemRow)
                    .where(ItemRow.status.in_(list(IN_FLIGHT_ITEM_STATUSES)))
                ).scalar_one()
            )

    def end_collect_delay(self) -> None:
        """Make every collecting item that waits for company due now."""
        now = self.now()
        with self._tx() as s:
            s.execute(
                update(ItemRow)
                .where(
                    ItemRow.status == ItemStatus.COLLECTING,
                    ItemRow.lease_owner.is_(None),
                    ItemRow.lease_until > now,
                )
                .values(lease_until=now)
            )

    def dispatch_pending(self, limit: int, lease_ttl: float) -> list[int]:
        """Move up to `limit` due pending items to submitting; return their ids."""
        if limit <= 0:
            return []
        now = self.now()
        with self._tx() as s:
            ids = list(
                s.execute(
                    select(ItemRow.id)
                    .where(
                        ItemRow.status == ItemStatus.PENDING,
                        or_(ItemRow.next_attempt_at.is_(None), ItemRow.next_attempt_at <= now),
                    )
                    .order_by(ItemRow.next_attempt_at.is_not(None), ItemRow.id)
                    .limit(limit)
                ).scalars()
            )
            if ids:
                s.execute(
                    update(ItemRow)
                    .where(ItemRow.id.in_(ids), ItemRow.status == ItemStatus.PENDING)
                    .values(
                        status=ItemStatus.SUBMITTING,
                        lease_owner=None,
                        lease_until=now + timedelta(seconds=lease_ttl),
                        updated_at=now,
                    )
                )
        return ids

    def expired_leases(
        self, status: ItemStatus, lease_ttl: float, max_dispatches: int
    ) -> list[int]:
        """Items in `status` whose task vanished (lease expired): re-dispatch or give up."""
        now = self.now()
        redo: list[int] = []
        with self._tx() as s:
            rows = s.execute(
                select(ItemRow).where(
                    ItemRow.status == status,
                    or_(ItemRow.lease_until.is_(None), ItemRow.lease_until < now),
                    or_(ItemRow.next_attempt_at.is_(None), ItemRow.next_attempt_at <= now),
                )
            ).scalars()
            for item in rows:
                if item.dispatches >= max_dispatches:
                    _finish_item(
                        s,
                        item,
                        ItemStatus.FAILED,
                        now,
                        error=f"gave up after {item.dispatches} attempts to {status} "
                        "(the item kept failing or its worker kept dying)",
                    )
                    continue
                item.lease_owner = None
                item.lease_until = now + timedelta(seconds=lease_ttl)
                item.dispatches += 1
                item.updated_at = now
                redo.append(item.id)
        return redo

    def in_flight_jobs(self) -> list[InFlightJob]:
        """Every submitted job that has not reached a terminal state."""
        with self._tx() as s:
            rows = s.execute(
                select(JobRow).where(
                    JobRow.scenario_job_id.is_not(None),
                    JobRow.state.in_(
                        [
                            JobState.PENDING,
                            JobState.QUEUED,
                            JobState.WARMING_UP,
                            JobState.IN_PROGRESS,
                            JobState.FINALIZING,
                        ]
                    ),
                )
            ).scalars()
            return [
                InFlightJob(
                    row_id=j.id,
                    scenario_job_id=j.scenario_job_id or "",
                    item_id=j.item_id,
                    model=j.model,
                    state=j.state,
                    polls=j.polls,
                    accepted_at=j.accepted_at or j.intent_at,
                    next_poll_at=j.next_poll_at,
                    last_polled_at=j.last_polled_at,
                )
                for j in rows
            ]

    def expected_duration(self, model: str, sample: int = 20) -> float | None:
        """Median seconds from creation to success of this model's recent jobs.

        Measured on Scenario's own timestamps (createdAt to the updatedAt of success), not
        on when we happened to look: a duration inflated by our polling would push the
        next first poll later, and the one after later still.
        """
        with self._tx() as s:
            rows = s.execute(
                select(JobRow.remote_created_at, JobRow.remote_updated_at)
                .where(
                    JobRow.model == model,
                    JobRow.state == JobState.SUCCESS,
                    JobRow.remote_created_at.is_not(None),
                    JobRow.remote_updated_at.is_not(None),
                )
                .order_by(JobRow.id.desc())
                .limit(sample)
            ).all()
        durations = sorted((f - a).total_seconds() for a, f in rows if a and f)
        return durations[len(durations) // 2] if durations else None

    def schedule_polls(self, schedule: dict[int, datetime], polled: bool) -> None:
        """Set next_poll_at for job rows (and count a poll when they were looked at)."""
        with self._tx() as s:
            now = self.now()
            for row_id, when in schedule.items():
                values: dict[str, Any] = {"next_poll_at": when}
                if polled:
                    values.update(polls=JobRow.polls + 1, last_polled_at=now)
                s.execute(update(JobRow).where(JobRow.id == row_id).values(**values))

    def apply_job_state(
        self,
        row_id: int,
        *,
        state: JobState,
        progress: float,
        remote_updated_at: datetime | None,
        asset_ids: Sequence[str] = (),
        cost: float | None = None,
        error: str | None = None,
        hint: str | None = None,
        retry_delay: float = 0.0,
        collect_delay: float = 0.0,
    ) -> ItemStatus | None:
        """Record a job's remote state; on a terminal state, move its item on.

        Returns the item's new status when it changed (collecting, pending for a new
        attempt, failed, canceled), else None.
        """
        now = self.now()
        with self._tx() as s:
            job = s.get(JobRow, row_id)
            if job is None or job.state.terminal:
                return None
            job.state = state
            job.progress = progress
            job.remote_updated_at = remote_updated_at or job.remote_updated_at
            if cost is not None:
                job.cost_cu = cost
            if not state.terminal:
                return None
            job.finished_at = now
            job.next_poll_at = None
            item = s.get(ItemRow, job.item_id)
            if item is None or item.status != ItemStatus.RUNNING:
                return None
            if state == JobState.SUCCESS:
                job.asset_ids = {"ids": list(asset_ids)}
                item.status = ItemStatus.COLLECTING
                item.lease_owner = None
                # Collected once this passes, together with whatever finished meanwhile:
                # one get-bulk for the batch instead of one per tick.
                item.lease_until = now + timedelta(seconds=collect_delay)
                item.next_attempt_at = None
                item.updated_at = now
                return item.status
            job.error = error
            job.hint = hint
            if state == JobState.CANCELED:
                _finish_item(s, item, ItemStatus.CANCELED, now, error=error or "job canceled")
                return item.status
            if item.attempts < item.max_attempts:
                item.status = ItemStatus.PENDING
                item.next_attempt_at = now + timedelta(seconds=retry_delay)
                item.error = error
                item.hint = hint
                item.updated_at = now
                return item.status
            _finish_item(s, item, ItemStatus.FAILED, now, error=error or "job failed", hint=hint)
            return item.status

    def refresh_runs(self) -> list[str]:
        """Derive the status of running runs from their items; return runs that finished."""
        now = self.now()
        finished = []
        with self._tx() as s:
            for run in s.execute(
                select(RunRow).where(RunRow.status == RunStatus.RUNNING)
            ).scalars():
                if _refresh_run_status(s, run, now):
                    finished.append(run.id)
        return finished

    def running_run_ids(self) -> list[str]:
        with self._tx() as s:
            return list(
                s.execute(select(RunRow.id).where(RunRow.status == RunStatus.RUNNING)).scalars()
            )

    def overdue_runs(self) -> list[str]:
        """Running runs whose deadline has passed."""
        now = self.now()
        with self._tx() as s:
            return list(
                s.execute(
                    select(RunRow.id).where(
                        RunRow.status == RunStatus.RUNNING,
                        RunRow.deadline_at.is_not(None),
                        RunRow.deadline_at < now,
                    )
                ).scalars()
            )

    def cancel_run_items(self, run_id: str, reason: str) -> list[str]:
        """Cancel every unfinished item of a run; return the Scenario job ids still in flight."""
        now = self.now()
        remote: list[str] = []
        with self._tx() as s:
            items = s.execute(
                select(ItemRow)
                .where(
                    ItemRow.run_id == run_id,
                    ItemRow.status.not_in(list(FINAL_ITEM_STATUSES)),
                )
                .options(selectinload(ItemRow.jobs))
            ).scalars()
            for item in items:
                for job in item.jobs:
                    if job.scenario_job_id and not job.state.terminal:
                        remote.append(job.scenario_job_id)
                        job.state = JobState.CANCELED
                        job.error = reason
                        job.finished_at = now
                _finish_item(s, item, ItemStatus.CANCELED, now, error=reason)
        return remote

    def fail_run(self, run_id: str, message: str) -> None:
        """Stop a run: every unfinished item fails with `message` (e.g. bad credentials)."""
        now = self.now()
        with self._tx() as s:
            run = s.get(RunRow, run_id)
            if run is None:
                return
            run.error = message
            for item in s.execute(
                select(ItemRow).where(
                    ItemRow.run_id == run_id,
                    ItemRow.status.not_in(list(FINAL_ITEM_STATUSES)),
                )
            ).scalars():
                _finish_item(s, item, ItemStatus.FAILED, now, error=message)

    # -- submit ---------------------------------------------------------------------------

    def claim_item(self, item_id: int, owner: str, status: ItemStatus, lease_ttl: float) -> bool:
        """Claim an item for one task; False if another task holds it or it moved on."""
        now = self.now()
        with self._tx() as s:
            return bool(
                s.execute(
                    update(ItemRow)
                    .where(
                        ItemRow.id == item_id,
                        ItemRow.status == status,
                        or_(
                            ItemRow.lease_owner.is_(None),
                            ItemRow.lease_until.is_(None),
                            ItemRow.lease_until < now,
                        ),
                    )
                    .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease_ttl))
                ).rowcount  # type: ignore[attr-defined]  # CursorResult for DML
            )

    def renew_claim(self, item_id: int, owner: str, status: ItemStatus, lease_ttl: float) -> bool:
        """Extend a claim this owner still holds; False if the item was handed to another."""
        now = self.now()
        with self._tx() as s:
            return bool(
                s.execute(
                    update(ItemRow)
                    .where(
                        ItemRow.id == item_id,
                        ItemRow.status == status,
                        ItemRow.lease_owner == owner,
                        ItemRow.lease_until > now,
                    )
                    .values(lease_until=now + timedelta(seconds=lease_ttl))
                ).rowcount  # type: ignore[attr-defined]  # CursorResult for DML
            )

    def submit_work(self, item_id: int) -> SubmitWork | None:
        with self._tx() as s:
            item = s.get(ItemRow, item_id)
            if item is None:
                return None
            intent = s.execute(
                select(JobRow)
                .where(JobRow.item_id == item_id, JobRow.state == JobState.INTENT)
                .order_by(JobRow.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            return SubmitWork(
                item_id=item.id,
                run_id=item.run_id,
                model=item.model,
                body=dict(item.body),
                attempts=item.attempts,
                max_attempts=item.max_attempts,
                open_intent_id=intent.id if intent else None,
                open_intent_at=intent.intent_at if intent else None,
            )

    def record_intent(self, item_id: int, model: str) -> tuple[int, datetime]:
        """Write the intent to submit (before the POST); returns (job row id, intent time)."""
        now = self.now()
        with self._tx() as s:
            item = s.get(ItemRow, item_id)
            assert item is not None
            item.attempts += 1
            job = JobRow(
                item_id=item_id,
                attempt=item.attempts,
                model=model,
                state=JobState.INTENT,
                intent_at=now,
            )
            s.add(job)
            s.flush()
            return job.id, now

    def known_job_ids(self, scenario_job_ids: Iterable[str]) -> set[str]:
        ids = list(scenario_job_ids)
        known: set[str] = set()
        with self._tx() as s:
            for chunk in _chunks(ids, 500):
                known.update(
                    s.execute(
                        select(JobRow.scenario_job_id).where(JobRow.scenario_job_id.in_(chunk))
                    ).scalars()  # type: ignore[arg-type]
                )
        return known

    def record_submitted(
        self,
        row_id: int,
        *,
        scenario_job_id: str,
        state: JobState,
        cost: float | None,
        remote_created_at: datetime | None,
        next_poll_at: datetime,
    ) -> None:
        """The POST answered (or reconciliation found the job): the item is running."""
        now = self.now()
        with self._tx() as s:
            job = s.get(JobRow, row_id)
            assert job is not None
            job.scenario_job_id = scenario_job_id
            job.state = state if state != JobState.INTENT else JobState.PENDING
            job.cost_cu = cost
            job.accepted_at = now
            job.remote_created_at = remote_created_at
            job.next_poll_at = next_poll_at
            item = s.get(ItemRow, job.item_id)
            assert item is not None
            if item.status == ItemStatus.SUBMITTING:
                item.status = ItemStatus.RUNNING
                item.lease_owner = None
                item.lease_until = None
                item.updated_at = now

    def record_rejected(
        self, row_id: int, *, error: str, retry_at: datetime | None, hint: str | None = None
    ) -> None:
        """The POST was refused: nothing was created. Retry later or fail the item."""
        now = self.now()
        with self._tx() as s:
            job = s.get(JobRow, row_id)
            assert job is not None
            job.state = JobState.REJECTED
            job.error = error
            job.finished_at = now
            item = s.get(ItemRow, job.item_id)
            assert item is not None
            item.attempts -= 1  # attempts count jobs Scenario accepted, not refusals
            if retry_at is None:
                _finish_item(s, item, ItemStatus.FAILED, now, error=error, hint=hint)
            else:
                item.status = ItemStatus.PENDING
                item.next_attempt_at = retry_at
                item.lease_owner = None
                item.lease_until = None
                item.updated_at = now

    def release_item(self, item_id: int, owner: str, retry_at: datetime, error: str) -> None:
        """Give a claimed item back: the sweeper re-dispatches it at `retry_at`."""
        with self._tx() as s:
            s.execute(
                update(ItemRow)
                .where(ItemRow.id == item_id, ItemRow.lease_owner == owner)
                .values(
                    lease_owner=None,
                    lease_until=retry_at,
                    next_attempt_at=retry_at,
                    error=error,
                    updated_at=self.now(),
                )
            )

    def fail_item(self, item_id: int, error: str, hint: str | None = None) -> None:
        with self._tx() as s:
            item = s.get(ItemRow, item_id)
            if item is not None and not item.status.final:
                _finish_item(s, item, ItemStatus.FAILED, self.now(), error=error, hint=hint)

    # -- inputs ---------------------------------------------------------------------------

    def find_input_asset(self, content_sha256: str, api_host: str) -> tuple[int, str] | None:
        """An uploaded input with these bytes on this API: (row id, Scenario asset id)."""
        with self._tx() as s:
            row = s.execute(
                select(AssetRow)
                .where(
                    AssetRow.role == AssetRole.INPUT,
                    AssetRow.content_sha256 == content_sha256,
                    AssetRow.api_host == api_host,
                )
                .order_by(AssetRow.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            return (row.id, row.scenario_asset_id) if row else None

    def record_input_asset(
        self, scenario_asset_id: str, content_sha256: str, api_host: str, mime_type: str
    ) -> int:
        with self._tx() as s:
            row = AssetRow(
                scenario_asset_id=scenario_asset_id,
                role=AssetRole.INPUT,
                content_sha256=content_sha256,
                api_host=api_host,
                mime_type=mime_type,
            )
            s.add(row)
            s.flush()
            return row.id

    # -- collect --------------------------------------------------------------------------

    def collect_work(self, item_id: int) -> CollectWork | None:
        with self._tx() as s:
            item = s.execute(
                select(ItemRow)
                .where(ItemRow.id == item_id)
                .options(
                    selectinload(ItemRow.jobs),
                    selectinload(ItemRow.objects),
                    selectinload(ItemRow.run).selectinload(RunRow.manifest),
                )
            ).scalar_one_or_none()
            if item is None or not item.jobs or item.jobs[-1].state != JobState.SUCCESS:
                return None
            job = item.jobs[-1]
            return CollectWork(
                item_id=item.id,
                run_id=item.run_id,
                manifest_name=item.run.manifest.name,
                manifest_item_id=item.manifest_item_id,
                item_key=item.item_key,
                seed=item.seed,
                model=item.model,
                trained_model=item.trained_model,
                output_template=item.output_template,
                job_row_id=job.id,
                scenario_job_id=job.scenario_job_id or "",
                asset_ids=tuple((job.asset_ids or {}).get("ids", [])),
                stored={o.output_index: (o.key, o.sha256) for o in item.objects},
            )

    def record_output(
        self,
        *,
        item_id: int,
        job_row_id: int,
        index: int,
        scenario_asset_id: str,
        mime_type: str | None,
        width: int | None,
        height: int | None,
        source_host: str | None,
        uri: str,
        key: str,
        sha256: str,
        size: int,
        content_type: str,
        public_url: str | None,
    ) -> None:
        """Record one stored output and the Scenario asset it came from (idempotent)."""
        with self._tx() as s:
            asset = s.execute(
                select(AssetRow).where(AssetRow.scenario_asset_id == scenario_asset_id)
            ).scalar_one_or_none()
            if asset is None:
                asset = AssetRow(
                    scenario_asset_id=scenario_asset_id,
                    role=AssetRole.OUTPUT,
                    job_id=job_row_id,
                    output_index=index,
                    mime_type=mime_type,
                    width=width,
                    height=height,
                    source_host=source_host,
                )
                s.add(asset)
                s.flush()
            existing = s.execute(
                select(ObjectRow).where(
                    ObjectRow.item_id == item_id, ObjectRow.output_index == index
                )
            ).scalar_one_or_none()
            if existing is not None:
                return
            s.add(
                ObjectRow(
                    item_id=item_id,
                    asset_id=asset.id,
                    output_index=index,
                    uri=uri,
                    key=key,
                    sha256=sha256,
                    bytes=size,
                    content_type=content_type,
                    public_url=public_url,
                    created_at=self.now(),
                )
            )

    def finish_collect(self, item_id: int, owner: str) -> bool:
        """All outputs stored: the item succeeded."""
        now = self.now()
        with self._tx() as s:
            item = s.get(ItemRow, item_id)
            if item is None or item.status != ItemStatus.COLLECTING:
                return False
            _finish_item(s, item, ItemStatus.SUCCEEDED, now)
            item.error = None
            item.hint = None
            return True

    # -- lineage --------------------------------------------------------------------------

    def lineage(self, ref: str, key_candidates: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Trace a storage URI or key, sha256, Scenario asset id or job id to its origin."""
        with self._tx() as s:
            conditions = [
                ObjectRow.uri == ref,
                ObjectRow.key == ref,
                ObjectRow.sha256 == ref.lower(),
                AssetRow.scenario_asset_id == ref,
                JobRow.scenario_job_id == ref,
            ]
            for candidate in key_candidates:
                conditions += [ObjectRow.key == candidate, ObjectRow.uri == candidate]
            rows = s.execute(
                select(ObjectRow, AssetRow, JobRow, ItemRow, RunRow, ManifestRow)
                .join(AssetRow, ObjectRow.asset_id == AssetRow.id)
                .join(ItemRow, ObjectRow.item_id == ItemRow.id)
                .join(JobRow, AssetRow.job_id == JobRow.id)
                .join(RunRow, ItemRow.run_id == RunRow.id)
                .join(ManifestRow, RunRow.manifest_id == ManifestRow.id)
                .where(or_(*conditions))
                .order_by(ObjectRow.id)
            ).all()
            docs = []
            for obj, asset, job, item, run, manifest in rows:
                inputs = s.execute(
                    select(ItemInputRow, AssetRow)
                    .outerjoin(AssetRow, ItemInputRow.asset_id == AssetRow.id)
                    .where(ItemInputRow.item_id == item.id)
                ).all()
                docs.append(
                    {
                        "object": _output_doc(obj)
                        | {
                            "key": obj.key,
                            "content_type": obj.content_type,
                            "stored_at": obj.created_at.isoformat(),
                        },
                        "run": {
                            "id": run.id,
                            "status": str(run.status),
                            "trigger": run.trigger,
                            "created_at": run.created_at.isoformat(),
                            "git_sha": run.git_sha,
                        },
                        "manifest": {
                            "name": manifest.name,
                            "path": manifest.path,
                            "sha256": manifest.sha256,
                        },
                        "item": {
                            "id": item.manifest_item_id,
                            "line": item.line,
                            "item_key": item.item_key,
                            "prompt": item.prompt,
                            "seed": item.seed,
                            "model": item.model,
                            "trained_model": item.trained_model,
                            "params": item.params,
                        },
                        "job": {
                            "id": job.scenario_job_id,
                            "attempt": job.attempt,
                            "status": str(job.state),
                            "creative_units": job.cost_cu,
                            "submitted_at": job.accepted_at.isoformat()
                            if job.accepted_at
                            else None,
                            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
                        },
                        "asset": {
                            "id": asset.scenario_asset_id,
                            "index": asset.output_index,
                            "mime_type": asset.mime_type,
                            "width": asset.width,
                            "height": asset.height,
                            "source_host": asset.source_host,
                        },
                        "inputs": [
                            {
                                "role": inp.role,
                                "path": inp.path,
                                "sha256": inp.sha256,
                                "asset_id": a.scenario_asset_id if a else None,
                            }
                            for inp, a in inputs
                        ],
                    }
                )
            return docs


def _output_doc(obj: ObjectRow) -> dict[str, Any]:
    return {
        "index": obj.output_index,
        "uri": obj.uri,
        "sha256": obj.sha256,
        "bytes": obj.bytes,
        "asset_id": obj.asset.scenario_asset_id if obj.asset else None,
        "public_url": obj.public_url,
    }


def _finish_item(
    s: Session,
    item: ItemRow,
    status: ItemStatus,
    now: datetime,
    *,
    error: str | None = None,
    hint: str | None = None,
) -> None:
    item.status = status
    item.finished_at = now
    item.updated_at = now
    item.lease_owner = None
    item.lease_until = None
    item.next_attempt_at = None
    if error is not None:
        item.error = error
    if hint is not None:
        item.hint = hint


def _refresh_run_status(s: Session, run: RunRow, now: datetime) -> bool:
    """Set a run's status from its items' states; True if it just finished."""
    counts = dict(
        s.execute(
            select(ItemRow.status, func.count())
            .where(ItemRow.run_id == run.id)
            .group_by(ItemRow.status)
        ).all()
    )
    if any(status not in FINAL_ITEM_STATUSES for status in counts):
        return False
    if counts.get(ItemStatus.FAILED):
        status = RunStatus.FAILED
    elif counts.get(ItemStatus.CANCELED):
        status = RunStatus.CANCELED
    else:
        status = RunStatus.SUCCEEDED
    changed = run.status != status or run.finished_at is None
    run.status = status
    run.finished_at = run.finished_at or now
    return changed and status != RunStatus.RUNNING


def _chunks(seq: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


__all__ = [
    "CollectWork",
    "InFlightJob",
    "NewItem",
    "Repository",
    "StoredOutput",
    "SubmitWork",
    "new_run_id",
]
