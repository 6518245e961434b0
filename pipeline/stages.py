"""The pipeline's stages as plain functions: submit, sweep (poll + dispatch), collect.

They take a `Context` (repository, Scenario client, storage, dispatcher, tuning) and never
import Celery: the tasks in `tasks.py` are thin wrappers, and tests call these directly.

The state machine of an item (all in SQL):

    pending ─sweeper─> submitting ─submit─> running ─sweeper─> collecting ─collect─> succeeded
       ^                  │ (429: back to pending)  │ failure (attempts left)
       └──────────────────┴─────────────────────────┘
    any of them ──> failed | canceled (deadline) ;  skipped (stored earlier, never submitted)
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

from pipeline.errors import (
    ApiPermanentError,
    ApiTransientError,
    AssetUrlExpired,
    AuthError,
    DownloadIncomplete,
    PermanentError,
    StorageConflict,
    TransientError,
)
from pipeline.keys import render_key
from pipeline.models import ItemStatus, JobState
from pipeline.repository import CollectWork, InFlightJob, Repository, SubmitWork
from pipeline.retry import Backoff, poll_delay
from pipeline.scenario import Asset, Job, ScenarioClient
from pipeline.storage import Storage, StoredObject

logger = logging.getLogger(__name__)

SWEEPER_LEASE = "sweeper"
# Jobs made by POST /generate/custom/{modelId}; GET /jobs needs a type to filter by update.
GENERATION_JOB_TYPE = "custom"
POLL_CAP = 30.0  # never leave a job unlooked-at longer than this
MIME_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}


class Dispatcher(Protocol):
    """Hands work to workers (Celery in production, direct calls in some tests)."""

    def submit(self, item_id: int) -> None: ...

    def collect(self, item_ids: Sequence[int]) -> None: ...


@dataclass(frozen=True)
class Tuning:
    """Timing knobs. Defaults suit the real API; tests and benchmarks scale them down."""

    parallel_jobs: int = 4
    lease_seconds: float = 90.0  # a task holding an item longer than this is presumed dead
    max_dispatches: int = 12  # poison guard: tasks handed out for one item before it fails
    list_interval: float = 1.0  # least time between two GET /jobs list polls
    list_overlap: float = 10.0  # updatedAfter margin for clock skew and late writes
    list_max_pages: int = 10  # beyond this, fall back to per-job polls for due jobs
    direct_polls_per_tick: int = 25
    straggler_default: float = 20.0  # a job the list never showed gets its own GET after 3x
    reconcile_window: float = 120.0  # createdAfter = intent time minus this
    resubmit_delay: float = 2.0  # wait before a failed generation's next attempt
    collect_batch: int = 25  # items per collect task (one get-bulk for all their assets)
    collect_delay: float = 1.0  # gather finished items this long into one collect task
    coalesce_fraction: float = 0.05  # of a job's expected duration, to batch list polls
    download_attempts: int = 4
    tick: float = 0.5  # the sweeper's idle wake-up period
    backoff: Backoff = field(
        default_factory=lambda: Backoff(initial=1.0, multiplier=2.0, maximum=60.0, max_attempts=12)
    )


@dataclass
class Context:
    """Everything a stage needs, built once per worker process."""

    repo: Repository
    client: ScenarioClient
    storage: Storage
    dispatch: Dispatcher
    tuning: Tuning = field(default_factory=Tuning)
    worker: str = field(default_factory=lambda: f"w-{uuid.uuid4().hex[:10]}")
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def now(self) -> datetime:
        return self.repo.now()

    def later(self, seconds: float) -> datetime:
        return self.now() + timedelta(seconds=seconds)


# -- submit ------------------------------------------------------------------------------


def submit_item(ctx: Context, item_id: int) -> str:
    """Submit one item's generation exactly once; returns what happened (for logs/tests)."""
    owner = f"{ctx.worker}:{uuid.uuid4().hex[:8]}"
    if not ctx.repo.claim_item(item_id, owner, ItemStatus.SUBMITTING, ctx.tuning.lease_seconds):
        return "not-claimed"
    work = ctx.repo.submit_work(item_id)
    if work is None:
        return "missing"
    if work.open_intent_id is not None:
        # A previous attempt wrote its intent and may have reached Scenario before dying.
        try:
            found = reconcile(ctx, work)
        except TransientError as exc:
            _release(ctx, item_id, owner, work.attempts, f"reconcile failed: {exc}")
            return "released"
        except AuthError as exc:
            ctx.repo.fail_run(work.run_id, _auth_message(exc))
            return "auth-failed"
        if found is not None:
            _record_accepted(ctx, work.open_intent_id, work.model, found, found.cost)
            logger.info("item %s: reconciled with existing job %s", item_id, found.id)
            return "reconciled"
        row_id = work.open_intent_id
    else:
        if work.attempts >= work.max_attempts:
            ctx.repo.fail_item(item_id, f"no attempts left ({work.attempts}/{work.max_attempts})")
            return "exhausted"
        row_id, _ = ctx.repo.record_intent(item_id, work.model)

    def still_ours() -> None:
        # Our lease may have run out while we reconciled or waited for the governor, and
        # the sweeper may have handed the item to another worker that will POST itself.
        # Renewing it right before sending keeps the POST inside our lease (lease_seconds
        # is checked to exceed the HTTP timeout several times over).
        if not ctx.repo.renew_claim(
            item_id, owner, ItemStatus.SUBMITTING, ctx.tuning.lease_seconds
        ):
            raise _ClaimLost(item_id)

    try:
        submission = ctx.client.generate(work.model, work.body, before_send=still_ours)
    except _ClaimLost:
        logger.info("item %s: claim lost before the POST; another worker has it", item_id)
        return "claim-lost"
    except AuthError as exc:
        ctx.repo.record_rejected(row_id, error=_auth_message(exc), retry_at=None)
        ctx.repo.fail_run(work.run_id, _auth_message(exc))
        return "auth-failed"
    except ApiTransientError as exc:
        if exc.status_code == 429:
            # Refused by a limit: nothing was created or billed, so no reconciliation.
            delay = exc.retry_after if exc.retry_after is not None else ctx.tuning.resubmit_delay
            ctx.repo.record_rejected(row_id, error=str(exc), retry_at=ctx.later(delay))
            return "throttled"
        # 5xx, reset or timeout: the job may exist. Keep the intent; the next try reconciles.
        _release(ctx, item_id, owner, work.attempts, str(exc), exc.retry_after)
        return "released"
    except ApiPermanentError as exc:
        ctx.repo.record_rejected(row_id, error=str(exc), retry_at=None, hint=exc.hint)
        return "rejected"
    _record_accepted(ctx, row_id, work.model, submission.job, submission.creative_units)
    return "submitted"


class _ClaimLost(Exception):
    """Our claim on an item expired and another task may own it now."""


def reconcile(ctx: Context, work: SubmitWork) -> Job | None:
    """Find a job that an earlier, interrupted attempt created for this item, if any."""
    assert work.open_intent_at is not None
    since = work.open_intent_at - timedelta(seconds=ctx.tuning.reconcile_window)
    candidates = [
        job
        for job in ctx.client.iter_jobs(created_after=since)
        if job.model_id in (None, work.model) and _echoes(job.input, work.body)
    ]
    if not candidates:
        return None
    known = ctx.repo.known_job_ids(job.id for job in candidates)
    fresh = sorted((j for j in candidates if j.id not in known), key=lambda j: j.created_at)
    return fresh[0] if fresh else None


def _echoes(echoed: dict[str, Any], body: dict[str, Any]) -> bool:
    """Whether a job's echoed input is this body: every field both carry must agree."""
    shared = [k for k in body if k in echoed]
    if "seed" in body and "seed" not in echoed:
        return False
    if not any(k in shared for k in ("prompt", "image")):
        return False
    return all(echoed[k] == body[k] for k in shared)


def _record_accepted(ctx: Context, row_id: int, model: str, job: Job, cost: float | None) -> None:
    expected = ctx.repo.expected_duration(model)
    first = next_poll_in(0.0, expected, 0, ctx.rng)
    state = JobState(str(job.status))
    ctx.repo.record_submitted(
        row_id,
        scenario_job_id=job.id,
        state=JobState.PENDING if state.terminal else state,
        cost=cost if cost is not None else job.cost,
        remote_created_at=job.created_at,
        next_poll_at=ctx.later(first),
    )
    if state.terminal:  # a reconciled job may have finished meanwhile
        _apply_remote(ctx, row_id, job)


def _release(
    ctx: Context,
    item_id: int,
    owner: str,
    tries: int,
    error: str,
    retry_after: float | None = None,
) -> None:
    delay = ctx.tuning.backoff.delay(max(1, tries), rng=ctx.rng, retry_after=retry_after)
    ctx.repo.release_item(item_id, owner, ctx.later(delay), error)


def _auth_message(exc: Exception) -> str:
    return (
        f"Scenario refused the credentials ({exc}); check SCENARIO_API_KEY and "
        "SCENARIO_API_SECRET, then `pipeline retry`"
    )


# -- polling -----------------------------------------------------------------------------


def next_poll_in(
    elapsed: float, expected: float | None, polls: int, rng: random.Random | None = None
) -> float:
    """Seconds until a job is worth looking at again (pure; the list poll is due then).

    With a learned duration the first look lands at the expected finish; an overdue job is
    looked at again after half its delay so far (a geometric backoff, capped). Without
    one, looks come at a fifth of the elapsed time: a detection delay of at most 20% on the
    first jobs of a model, and few requests for a slow one.
    """
    if expected is None:
        if polls == 0 and elapsed == 0:
            return poll_delay(elapsed=0.0, expected=None, polls=0, rng=rng) / 4
        return min(max(0.2 * elapsed, 0.25), POLL_CAP)
    if elapsed < expected:
        return max(0.05, expected - elapsed)
    step = max(0.05 * expected, 0.5 * (elapsed - expected))
    jitter = 1.0 + (rng.uniform(-0.1, 0.1) if rng else 0.0)
    return min(step * jitter, POLL_CAP)


@dataclass
class PollReport:
    """What one poll pass saw (for logs, tests and the benchmark)."""

    list_calls: int = 0
    direct_calls: int = 0
    finished: list[int] = field(default_factory=list)  # item ids now collecting
    failed: int = 0


def poll_jobs(ctx: Context, state: SweeperState) -> PollReport:
    """Advance in-flight jobs: one GET /jobs?updatedAfter= for all, per-job GETs if needed."""
    report = PollReport()
    jobs = ctx.repo.in_flight_jobs()
    if not jobs:
        return report
    now = ctx.now()
    due = [j for j in jobs if j.next_poll_at is None or j.next_poll_at <= now]
    if not due:
        return report
    # Jobs submitted together finish a little apart; waiting a few percent of their
    # duration past the first one lets one list call see the whole group finished.
    earliest = min(j.next_poll_at or now for j in due)
    window = (state.expected(ctx, due[0].model) or 0.0) * ctx.tuning.coalesce_fraction
    if now < earliest + timedelta(seconds=window):
        return report
    mono = time.monotonic()
    if mono - state.last_list_at < ctx.tuning.list_interval:
        return report
    state.last_list_at = mono
    by_id = {j.scenario_job_id: j for j in jobs}
    seen: dict[str, Job] = {}
    list_ok = True
    cursor_key = f"jobs-updated-after:{state.api_host}"
    oldest = min(j.accepted_at for j in jobs) - timedelta(seconds=ctx.tuning.reconcile_window)
    stored = ctx.repo.get_cursor(cursor_key)
    watermark = max(oldest, datetime.fromisoformat(stored)) if stored else oldest
    newest_update: datetime | None = None
    try:
        report.list_calls = 1
        for count, job in enumerate(
            ctx.client.iter_jobs(job_type=GENERATION_JOB_TYPE, updated_after=watermark), start=1
        ):
            if count > ctx.tuning.list_max_pages * 100:
                list_ok = False  # a busy account: the list is too long to be cheap
                break
            if newest_update is None or job.updated_at > newest_update:
                newest_update = job.updated_at
            if job.id in by_id:
                seen[job.id] = job
    except AuthError:
        raise
    except (TransientError, PermanentError) as exc:
        logger.warning("jobs list poll failed (%s); polling due jobs one by one", exc)
        list_ok = False
    if list_ok and newest_update is not None:
        mark = newest_update - timedelta(seconds=ctx.tuning.list_overlap)
        if mark > watermark:
            ctx.repo.set_cursor(cursor_key, mark.isoformat())
    # Per-job GETs where the list cannot be trusted: it failed, or a job it never showed
    # is long overdue (a job type the list filter does not cover, an eventually consistent
    # index). Their own backoff schedule keeps these rare.
    direct = [
        j
        for j in due
        if j.scenario_job_id not in seen and (not list_ok or _straggling(ctx, state, j, now))
    ]
    attempted = {j.scenario_job_id for j in direct[: ctx.tuning.direct_polls_per_tick]}
    for job_id in attempted:
        try:
            seen[job_id] = ctx.client.get_job(job_id)
            report.direct_calls += 1
        except (TransientError, ApiPermanentError) as exc:
            logger.warning("poll of job %s failed: %s", job_id, exc)
    schedule: dict[int, datetime] = {}
    for j in jobs:
        polled = seen.get(j.scenario_job_id)
        if polled is not None and _apply(ctx, j, polled, report):
            continue
        if polled is None and not list_ok and j.scenario_job_id not in attempted:
            continue  # still due: polled on the next tick
        expected = state.expected(ctx, j.model)
        elapsed = (now - j.accepted_at).total_seconds()
        schedule[j.row_id] = now + timedelta(seconds=next_poll_in(elapsed, expected, j.polls))
    ctx.repo.schedule_polls(schedule, polled=True)
    return report


def _straggling(ctx: Context, state: SweeperState, job: InFlightJob, now: datetime) -> bool:
    """A job running three times longer than its model's jobs usually take."""
    expected = state.expected(ctx, job.model) or ctx.tuning.straggler_default
    return (now - job.accepted_at).total_seconds() > 3 * expected


def _apply(ctx: Context, row: InFlightJob, job: Job, report: PollReport) -> bool:
    """Record a polled job; True if it reached a terminal state."""
    new_status = _apply_remote(ctx, row.row_id, job)
    if new_status == ItemStatus.COLLECTING:
        report.finished.append(row.item_id)
    elif new_status is not None:
        report.failed += 1
    return job.status.terminal


def _apply_remote(ctx: Context, row_id: int, job: Job) -> ItemStatus | None:
    """Record what Scenario says of a job; returns the item's new status, if it moved."""
    state = JobState(str(job.status))
    return ctx.repo.apply_job_state(
        row_id,
        state=state,
        progress=job.progress,
        remote_updated_at=job.updated_at,
        asset_ids=job.asset_ids,
        cost=job.cost,
        error=job.error or (f"job {state}" if state == JobState.FAILURE else None),
        hint=job.hint,
        retry_delay=ctx.tuning.resubmit_delay,
        collect_delay=ctx.tuning.collect_delay,
    )


# -- the sweeper -------------------------------------------------------------------------


@dataclass
class SweeperState:
    """What one sweeper remembers between ticks (all of it can be lost safely)."""

    api_host: str
    last_list_at: float = float("-inf")
    expected_cache: dict[str, tuple[float, float | None]] = field(default_factory=dict)

    def expected(self, ctx: Context, model: str) -> float | None:
        at, value = self.expected_cache.get(model, (float("-inf"), None))
        if time.monotonic() - at > 5.0:
            value = ctx.repo.expected_duration(model)
            self.expected_cache[model] = (time.monotonic(), value)
        return value


@dataclass
class TickReport:
    """What one sweep did."""

    ran: bool = False
    submitted: int = 0
    collected: int = 0
    poll: PollReport = field(default_factory=PollReport)
    finished_runs: list[str] = field(default_factory=list)


def sweep(ctx: Context, state: SweeperState) -> TickReport:
    """One pass of the single active sweeper: deadlines, polls, re-dispatch, dispatch."""
    report = TickReport()
    holder = ctx.worker
    # A short lease: when its holder dies another sweeper takes over within seconds. Two
    # overlapping sweeps are safe (every move is a conditional UPDATE), merely wasteful.
    if not ctx.repo.acquire_lease(SWEEPER_LEASE, holder, ttl=max(3.0, ctx.tuning.tick * 10)):
        return report
    report.ran = True
    tuning = ctx.tuning
    for run_id in ctx.repo.overdue_runs():
        cancel_run(ctx, run_id, "the run's deadline passed")
    try:
        report.poll = poll_jobs(ctx, state)
    except AuthError as exc:
        _fail_running_runs(ctx, _auth_message(exc))
    if ctx.repo.in_flight_count() == 0:
        # Nothing else will finish to share a get-bulk with: collect what waits, now.
        ctx.repo.end_collect_delay()
    to_collect = ctx.repo.expired_leases(
        ItemStatus.COLLECTING, tuning.lease_seconds, tuning.max_dispatches
    )
    if to_collect:
        # The oldest finished item has waited long enough: take everyone waiting with it.
        ctx.repo.end_collect_delay()
        to_collect += ctx.repo.expired_leases(
            ItemStatus.COLLECTING, tuning.lease_seconds, tuning.max_dispatches
        )
    for start in range(0, len(to_collect), tuning.collect_batch):
        ctx.dispatch.collect(to_collect[start : start + tuning.collect_batch])
    report.collected = len(to_collect)
    resubmit = ctx.repo.expired_leases(
        ItemStatus.SUBMITTING, tuning.lease_seconds, tuning.max_dispatches
    )
    free = tuning.parallel_jobs - ctx.repo.in_flight_count()
    fresh = ctx.repo.dispatch_pending(free, tuning.lease_seconds)
    for item_id in resubmit + fresh:
        ctx.dispatch.submit(item_id)
    report.submitted = len(resubmit) + len(fresh)
    report.finished_runs = ctx.repo.refresh_runs()
    return report


def cancel_run(ctx: Context, run_id: str, reason: str) -> list[str]:
    """Cancel a run's unfinished items and their remote jobs (best effort on the API)."""
    remote = ctx.repo.cancel_run_items(run_id, reason)
    for job_id in remote:
        try:
            ctx.client.cancel_job(job_id)
        except (TransientError, PermanentError) as exc:
            logger.warning("could not cancel job %s: %s", job_id, exc)
    return remote


def _fail_running_runs(ctx: Context, message: str) -> None:
    for run_id in ctx.repo.running_run_ids():
        ctx.repo.fail_run(run_id, message)


class Sweeper:
    """Runs `sweep` in a loop on a thread until stopped; many may run, one is active."""

    def __init__(self, ctx: Context, api_url: str) -> None:
        self.ctx = ctx
        self.state = SweeperState(api_host=urlsplit(api_url).netloc)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> TickReport:
        try:
            return sweep(self.ctx, self.state)
        except TransientError as exc:
            logger.warning("sweep failed, will retry: %s", exc)
            return TickReport()

    def run(self) -> None:
        while not self._stop.is_set():
            report = self.tick()
            busy = report.submitted or report.collected or report.poll.list_calls
            self._stop.wait(self.ctx.tuning.tick / 5 if busy else self.ctx.tuning.tick)
        try:  # let another sweeper take over at once rather than after the lease
            self.ctx.repo.release_lease(SWEEPER_LEASE, self.ctx.worker)
        except TransientError as exc:
            logger.warning("could not release the sweeper lease: %s", exc)

    def start(self) -> Sweeper:
        self._thread = threading.Thread(target=self.run, name="pipeline-sweeper", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


# -- collect -----------------------------------------------------------------------------


def collect_items(ctx: Context, item_ids: Sequence[int]) -> dict[int, str]:
    """Store the outputs of succeeded jobs; one get-bulk for the whole batch."""
    owner = f"{ctx.worker}:{uuid.uuid4().hex[:8]}"
    results: dict[int, str] = {}
    works: list[CollectWork] = []
    for item_id in item_ids:
        if not ctx.repo.claim_item(item_id, owner, ItemStatus.COLLECTING, ctx.tuning.lease_seconds):
            results[item_id] = "not-claimed"
            continue
        work = ctx.repo.collect_work(item_id)
        if work is None:
            ctx.repo.fail_item(item_id, "no successful job to collect from")
            results[item_id] = "failed"
            continue
        works.append(work)
    if not works:
        return results
    wanted = [a for w in works for i, a in enumerate(w.asset_ids) if i not in w.stored]
    try:
        assets = {a.id: a for a in ctx.client.get_assets(wanted)} if wanted else {}
    except TransientError as exc:
        for w in works:
            _release(ctx, w.item_id, owner, 1, f"asset lookup failed: {exc}", exc.retry_after)
            results[w.item_id] = "released"
        return results
    except AuthError as exc:
        for w in works:
            ctx.repo.fail_run(w.run_id, _auth_message(exc))
            results[w.item_id] = "auth-failed"
        return results
    for work in works:
        try:
            store_outputs(ctx, work, assets)
        except TransientError as exc:
            _release(ctx, work.item_id, owner, 1, str(exc), exc.retry_after)
            results[work.item_id] = "released"
            continue
        except PermanentError as exc:
            ctx.repo.fail_item(work.item_id, str(exc), getattr(exc, "hint", None))
            results[work.item_id] = "failed"
            continue
        ctx.repo.finish_collect(work.item_id, owner)
        results[work.item_id] = "succeeded"
    return results


def store_outputs(ctx: Context, work: CollectWork, assets: dict[str, Asset]) -> None:
    """Download every output of one job into storage and record its lineage."""
    if not work.asset_ids:
        raise PermanentError(f"job {work.scenario_job_id} succeeded without any asset")
    for index, asset_id in enumerate(work.asset_ids):
        if index in work.stored:
            key, sha = work.stored[index]
            if ctx.storage.verify(key, sha):
                continue
        asset = assets.get(asset_id) or ctx.client.get_asset(asset_id)
        mime = asset.mime_type or "image/png"
        key = render_key(
            work.output_template,
            manifest=work.manifest_name,
            item=work.manifest_item_id,
            index=index,
            seed=work.seed,
            item_key=work.item_key,
            ext=MIME_EXT.get(mime, "bin"),
        )
        metadata = {
            "run-id": work.run_id,
            "manifest": work.manifest_name,
            "item": work.manifest_item_id,
            "item-key": work.item_key,
            "seed": str(work.seed),
            "model": work.model,
            "trained-model": work.trained_model or "",
            "job-id": work.scenario_job_id,
            "asset-id": asset_id,
            "output-index": str(index),
        }
        stored, asset = _download_into(ctx, asset, key, mime, metadata)
        ctx.repo.record_output(
            item_id=work.item_id,
            job_row_id=work.job_row_id,
            index=index,
            scenario_asset_id=asset_id,
            mime_type=asset.mime_type,
            width=asset.width,
            height=asset.height,
            source_host=urlsplit(asset.url).hostname if asset.url else None,
            uri=stored.uri,
            key=stored.key,
            sha256=stored.sha256,
            size=stored.size,
            content_type=mime,
            public_url=stored.public_url,
        )


def _download_into(
    ctx: Context, asset: Asset, key: str, mime: str, metadata: dict[str, str]
) -> tuple[StoredObject, Asset]:
    """Stream one asset into storage, refreshing an expired URL and retrying cut bodies."""
    last: TransientError | None = None
    for attempt in range(1, ctx.tuning.download_attempts + 1):
        if not asset.url:
            asset = ctx.client.get_asset(asset.id)
            if not asset.url:
                raise TransientError(f"asset {asset.id} has no URL yet")
        try:
            with ctx.client.download(asset.url) as chunks:
                return ctx.storage.put(key, chunks, content_type=mime, metadata=metadata), asset
        except StorageConflict as exc:
            # Never overwrite; say where the paid-for image still is.
            raise StorageConflict(
                f"{exc}; the new image stays on Scenario as asset {asset.id} "
                f"(job {metadata.get('job-id')}): put {{seed}} or {{item_key}} in `output`"
            ) from exc
        except AssetUrlExpired as exc:
            last = exc
            asset = ctx.client.get_asset(asset.id)  # a fresh signed URL
        except (DownloadIncomplete, ApiTransientError) as exc:
            last = exc
            ctx.sleep(min(ctx.tuning.backoff.delay(attempt, rng=ctx.rng), 5.0))
    raise TransientError(
        f"download of asset {asset.id} failed {ctx.tuning.download_attempts} times: {last}"
    )
