"""The pipeline's stages as plain functions: submit, sweep (poll + dispatch), collect.

They take a `Context` (repository, Scenario client, storage, dispatcher, tuning) and never
import Celery: the tasks in `tasks.py` are thin wrappers, and tests call these directly.
Each stage talks to Scenario or the bucket and turns what happened into an event of
`pipeline.nodes`; the repository persists the transition that event makes.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

from pipeline import budget, nodes
from pipeline.capacity import POOLS, CapacityStore, pool_of
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
from pipeline.nodes import NodeState
from pipeline.repository import (
    CollectWork,
    Handout,
    InFlightJob,
    NewObject,
    ReadAhead,
    Repository,
    SubmitWork,
)
from pipeline.retry import Backoff, poll_delay
from pipeline.scenario import Asset, Job, JobStatus, ScenarioClient
from pipeline.storage import Storage, StoredObject

logger = logging.getLogger(__name__)

SWEEPER_LEASE = "sweeper"
POLL_CAP = 30.0  # never leave a job unlooked-at longer than this
LIST_INTERVAL_MIN = 0.1
LIST_INTERVAL_MAX = 1.0
SWEEP_MIN_SLEEP = 0.02
POLL_MIN_SLEEP = 0.001  # the least wait for a poll that is due to the millisecond
# How early a pass that lists for a group of jobs starts, so that its reads and its refill's
# hand-out are done when the group's last job is due: learnt (`SweeperState.learn_lead`).
LEAD_DEFAULT = 0.01
LEAD_BOUNDS = (0.002, 0.05)
RUNS_REFRESH = 0.25  # at most this long between two derivations of run statuses
FRESH_CLAIM = 1 / 90  # of the lease: a submit claim this young is not renewed before its POST
RECORD_EVERY = 0.1  # seconds: how often a batch records the acceptances of its POSTs
REFILL_HOLD = 0.05  # seconds the sweeper waits for the answers to the POSTs it sent
DURATIONS_TTL = 5.0  # seconds a model's known job durations are read again after
START_SAMPLES = 16  # recent POST answers that tell Scenario's clock from ours (JobStarts)
MIME_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}


class Dispatcher(Protocol):
    """Hands work to workers (Celery in production, direct calls in some tests)."""

    def submit(self, node_ids: Sequence[int]) -> None: ...

    def collect(self, node_ids: Sequence[int]) -> None: ...


@dataclass(frozen=True)
class Tuning:
    """Timing knobs. Defaults suit the real API; tests and benchmarks scale them down."""

    parallel_jobs: int | None = None  # a ceiling; the cap itself is learned (pipeline.capacity)
    lease_seconds: float = 90.0  # a task holding a node longer than this is presumed dead
    max_dispatches: int = 12  # poison guard: tasks handed out for one node before it fails
    # Least time between two GET /jobs list polls; None: a twentieth of the shortest expected
    # job duration in flight, within [LIST_INTERVAL_MIN, LIST_INTERVAL_MAX].
    list_interval: float | None = None
    # updatedAfter margin for late writes to the API's index (both ends of it are Scenario's own
    # timestamps, so no clock skew): wider would page through every job of the last seconds
    # on every poll. A job the list misses is still found by its own poll (straggling).
    list_overlap: float = 2.0
    list_max_pages: int = 10  # beyond this, fall back to per-job polls for due jobs
    direct_polls_per_tick: int = 25
    straggler_default: float = 20.0  # a job the list never showed gets its own GET after 3x
    reconcile_window: float = 120.0  # createdAfter = intent time minus this
    resubmit_delay: float = 2.0  # wait before a failed generation's next attempt
    submit_batch: int = 10  # nodes per submit task at most (their SQL is batched, POSTs parallel)
    # Small work is done by the sweeper's own thread, not handed to a task: up to a batch of
    # new submissions (the slots a list saw freed, a run's first wave), whose POSTs go out
    # before the list's records are written, and the collect of the last jobs in flight,
    # after which the runs they end are marked at once.
    in_sweeper: bool = True
    collect_batch: int = 25  # nodes per collect task (one get-bulk for all their assets)
    # Gather finished nodes up to this long into one collect task: a finished job holds no
    # slot and its children are already spawned, so storing later costs nothing but one
    # get-bulk per batch. A full batch goes at once, and so does everything waiting once
    # the last jobs are in flight (their run time hides the storing) or none are.
    collect_delay: float = 10.0
    coalesce_fraction: float = 0.02  # of a job's expected duration, to batch list polls
    download_attempts: int = 4
    tick: float = 0.5  # the sweeper's longest sleep; it wakes sooner when a timer is due
    backoff: Backoff = field(
        default_factory=lambda: Backoff(initial=1.0, multiplier=2.0, maximum=60.0, max_attempts=12)
    )

    def policy(self) -> nodes.Policy:
        """The node transition rules these timings imply."""
        return nodes.Policy(
            lease=self.lease_seconds,
            max_tries=self.max_dispatches,
            resubmit_delay=self.resubmit_delay,
            collect_delay=self.collect_delay,
            backoff=self.backoff,
        )


@dataclass
class JobStarts:
    """When Scenario started a job, on our clock.

    The answer to a POST comes some milliseconds after Scenario created its job, and by a
    varying delay: a first look timed from the answer lands that much after the job ends.
    Scenario's `createdAt` is on its clock, not ours. What separates the two, plus the
    quickest answer, is the least (our clock when a POST was answered - the job's
    `createdAt`) over the recent answers: a job's `createdAt` plus it is never later than
    its answer, and not earlier than its creation while the two clocks keep their distance.
    Should Scenario's clock fall behind ours, the estimate would be early until the gaps
    from before have left the window; it is never earlier than the POST was sent, which
    bounds the error by the POST's own time (a look that comes early costs one list call)."""

    recent: deque[float] = field(default_factory=lambda: deque(maxlen=START_SAMPLES))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def started(
        self, created: datetime, answered: datetime, sent: datetime | None = None
    ) -> datetime:
        """A job created at `created` (Scenario's clock), POSTed at `sent` and answered at
        `answered` (ours): when it started on our clock. Without `sent`, a job found by a
        reconciliation (created long before), whose gap teaches nothing."""
        gap = (answered - created).total_seconds()
        with self.lock:
            if sent is not None:
                self.recent.append(gap)
            least = min(self.recent, default=gap)
        started = created + timedelta(seconds=min(least, gap))
        return started if sent is None else max(started, sent)


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
    capacity: CapacityStore | None = None
    wake: threading.Event = field(default_factory=threading.Event)
    limits_read: bool = False  # the plan's caps are read at most once per process
    limits_lock: threading.Lock = field(default_factory=threading.Lock)
    starts: JobStarts = field(default_factory=JobStarts)
    # model: (monotonic time read, its recent job durations), for the submissions' first looks
    durations: dict[str, tuple[float, list[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.repo.policy = self.tuning.policy()
        self.repo.rng = self.rng
        if self.capacity is None:
            self.capacity = CapacityStore(self.repo, api_host="", api_key="")

    @property
    def caps(self) -> CapacityStore:
        assert self.capacity is not None
        return self.capacity

    def now(self) -> datetime:
        return self.repo.now()

    def later(self, seconds: float) -> datetime:
        return self.now() + timedelta(seconds=seconds)

    def duration_samples(self, model: str) -> list[float]:
        """A model's recent job durations, sorted: re-read every `DURATIONS_TTL` seconds
        once known, on every call while unknown (the first jobs of a model teach it)."""
        at, values = self.durations.get(model, (float("-inf"), []))
        if not values or time.monotonic() - at > DURATIONS_TTL:
            values = self.repo.duration_samples(model)
            self.durations[model] = (time.monotonic(), values)
        return values


# -- submit ------------------------------------------------------------------------------


def warm(ctx: Context) -> None:
    """Do the first times of the hot path, for nothing, while a run is being recorded.

    A message through a fresh worker's queue sets up the producer's channel, the
    consumer's first delivery and a pool thread; the read queries of the sweep and of a
    submission compile on their first run (SQLAlchemy caches them per engine). Paid by a
    run's first wave, they cost it about 35 ms before its first POST. The threads of a
    first wave's POSTs are started (each started on demand delays the POSTs after it by
    about a millisecond), and the sweeper's one read of the plan's limits is done, first
    (two requests, two round trips against the real API: the first wave does not wait for
    them). Writes nothing but that read's timestamp.
    """
    read_limits(ctx)
    repo = ctx.repo
    repo.overdue_runs()
    repo.in_flight_jobs()
    repo.slots_by_pool()
    repo.collecting_waiting()
    repo.pending_waits()
    repo.next_due()
    repo.duration_samples("")
    start_threads("post", ctx.tuning.submit_batch)


# Threads that send a task's requests side by side, kept for the process: a freed group of
# slots is refilled without first starting a thread per POST (about 1 ms of spread over a
# batch of eight). Started on demand. POSTs and downloads have threads of their own, so a
# refill never waits behind a big collect: POSTs out at once never exceed the plan's cap
# of parallel jobs; downloads beyond their threads wait for one.
IO_THREADS = {"post": 128, "download": 32, "settle": 8}
_io_threads: dict[str, tuple[int, ThreadPoolExecutor]] = {}
_io_threads_lock = threading.Lock()


def io_threads(kind: str) -> ThreadPoolExecutor:
    """This process's threads for POSTs or downloads (a forked child starts its own)."""
    with _io_threads_lock:
        pid, pool = _io_threads.get(kind, (None, None))
        if pool is None or pid != os.getpid():
            pool = ThreadPoolExecutor(IO_THREADS[kind], thread_name_prefix=f"pipeline-{kind}")
            _io_threads[kind] = (os.getpid(), pool)
        return pool


def start_threads(kind: str, count: int) -> None:
    """Have at least `count` of this process's `kind` threads started (`io_threads`)."""
    pool = io_threads(kind)
    gate = threading.Event()
    held = [pool.submit(gate.wait, 5.0) for _ in range(count)]  # each busy: the next starts one
    gate.set()
    wait(held)


def read_limits(ctx: Context) -> None:
    """Once per process: the plan's caps when the key may read them (`capacity`), at most
    once per LIMITS_TTL per API key. The warm-up does it while a run is recorded; a
    sweeper that comes first does it itself, and the other waits for it."""
    with ctx.limits_lock:
        if ctx.limits_read:
            return
        ctx.limits_read = True
        now = time.time()
        if ctx.caps.limits_due(now):
            limits = ctx.client.plan_limits()
            if limits:
                ctx.caps.known(limits)
            ctx.caps.limits_asked(now)


def submit_nodes(
    ctx: Context, node_ids: Sequence[int], dispatched_at: float | None = None
) -> dict[int, str]:
    """Submit the jobs of nodes handed out together, each exactly once; what happened to
    each (for logs and tests).

    `dispatched_at` (epoch seconds) is when the sweeper handed them out, under the cap of
    that moment: a refusal of a node handed out before the cap was last lowered is no
    news, however long its task waited in the queue.

    The claims, the reads and the intents of the whole batch take one transaction each;
    then the nodes are POSTed side by side, each claim renewed right before unless it was
    taken a moment ago, and the acceptances are recorded together by the task's thread. A
    transient error on one node (the database blinked) leaves it to its claim's expiry,
    not the others.
    """
    sending = _prepare(ctx, node_ids, dispatched_at)
    if len(sending.works) == 1:  # no thread to start: the task's own sends it
        try:
            sending.results[sending.works[0].node_id] = sending.one(ctx, sending.works[0])
        finally:
            sending.batch.flush(ctx)
        return _accepted(ctx, sending)
    return _settle(ctx, sending, _post(ctx, sending))


def send_here(
    ctx: Context,
    node_ids: Sequence[int],
    claim: tuple[Handout, float] | None = None,
    looks: dict[str, float] | None = None,
) -> None:
    """Submit a small batch (a refill, a run's first wave) from this thread, the sweeper's,
    with no task in between: the claims, reads and intents are written now, the POSTs go
    out on this process's threads, and their acceptances are recorded here if they come
    within `REFILL_HOLD` (by a thread of their own if not), before the sweeper records
    what its list saw. The nodes are no
    less exactly-once (the same claims and intents), and a process that dies with them
    leaves them to their claims' expiry. `claim` is (the hand-out, monotonic time of its
    claims) if the dispatch claimed them as it handed them out (and wrote their intents);
    `looks`, their models' first looks if they were read ahead."""
    sending = _prepare(ctx, node_ids, time.time(), claim, looks)
    if not sending.works:
        return
    futures = _post(ctx, sending)
    # The POST threads need the interpreter to build and send their requests: the
    # sweeper's records of the list would hold them back for milliseconds. It waits for
    # their answers first (a few ms), and leaves the slow ones to a thread of their own.
    _, waiting = wait(futures, timeout=REFILL_HOLD)
    if waiting:
        io_threads("settle").submit(_settle_logged, ctx, sending, futures)
    else:
        _settle_logged(ctx, sending, futures)


@dataclass
class _Sending:
    """A batch of claimed nodes on its way: what each POST needs, and what happened."""

    owner: str
    results: dict[int, str]
    works: list[SubmitWork]
    intents: dict[int, int]
    batch: _Batch

    def one(self, ctx: Context, work: SubmitWork) -> str:
        try:
            return _submit(ctx, work, self.owner, self.intents.get(work.node_id), self.batch)
        except TransientError as exc:
            logger.warning("submit of node %s deferred: %s", work.node_id, exc)
            return "deferred"


def _new_owner(ctx: Context) -> str:
    """A claim owner: this worker, and one batch of its submissions."""
    return f"{ctx.worker}:{uuid.uuid4().hex[:8]}"


def _prepare(
    ctx: Context,
    node_ids: Sequence[int],
    dispatched_at: float | None,
    claim: tuple[Handout, float] | None = None,
    looks: dict[str, float] | None = None,
) -> _Sending:
    """Claim the nodes, read what their POSTs need and write their intents, unless `claim`,
    (a hand-out that claimed them, when), says the dispatch did as it handed them out;
    `looks` are first looks already known (read ahead)."""
    results = dict.fromkeys(node_ids, "not-claimed")
    if claim is not None and (owner := claim[0].owner) is not None:
        handout, claimed_at = claim
        works, intents = handout.works, handout.intents
        claimed = list(node_ids)
    else:
        owner, claimed_at = _new_owner(ctx), time.monotonic()
        claimed = ctx.repo.claim(node_ids, owner, NodeState.SUBMITTING)
        works = ctx.repo.submit_works(claimed) if claimed else []
        fresh = [w.node_id for w in works if w.needs_intent]
        intents = ctx.repo.record_intents(fresh, owner) if fresh else {}
    batch = _Batch(claimed_at=claimed_at, dispatched_at=dispatched_at, looks=dict(looks or {}))
    results.update(dict.fromkeys(claimed, "missing"))
    for work in works:
        batch.first_look(ctx, work.model)  # read here, not by each POST's thread
    return _Sending(owner, results, works, intents, batch)


def _post(ctx: Context, sending: _Sending) -> dict[Future[str], int]:
    """The batch's POSTs, out together on this process's threads: a freed group of slots
    is refilled at once, not one round trip after another."""
    pool = io_threads("post")
    return {pool.submit(sending.one, ctx, work): work.node_id for work in sending.works}


def _settle(ctx: Context, sending: _Sending, futures: dict[Future[str], int]) -> dict[int, str]:
    """Await every POST of the batch, whatever happens to the others, recording the
    acceptances as they come (a slow POST does not hold back the quick ones' records)."""
    try:
        waiting = set(futures)
        while waiting:
            _, waiting = wait(waiting, timeout=RECORD_EVERY)
            if waiting:
                sending.batch.flush(ctx)
        for future, node_id in futures.items():
            sending.results[node_id] = future.result()  # re-raises an unexpected error
    finally:
        sending.batch.flush(ctx)  # whatever happens, what Scenario accepted is recorded
    return _accepted(ctx, sending)


def _settle_logged(ctx: Context, sending: _Sending, futures: dict[Future[str], int]) -> None:
    """`_settle` on a thread no one waits on: what went wrong is logged."""
    try:
        outcome = _settle(ctx, sending, futures)
        logger.debug("submissions sent by the sweeper: %s", outcome)
    except Exception:
        logger.exception("submissions sent by the sweeper failed; their nodes await their claims")


def _accepted(ctx: Context, sending: _Sending) -> dict[int, str]:
    _count_acceptances(ctx, sending.batch.accepted)
    if sending.batch.accepted:
        ctx.wake.set()
    return sending.results


@dataclass
class _Batch:
    """What the nodes of one submit task share: model durations, read once; acceptances,
    counted per pool, and recorded together: one transaction for the POSTs answered
    within `RECORD_EVERY` of each other, written by the task's own thread."""

    claimed_at: float  # monotonic, taken before the claims were written
    dispatched_at: float | None = None  # epoch seconds, when the sweeper handed them out
    looks: dict[str, float | None] = field(default_factory=dict)  # model: first look after
    accepted: Counter[str] = field(default_factory=Counter)
    # (job row, job, cost, when it started on our clock, monotonic time its first poll is
    # due), not yet written
    unrecorded: list[tuple[int, Job, float | None, datetime, float]] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)  # the POSTs run side by side

    def first_look(self, ctx: Context, model: str) -> float | None:
        if model not in self.looks:
            samples = ctx.duration_samples(model)
            self.looks[model] = first_look_after(samples, ctx.tuning.coalesce_fraction)
        return self.looks[model]

    def accept(
        self,
        ctx: Context,
        row_id: int,
        model: str,
        job: Job,
        cost: float | None,
        sent: datetime | None,
    ) -> None:
        """A job Scenario accepted, answering our POST sent at `sent` (None: found by a
        reconciliation, or the time is unknown): recorded by the next flush. Its first look
        is timed from when it started, not from the answer, which came some ms later."""
        mono, answered = time.monotonic(), ctx.now()
        started = ctx.starts.started(job.created_at, answered, sent)
        expected = self.first_look(ctx, model)
        age = (answered - started).total_seconds() if expected is not None else 0.0
        first_poll = next_poll_in(age, expected, 0, ctx.rng)
        with self.lock:
            self.unrecorded.append((row_id, job, cost, started, mono + first_poll))

    def count(self, pool: str) -> None:
        with self.lock:
            self.accepted[pool] += 1

    def flush(self, ctx: Context) -> None:
        with self.lock:
            if not self.unrecorded:
                return
            mono = time.monotonic()  # the first poll is due as long after the answer as if
            accepted = [(r, j, c, t, max(0.0, due - mono)) for r, j, c, t, due in self.unrecorded]
            self.unrecorded = []  # it had been recorded at once
            ctx.repo.record_accepted(accepted)
        finished = [(row_id, job) for row_id, job, *_ in accepted if job.status.terminal]
        if finished:  # a reconciled job may have finished meanwhile
            ctx.repo.apply_jobs(finished)


def _submit(ctx: Context, work: SubmitWork, owner: str, intent: int | None, batch: _Batch) -> str:
    """Submit one claimed node's job exactly once; what happened."""
    node_id = work.node_id
    if work.open_intent_id is not None:
        # A previous attempt wrote its intent and may have reached Scenario before dying.
        try:
            found = reconcile(ctx, work)
        except TransientError as exc:
            ctx.repo.transition(
                node_id, nodes.Release(owner, f"reconcile failed: {exc}", exc.retry_after)
            )
            return "released"
        except AuthError as exc:
            ctx.repo.fail_run(work.run_id, _auth_message(exc))
            return "auth-failed"
        if found is not None:
            batch.accept(ctx, work.open_intent_id, work.model, found, found.cost, None)
            budget.settle(ctx.repo, work.run_id, 0.0, found.cost)
            logger.info("node %s: reconciled with existing job %s", node_id, found.id)
            return "reconciled"
        row_id = work.open_intent_id
    elif work.attempts >= work.max_attempts:
        cause = ctx.repo.last_error(node_id) or "its jobs failed"
        reason = f"{cause} (after {work.attempts} of {work.max_attempts} attempts)"
        ctx.repo.transition(node_id, nodes.Fail(reason))
        return "exhausted"
    elif intent is None:
        return "claim-lost"
    else:
        row_id = intent
    reserved = budget.gate(ctx, work, owner, row_id)  # a run's budget: reserve or refuse
    if isinstance(reserved, budget.Refused):
        return reserved.outcome

    sent: list[datetime] = []

    def still_ours() -> None:
        # Our claim may have run out while we reconciled or waited for the governor, and
        # the sweeper may have handed the node to another worker that will POST itself.
        # Renewing it right before sending keeps the POST inside our claim (lease_seconds
        # is checked to exceed the HTTP timeout several times over). A claim taken a
        # moment ago has nearly all its lease left: the batch's first POSTs skip the query.
        fresh = time.monotonic() - batch.claimed_at < ctx.tuning.lease_seconds * FRESH_CLAIM
        if not fresh and not ctx.repo.renew(node_id, owner, NodeState.SUBMITTING):
            raise _ClaimLost(node_id)
        sent.append(ctx.now())  # the request leaves right after this

    handed_at = min(batch.dispatched_at or float("inf"), ctx.now().timestamp())
    try:
        with budget.held(ctx.repo, work.run_id, reserved):  # released unless accepted
            submission = ctx.client.generate(
                work.model, work.body, endpoint=work.endpoint, before_send=still_ours
            )
    except _ClaimLost:
        logger.info("node %s: claim lost before the POST; another worker has it", node_id)
        return "claim-lost"
    except AuthError as exc:
        ctx.repo.record_refused(row_id, nodes.Refused(_auth_message(exc)))
        ctx.repo.fail_run(work.run_id, _auth_message(exc))
        return "auth-failed"
    except ApiTransientError as exc:
        if exc.concurrency:
            # The plan's parallel-jobs cap: nothing was created or billed. The cap is lower
            # than we thought; the node goes back to wait for a slot, no one else waits.
            # What the API allows is about what it had from us: the jobs running and the
            # POSTs out besides this one (an acceptance not yet recorded counts).
            pool = pool_of(work.endpoint)
            refused_at = ctx.now().timestamp()
            others = ctx.repo.sent_in_pool(pool) - 1
            ctx.caps.refused(pool, others, handed_at, refused_at)
            ctx.repo.record_refused(row_id, nodes.Throttled(0.0, str(exc)))
            return "throttled"
        if exc.status_code == 429:
            # Refused by the rate limit: nothing was created or billed, so no reconciliation.
            ctx.repo.record_refused(row_id, nodes.Throttled(exc.retry_after, str(exc)))
            return "throttled"
        # 5xx, reset or timeout: the job may exist. Keep the intent; the next try reconciles.
        ctx.repo.transition(node_id, nodes.Release(owner, str(exc), exc.retry_after))
        return "released"
    except ApiPermanentError as exc:
        ctx.repo.record_refused(row_id, nodes.Refused(str(exc), exc.hint))
        return "rejected"
    batch.accept(
        ctx,
        row_id,
        work.model,
        submission.job,
        submission.creative_units,
        sent[-1] if sent else None,
    )
    found_cost = submission.job.cost
    billed = submission.creative_units
    budget.settle(ctx.repo, work.run_id, reserved, billed if billed is not None else found_cost)
    batch.count(pool_of(work.endpoint))
    return "submitted"


def _count_acceptances(ctx: Context, accepted: Counter[str]) -> None:
    """Teach each pool's learned cap the batch's acceptances, one by one as
    `CapacityStore.accepted` would, with the jobs running and the waiting work read once."""
    for pool, count in accepted.items():
        running, waiting = ctx.repo.pool_demand(pool)
        cap = new = ctx.caps.get(pool)
        for _ in range(count):
            new = new.accepted(running, waiting)
        if new != cap:
            ctx.caps.put(pool, new)


class _ClaimLost(Exception):
    """Our claim on a node expired and another task may own it now."""


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


def _auth_message(exc: Exception) -> str:
    return (
        f"Scenario refused the credentials ({exc}); check SCENARIO_API_KEY and "
        "SCENARIO_API_SECRET, then `pipeline retry`"
    )


# -- polling -----------------------------------------------------------------------------


# How long past a job's expected finish it is first looked at: our clock starts when the
# POST answered, after Scenario's, so this only covers timestamps' milliseconds (a duration
# read from two truncated timestamps is less than 1 ms short).
FIRST_LOOK_MARGIN = 0.002
# While a model's duration is unknown, a job seen finalizing (about to end) is looked at
# again after this fraction of its age (a fifth otherwise), and at least this long after:
# the first jobs of a model are then found ended 1% of their age late on average, not 2.5%
# or more, for a few more list calls, once per model, until its first jobs end.
FINALIZING_STEP = 0.02
FINALIZING_MIN = 0.03


def tight(samples: Sequence[float], fraction: float) -> bool:
    """Whether a model's recent durations (sorted) lie within a group window of each other
    (`fraction` of their median): its jobs are then looked at when each should end."""
    return bool(samples) and samples[-1] - samples[0] <= samples[len(samples) // 2] * fraction


def first_look_after(samples: Sequence[float], fraction: float) -> float | None:
    """The duration after which a job of a model is first looked at: for a tight model the
    slowest of its recent jobs (one look then sees the job ended, where a look at the
    median would miss the slower half); for one whose jobs vary, the median (the list
    schedule of `next_list_in` takes over). None while no duration is known."""
    if not samples:
        return None
    return samples[-1] if tight(samples, fraction) else samples[len(samples) // 2]


def next_poll_in(
    elapsed: float,
    expected: float | None,
    polls: int,
    rng: random.Random | None = None,
    *,
    finalizing: bool = False,
) -> float:
    """Seconds until a job is worth looking at again (pure; the list poll is due then).

    With a learned duration the first look lands just after the expected finish (our clock
    starts when the POST answered, a little after Scenario's); an overdue job is looked at
    again after half its delay so far (a geometric backoff, capped). Without
    one, looks come at a fifth of the elapsed time: a detection delay of at most 20% on the
    first jobs of a model, and few requests for a slow one. A job seen `finalizing` (its
    generation done, its outputs being saved) is about to end: it is looked at again after
    a twentieth of its age, so the first jobs of a model are not found a fifth late.
    """
    if expected is None:
        if polls == 0 and elapsed == 0:
            return poll_delay(elapsed=0.0, expected=None, polls=0, rng=rng) / 4
        if finalizing:
            return min(max(FINALIZING_STEP * elapsed, FINALIZING_MIN), POLL_CAP)
        return min(max(0.2 * elapsed, 0.25), POLL_CAP)
    if elapsed < expected:
        return max(0.05, expected - elapsed + FIRST_LOOK_MARGIN)
    step = max(0.05 * expected, 0.5 * (elapsed - expected))
    jitter = 1.0 + (rng.uniform(-0.1, 0.1) if rng else 0.0)
    return min(step * jitter, POLL_CAP)


def next_list_in(jobs: Sequence[tuple[float, Sequence[float]]], window: float) -> float | None:
    """Seconds until the jobs in flight are expected to hold one finish the last list has
    not seen (pure); None if no job has a learned duration still ahead of it.

    `jobs` are (age, sorted recent durations of its model) for jobs seen running just now.
    Each job's finish is spread over the durations above its age, evenly: a model whose
    jobs all take 3 s puts all of it at 3 s, one that varies ±30% spreads it over 1.8 s.
    The list is asked when one finish is expected (half of one for a lone job, so a last
    job is looked at near its median, then the median of what is left), and the jobs
    expected within `window` after that are waited for: a tight group costs one call.
    """
    events: list[tuple[float, float]] = []
    holders = 0
    for age, durations in jobs:
        ahead = [d - age for d in durations if d > age]
        if ahead:
            holders += 1
            events += [(offset, 1.0 / len(ahead)) for offset in ahead]
    if not events:
        return None
    events.sort()
    target = min(1.0, 0.5 * holders) - 1e-9
    total = 0.0
    for offset, weight in events:
        total += weight
        if total >= target:
            return max(o for o, _ in events if o <= offset + window)
    return events[-1][0]  # unreachable: every holder's weights sum to one


@dataclass
class PollReport:
    """What one poll pass saw (for logs, tests and the benchmark)."""

    list_calls: int = 0
    direct_calls: int = 0
    finished: list[int] = field(default_factory=list)  # node ids now collecting or done
    failed: int = 0
    group_until: float | None = None  # monotonic: the poll waits for a group's last job
    group_end: datetime | None = None  # the same, on the database's clock
    group: Counter[str] = field(default_factory=Counter)  # the group's jobs per pool


def poll_jobs(
    ctx: Context, state: SweeperState, freed: Callable[[Counter[str]], bool] | None = None
) -> PollReport:
    """Advance in-flight jobs: one GET /jobs?updatedAfter= for all, per-job GETs if needed.

    `freed`, if given, is called with the slots per pool that the jobs seen ending freed,
    right after the API said so and before any of it is recorded: the sweeper refills them
    first (and says whether it handed anything out), and the records are written while the
    new POSTs go out.
    """
    report = PollReport()
    started = time.monotonic()
    jobs = ctx.repo.in_flight_jobs()
    if not jobs:
        return report
    now = ctx.now()
    # Jobs submitted together finish a little apart: the jobs due within a few percent of
    # their duration after the first one are one group, and one list call, when the last
    # of them is due, sees the whole group finished. A tight group costs no wait at all.
    # Known before its first job is due, the group's end is the sweeper's next wake-up: a
    # pass at its first job's due time would only find it must wait, and delay the list.
    # The pass comes `state.lead` early: what it does before its list (these reads, the
    # refill's hand-out) is done by the group's end, and the list goes out then.
    group_end = coalesced_until(ctx, state, jobs, now)
    mono = time.monotonic()
    if now < group_end - timedelta(seconds=state.lead):
        until = mono + (group_end - now).total_seconds()
        state.window_until = report.group_until = until - state.lead
        report.group_end = group_end
        report.group = Counter(
            pool_of(j.endpoint) for j in jobs if j.due_at is not None and j.due_at <= group_end
        )
        return report
    state.list_gap = list_interval(ctx, state, jobs)
    if mono - state.last_list_at < state.list_gap and not state.follow_up:
        return report
    state.last_list_at = mono
    state.follow_up = False
    by_id = {j.scenario_job_id: j for j in jobs}
    seen: dict[str, Job] = {}
    list_ok = True
    # Each endpoint makes jobs of its own type (custom, inference, upscale, ...); the list
    # filters by the types in flight, which also lets it sort by update date.
    types = sorted({j.job_type for j in jobs})
    cursor_key = f"jobs-updated-after:{state.api_host}:{','.join(types)}"
    oldest = min(j.accepted_at for j in jobs) - timedelta(seconds=ctx.tuning.reconcile_window)
    stored = ctx.repo.get_cursor(cursor_key)
    watermark = max(oldest, datetime.fromisoformat(stored)) if stored else oldest
    newest_update: datetime | None = None
    if freed is not None and prepare_refill(ctx, state, jobs, group_end):
        state.learn_lead(time.monotonic() - started)
    if (early := (group_end - ctx.now()).total_seconds()) > 0:
        # The list is asked when the group's last job is due, not before: a wait on the
        # clock, not a backoff (`ctx.sleep`, which tests skip).
        time.sleep(early)
    now = ctx.now()
    due = [j for j in jobs if j.due_at is None or j.due_at <= now]
    try:
        report.list_calls = 1
        for count, job in enumerate(
            ctx.client.iter_jobs(job_types=types, updated_after=watermark), start=1
        ):
            if count > ctx.tuning.list_max_pages * 100:
                list_ok = False  # a busy account: the list is too long to be cheap
                break
            if newest_update is None or job.updated_at > newest_update:
                newest_update = job.updated_at
            if job.id in by_id:
                seen[job.id] = job
                if len(seen) == len(by_id):
                    break  # newest first: later pages hold nothing about our jobs
    except AuthError:
        raise
    except (TransientError, PermanentError) as exc:
        logger.warning("jobs list poll failed (%s); polling due jobs one by one", exc)
        list_ok = False
    listed_at = time.monotonic()
    # Per-job GETs where the list cannot be trusted: it failed, or a job it never showed
    # is long overdue (a job type the list does not report as expected, an eventually
    # consistent index). Their own backoff schedule keeps these rare.
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
    finishing = [j for j in jobs if (p := seen.get(j.scenario_job_id)) and p.status.terminal]
    # The first jobs of a model to finish teach its duration to the others in this very
    # pass: they are then looked at when they should end, not a fifth of their age later.
    learnt: dict[str, list[float]] = {}
    for j in finishing:
        done = seen[j.scenario_job_id]
        if done.status == JobStatus.SUCCESS:
            took = (done.updated_at - done.created_at).total_seconds()
            learnt.setdefault(j.model, []).append(took)
    taught = False
    for model, durations in learnt.items():
        # The rest of a first group, now due when it should end, is looked at then, not a
        # list gap later: a group split once would stay split, at a list call per part.
        taught = state.learn(ctx, model, durations) or taught
    state.follow_up = taught or state.follow_up
    # The slots of the jobs seen ending are refilled before their records are written,
    # unless they taught a model's first duration: the new jobs' first looks read it from
    # the database, so it is written first.
    refilled = False
    if freed is not None and finishing and not taught:
        refilled = freed(Counter(pool_of(j.endpoint) for j in finishing))
    if list_ok and newest_update is not None:
        mark = newest_update - timedelta(seconds=ctx.tuning.list_overlap)
        if mark > watermark:
            ctx.repo.set_cursor(cursor_key, mark.isoformat())
    # The gap to the next list, from what this one taught: durations, or a first job of a
    # model seen finalizing (its next look comes at FINALIZING_MIN).
    state.list_gap = list_interval(ctx, state, jobs, seen)
    # Nothing else is about to finish or to start: collect what finished now rather than
    # in a batch. (A whole wave finishing together while more work waits is no such case.)
    collect_now = len(finishing) == len(jobs) and not refilled and not ctx.repo.pending_waits()
    changed: list[tuple[int, Job]] = []
    schedule: dict[tuple[int, int], datetime] = {}
    # A model whose jobs take the same time has each job looked at when it should end (a
    # group finishing together shares the call). For models whose jobs vary, the one list
    # call that sees every job is asked when one new finish is expected among them: a look
    # at each job's median and every list gap after it would cost a call per job, or more.
    models = {j.model for j in jobs}
    varying = {m for m in models if _varies(ctx, state, m)}
    fraction = ctx.tuning.coalesce_fraction
    looks = {m: first_look_after(state.samples(ctx, m), fraction) for m in models}
    ahead = next_list_in(
        [
            ((now - j.accepted_at).total_seconds(), state.samples(ctx, j.model))
            for j in jobs
            if j.model in varying
            and (p := seen.get(j.scenario_job_id)) is not None
            and not p.status.terminal
        ],
        window=min(
            (d * fraction for m in varying if (d := state.expected(ctx, m))),
            default=0.0,
        ),
    )
    for j in jobs:
        polled = seen.get(j.scenario_job_id)
        if polled is not None and polled.status.terminal:
            changed.append((j.row_id, polled))
            continue
        if polled is None and not list_ok and j.scenario_job_id not in attempted:
            continue  # still due: polled on the next tick
        if polled is not None and polled.status != j.status:
            changed.append((j.row_id, polled))  # a new status (queued -> in-progress ...)
        expected = looks[j.model]
        elapsed = (now - j.accepted_at).total_seconds()
        status = polled.status if polled is not None else j.status
        delay = next_poll_in(elapsed, expected, j.polls, finalizing=status == JobStatus.FINALIZING)
        if expected is None and polled is not None and polled.status == JobStatus.IN_PROGRESS:
            # A first job of a model: its progress may say it ends before a look at a fifth
            # of its age would see it (never later: a progress that jumps to 1 at the end
            # is no later seen than without it). Never more often than a finalizing job is
            # looked at: a progress crawling near 1 costs no more list calls.
            eta = state.progress_eta(j.scenario_job_id, polled.progress, listed_at)
            if eta is not None:
                soonest = max(FINALIZING_STEP * elapsed, FINALIZING_MIN)
                delay = min(delay, max(eta + FIRST_LOOK_MARGIN, soonest))
        ahead_of_it = j.model in varying and state.samples(ctx, j.model)[-1] > elapsed
        if ahead is not None and expected and ahead_of_it:  # not past every known duration
            delay = ahead + FIRST_LOOK_MARGIN
        schedule[(j.row_id, j.node_id)] = now + timedelta(seconds=delay)
    for job_id in state.progress_seen.keys() - by_id.keys():
        del state.progress_seen[job_id]  # ended, or gone
    moved = ctx.repo.apply_jobs(changed, collect_now=collect_now) if changed else {}
    for j in finishing:
        new_state = moved.get(j.row_id)
        if new_state in (NodeState.COLLECTING, NodeState.SUCCEEDED):
            report.finished.append(j.node_id)
        elif new_state is not None:
            report.failed += 1
    ctx.repo.schedule_polls(schedule)
    return report


def coalesced_until(
    ctx: Context, state: SweeperState, jobs: Sequence[InFlightJob], now: datetime
) -> datetime:
    """When the group of the earliest due job is all due: the latest due time among the
    jobs due within `coalesce_fraction` of its model's duration after it, or within the
    least gap between two list calls if that is longer (jobs due within it could not be
    looked at sooner by a list of their own: waiting for them costs less than the gap, and
    a group once split, by a first look between its finishes, becomes one again)."""
    earliest = min(j.due_at or now for j in jobs)
    model = min(jobs, key=lambda j: j.due_at or now).model
    expected = state.expected(ctx, model)
    seconds = 0.0
    if expected:
        seconds = max(expected * ctx.tuning.coalesce_fraction, list_interval(ctx, state, jobs))
    window = timedelta(seconds=seconds)
    return max(j.due_at or now for j in jobs if (j.due_at or now) <= earliest + window)


def _varies(ctx: Context, state: SweeperState, model: str) -> bool:
    """Whether a model's recent jobs took times further apart than a group window."""
    samples = state.samples(ctx, model)
    return bool(samples) and not tight(samples, ctx.tuning.coalesce_fraction)


def list_interval(
    ctx: Context,
    state: SweeperState,
    jobs: Sequence[InFlightJob],
    seen: Mapping[str, Job] | None = None,
) -> float:
    """The least time between two list polls: a twentieth of the shortest job in flight.

    A 3 s tool job is then noticed within 0.15 s of finishing and a 40 s generation costs
    no more than one list call a second, whatever the number of jobs in flight. While no
    duration is known the jobs' own schedule (looks at a fifth of their age) paces the
    list, so the first jobs of a model are noticed as soon as that schedule allows; one
    seen finalizing, about to end, has its own looks let through at FINALIZING_MIN.
    `seen` holds what a list just said of the jobs (their status, newer than `jobs`').
    """
    if ctx.tuning.list_interval is not None:
        return ctx.tuning.list_interval
    expected = {m: state.expected(ctx, m) for m in {j.model for j in jobs}}
    durations = [d for d in expected.values() if d]
    if durations:
        gap = min(max(0.05 * min(durations), LIST_INTERVAL_MIN), LIST_INTERVAL_MAX)
    else:
        gap = LIST_INTERVAL_MIN
    seen = seen or {}
    for j in jobs:  # a first job of a model about to end: its finalizing looks
        status = seen[j.scenario_job_id].status if j.scenario_job_id in seen else j.status
        if status == JobStatus.FINALIZING and not expected[j.model]:
            return min(gap, FINALIZING_MIN)
    return gap


def _straggling(ctx: Context, state: SweeperState, job: InFlightJob, now: datetime) -> bool:
    """A job running three times longer than its model's jobs usually take."""
    expected = state.expected(ctx, job.model) or ctx.tuning.straggler_default
    return (now - job.accepted_at).total_seconds() > 3 * expected


# -- the sweeper -------------------------------------------------------------------------


@dataclass
class SweeperState:
    """What one sweeper remembers between ticks (all of it can be lost safely)."""

    api_host: str
    last_list_at: float = float("-inf")
    list_gap: float = 0.0  # the least time between two list polls, as last computed
    follow_up: bool = False  # the last list taught a duration: the next one skips the gap
    window_until: float = float("-inf")  # monotonic end of the wait that batches a poll
    lease_renew_at: float = float("-inf")  # monotonic time to renew the sweeper lease
    lease_retry_at: float = float("-inf")  # another sweeper holds it: not asked before this
    runs_at: float = float("-inf")  # monotonic time of the next run-status refresh
    collect_held: bool = False  # the last pass handed out submissions and held its collects
    ahead: Ahead | None = None  # the refill of the group the poll waits for, read ahead
    prepared: Prepared | None = None  # that refill handed out, for the list about to go out
    lead: float = LEAD_DEFAULT  # how early a pass that lists for a group starts (`learn_lead`)
    lead_seen: float | None = None  # the recent time from such a pass's start to its list
    samples_cache: dict[str, tuple[float, list[float]]] = field(default_factory=dict)
    # Job id: (monotonic time, progress) when a list last saw it running, while its model's
    # duration is unknown (`progress_eta`).
    progress_seen: dict[str, tuple[float, float]] = field(default_factory=dict)

    def progress_eta(self, job_id: str, progress: float, at: float) -> float | None:
        """Seconds until a running job's progress reaches 1 at the rate it rose since the
        last list saw it, or None (first seen, not rising, or done). Both looks are timed
        by our clock, so a skew between it and Scenario's does not matter."""
        before = self.progress_seen.get(job_id)
        self.progress_seen[job_id] = (at, progress)
        if before is None or not before[1] < progress < 1.0 or at <= before[0]:
            return None
        rate = (progress - before[1]) / (at - before[0])
        return (1.0 - progress) / rate

    def samples(self, ctx: Context, model: str) -> list[float]:
        """A model's recent job durations, sorted, re-read every few seconds (soon while
        unknown: the first jobs of a model teach it, and every poll after them depends on
        it)."""
        at, values = self.samples_cache.get(model, (float("-inf"), []))
        if time.monotonic() - at > (DURATIONS_TTL if values else 0.25):
            values = ctx.repo.duration_samples(model)
            self.samples_cache[model] = (time.monotonic(), values)
        return values

    def learn_lead(self, took: float) -> None:
        """A pass took `took` seconds from its start to its list, reads and hand-out done:
        passes for a group start twice the recent such time early (within LEAD_BOUNDS)."""
        self.lead_seen = took if self.lead_seen is None else 0.7 * self.lead_seen + 0.3 * took
        self.lead = min(max(2 * self.lead_seen, LEAD_BOUNDS[0]), LEAD_BOUNDS[1])

    def learn(self, ctx: Context, model: str, durations: list[float]) -> bool:
        """Jobs of `model` just seen succeeding after these durations: while the model's
        duration is unknown they count at once (the database has them after this pass).
        True if they taught it."""
        if self.samples(ctx, model):
            return False
        self.samples_cache[model] = (time.monotonic(), sorted(durations))
        return True

    def expected(self, ctx: Context, model: str) -> float | None:
        """A model's learned job duration: the median of its recent ones."""
        values = self.samples(ctx, model)
        return values[len(values) // 2] if values else None


@dataclass
class TickReport:
    """What one sweep did."""

    ran: bool = False
    submitted: int = 0
    collected: int = 0
    poll: PollReport = field(default_factory=PollReport)
    finished_runs: list[str] = field(default_factory=list)
    full: bool = False  # a pool's slots were all taken: its due pending nodes wait for one


def sweep(ctx: Context, state: SweeperState) -> TickReport:
    """One pass of the single active sweeper: deadlines, polls, re-dispatch, dispatch."""
    report = TickReport()
    holder = ctx.worker
    # A short lease: when its holder dies another sweeper takes over within seconds. Two
    # overlapping sweeps are safe (every move is a conditional UPDATE), merely wasteful.
    ttl = max(3.0, ctx.tuning.tick * 10)
    mono = time.monotonic()
    if mono > state.lease_renew_at:  # renewed at half its life, not on every sweep
        if mono < state.lease_retry_at:
            return report
        if not ctx.repo.acquire_lease(SWEEPER_LEASE, holder, ttl=ttl):
            # A standby: it takes over within a quarter of the lease after the holder's
            # expires, and the tasks of its process (each one rings its bell) cost no query.
            state.lease_renew_at = float("-inf")
            state.lease_retry_at = mono + ttl / 4
            state.ahead = None  # another sweeper hands out meanwhile: what it read goes stale
            return report
        state.lease_renew_at = mono + ttl / 2
    report.ran = True
    refill: list[tuple[list[int], dict[str, int]]] = []

    def freed(slots: Counter[str]) -> bool:
        refill.append(_dispatch(ctx, report, slots, state))
        return bool(refill[0][0])

    try:
        report.poll = poll_jobs(ctx, state, freed)
    except AuthError as exc:
        _fail_running_runs(ctx, _auth_message(exc))
    finally:
        if state.prepared is not None:  # its list refilled nothing (it failed, or taught)
            _give_back(ctx, state.prepared, state.prepared.handout.nodes)
            state.prepared = None
    if report.poll.group_end is not None and not refill:
        read_ahead(ctx, state, report.poll.group_end, report.poll.group)
    # Deadlines after the list: their query does not delay a wave's refill, which a run
    # overdue since the last pass (half a second at most) may have had.
    for run_id in ctx.repo.overdue_runs():
        cancel_run(ctx, run_id, "the run's deadline passed")
    ended = bool(report.poll.finished or report.poll.failed)  # seen by this pass's list
    handed, in_use = refill[0] if refill else _dispatch(ctx, report, Counter(), state)
    # Collections after submissions: a freed slot is refilled first, its outputs stored
    # while the next job runs. A pass that handed out submissions holds its collects for
    # one pass (the submit task's POSTs are then not slowed by a collect's downloads and
    # records; its acceptances wake the next pass); never two passes in a row.
    if handed and not state.collect_held:
        state.collect_held = True
    else:
        state.collect_held = False
        report.collected = _collect(ctx, state, sum(in_use.values()) + len(handed))
    if ended or report.collected or mono > state.runs_at:
        # Runs end when their last node does; nodes finish in polls, collects and tasks.
        state.runs_at = mono + RUNS_REFRESH
        report.finished_runs = ctx.repo.refresh_runs()
    return report


AHEAD_FOR = 5.0  # seconds after its group's end that a refill read ahead is still used


@dataclass
class Ahead:
    """A refill read while its slots are still taken (`read_ahead`): for the group of jobs
    due by `group_end`, the pending nodes and their POSTs (none: nothing waits for their
    slots), the slots in use and the caps, and the rooms once the group has ended."""

    group_end: datetime
    nodes: ReadAhead
    in_use: dict[str, int]
    limits: dict[str, int]
    looks: dict[str, float]  # model: the first look of its new jobs, where one is known
    rooms: dict[str, int]  # per pool: the slots free once the group has ended


def read_ahead(ctx: Context, state: SweeperState, group_end: datetime, group: Counter[str]) -> None:
    """While the sweeper waits for a group of jobs to end, read what refilling their slots
    needs (the slots in use, the caps, the pending nodes, their POSTs, their models'
    durations), so that between the list that sees them end and the new POSTs there is
    one transaction of writes. Only for a refill the sweeper sends itself (at most a
    batch); read once per group."""
    tuning = ctx.tuning
    if not tuning.in_sweeper or (state.ahead is not None and state.ahead.group_end == group_end):
        return
    state.ahead = None
    in_use, limits = _capacity(ctx)
    after = _less(in_use, group)  # in use once the group has ended
    rooms = {pool: limits[pool] - after[pool] for pool in POOLS}
    nodes_ahead = ctx.repo.read_ahead(rooms)
    if nodes_ahead.count > tuning.submit_batch:
        return  # enough for tasks
    # Nothing to refill is worth knowing too: the list that sees a run's last jobs end
    # goes straight to storing their outputs. A run recorded since rings the sweeper,
    # whose pass before the group's end drops this.
    looks = {}
    for model in {work.model for work in nodes_ahead.works.values()}:
        look = first_look_after(ctx.duration_samples(model), tuning.coalesce_fraction)
        if look is not None:  # unknown: read again when the POSTs go out
            looks[model] = look
    state.ahead = Ahead(group_end, nodes_ahead, in_use, limits, looks, rooms)


@dataclass
class Prepared:
    """A refill read ahead and handed out (claimed, its intents written) right before the
    list that should see its group end: after the list's answer, only its POSTs are left."""

    ahead: Ahead
    handout: Handout
    claimed_at: float  # monotonic, before its claims were written

    def split(self, rooms: Mapping[str, int]) -> tuple[Handout, list[int]]:
        """The part of the hand-out that the slots now free take, and the nodes left over
        (the list saw fewer of the group's jobs end than it was handed out for)."""
        handed = {
            pool: ids[: max(0, rooms.get(pool, 0))] for pool, ids in self.handout.handed.items()
        }
        sent = {n for ids in handed.values() for n in ids}
        part = Handout(
            handed,
            self.handout.owner,
            [w for w in self.handout.works if w.node_id in sent],
            {n: row for n, row in self.handout.intents.items() if n in sent},
        )
        return part, [n for n in self.handout.nodes if n not in sent]


def prepare_refill(
    ctx: Context, state: SweeperState, jobs: Sequence[InFlightJob], group_end: datetime
) -> bool:
    """Right before the list that should see a group of jobs end, hand out their refill
    read ahead (`read_ahead`): its transaction of writes then overlaps the list's round
    trip, where it used to follow the answer. Only for groups of models whose jobs take the
    same time, which end when due: if some did not, the nodes their slots would have taken
    are given back (`_give_back`), never POSTed."""
    ahead = state.ahead
    if ahead is None or ahead.group_end != group_end or not ahead.nodes.count:
        return False
    if ctx.now() - group_end > timedelta(seconds=AHEAD_FOR):
        return False  # a list long after the group's end: _dispatch drops what was read
    if any(not state.samples(ctx, m) or _varies(ctx, state, m) for m in {j.model for j in jobs}):
        return False
    claimed_at = time.monotonic()
    handout = ctx.repo.hand_out(ahead.nodes, ahead.rooms, _new_owner(ctx))
    state.ahead = None  # stale once handed out
    if handout.nodes:
        state.prepared = Prepared(ahead, handout, claimed_at)
    return True


def _give_back(ctx: Context, prepared: Prepared, node_ids: Sequence[int]) -> None:
    """Return nodes handed out for slots that did not free to the pending ones; if the
    database fails, their claims expire and their intents make the next try look for a
    job first (there is none: they were never sent)."""
    if not node_ids:
        return
    try:
        ctx.repo.give_back(prepared.handout, node_ids)
    except TransientError as exc:
        logger.warning("could not give back the unsent nodes %s: %s", list(node_ids), exc)


def _capacity(ctx: Context) -> tuple[dict[str, int], dict[str, int]]:
    """The slots in use per pool (the database's count) and each pool's cap."""
    in_use = ctx.repo.slots_by_pool()
    read_limits(ctx)
    caps = ctx.caps.get_all()
    return in_use, {pool: caps[pool].limit(ctx.tuning.parallel_jobs) for pool in POOLS}


def _less(in_use: Mapping[str, int], freed: Mapping[str, int]) -> dict[str, int]:
    return {pool: max(0, in_use.get(pool, 0) - freed.get(pool, 0)) for pool in POOLS}


def _dispatch(
    ctx: Context, report: TickReport, freed: Counter[str], state: SweeperState | None = None
) -> tuple[list[int], dict[str, int]]:
    """Hand out the submissions that have a slot: the nodes to submit again, and pending
    ones up to each pool's cap; what was handed out and the slots in use before it.

    `freed` are slots of jobs a list just saw end that are not recorded yet (they still
    count as in use in the database). A few new submissions are sent by this thread, the
    sweeper's (`Tuning.in_sweeper`); when the sweeper read them ahead (`read_ahead`), all
    that is left to do is to write their hand-out."""
    tuning = ctx.tuning
    prepared = state.prepared if state is not None and freed else None
    ahead = state.ahead if state is not None and freed else None
    if prepared is not None:
        assert state is not None
        state.prepared = None
        ahead = prepared.ahead
    elif ahead is not None:
        assert state is not None
        state.ahead = None  # used once: what it read is stale after this hand-out
        if ctx.now() - ahead.group_end > timedelta(seconds=AHEAD_FOR):
            ahead = None  # a list long after the group's end (the API or database was down)
    # Read ahead: in use then, less the slots freed since: no more (only this thread takes
    # slots, and a hand-out drops what was read ahead), maybe fewer (a job failed since).
    in_use, limits = (ahead.in_use, ahead.limits) if ahead is not None else _capacity(ctx)
    in_use = _less(in_use, freed)
    rooms = {pool: limits[pool] - in_use[pool] for pool in POOLS}
    # A few new submissions (slots a list saw freed, a run's first wave) go out from here,
    # with no queue between the decision and their POSTs: a hand-out of at most a batch is
    # claimed, read and given its intents in its own transaction. A big batch is worth
    # spreading over the workers: tasks.
    owner = _new_owner(ctx) if tuning.in_sweeper else None
    claimed_at = time.monotonic()  # before the claims are written
    left: list[int] = []
    if prepared is not None:
        handout, left = prepared.split(rooms)
        claimed_at = prepared.claimed_at
    elif ahead is not None and owner is not None:
        handout = ctx.repo.hand_out(ahead.nodes, rooms, owner)
    else:
        handout = ctx.repo.dispatch_pending(rooms, owner, claim_up_to=tuning.submit_batch)
        if state is not None and handout.nodes:
            state.ahead = None  # it counted slots these now take
    fresh = handout.nodes
    for pool, handed in handout.handed.items():
        report.full = report.full or len(handed) >= rooms[pool]
    queued = fresh
    if tuning.in_sweeper and 0 < len(fresh) <= tuning.submit_batch:
        queued = []
        claim = (handout, claimed_at) if handout.owner else None
        send_here(ctx, fresh, claim, ahead.looks if ahead is not None else None)
    if prepared is not None:
        _give_back(ctx, prepared, left)
    # Nodes handed out again, after the new ones' POSTs (they hold their slots already):
    # they may need a reconciliation (a list call of its own): tasks.
    resubmit = ctx.repo.due_for_tasks(NodeState.SUBMITTING)
    queued = resubmit + queued
    for start in range(0, len(queued), tuning.submit_batch):
        ctx.dispatch.submit(queued[start : start + tuning.submit_batch])
    report.submitted = len(resubmit) + len(fresh)
    return resubmit + fresh, in_use


def _collect(ctx: Context, state: SweeperState, in_flight: int) -> int:
    """Hand out the collects due: full batches at once, the rest when its wait for company
    ends; how many nodes were handed out."""
    tuning = ctx.tuning
    gathering, timer = ctx.repo.collecting_waiting()
    full = gathering - gathering % tuning.collect_batch
    wait_more = False
    if full:
        # Full batches go now, the first finished first; the rest waits for company.
        ctx.repo.collect_now(full)
    elif gathering and (in_flight == 0 or gathering > in_flight) and not ctx.repo.pending_waits():
        # Nothing else to finish and share a get-bulk with, or only the last jobs in flight
        # and more waiting than they will add (storing it now overlaps their run time).
        ctx.repo.collect_now()
    elif in_flight and timer is not None and timer <= ctx.now():
        # A wait for company ran out: if a group in flight is about to finish, wait for it.
        wait_more = _company_due(ctx, state)
    to_collect = [] if wait_more else ctx.repo.due_for_tasks(NodeState.COLLECTING)
    if to_collect and not full:
        # The oldest finished node has waited long enough: take everyone waiting with it.
        ctx.repo.collect_now()
        to_collect += ctx.repo.due_for_tasks(NodeState.COLLECTING)
    if tuning.in_sweeper and in_flight == 0 and 0 < len(to_collect) <= tuning.collect_batch:
        # Nothing in flight to look after: the last wave is stored from here, and the pass's
        # run refresh that follows ends its run with no wake-up and no pass in between.
        collect_here(ctx, to_collect)
        return len(to_collect)
    for start in range(0, len(to_collect), tuning.collect_batch):
        ctx.dispatch.collect(to_collect[start : start + tuning.collect_batch])
    return len(to_collect)


def collect_here(ctx: Context, node_ids: Sequence[int]) -> None:
    """`collect_nodes` on this thread, the sweeper's, which it must not kill: what goes
    wrong is noted on the nodes, which are collected again when their claims expire (as
    after a collect task that failed)."""
    try:
        collect_nodes(ctx, node_ids)
    except Exception as exc:
        log = logger.warning if isinstance(exc, TransientError) else logger.exception
        log("collect of nodes %s in the sweeper failed: %s", list(node_ids), exc)
        note_errors(ctx, node_ids, exc)


def note_errors(ctx: Context, node_ids: Sequence[int], exc: BaseException) -> None:
    """Keep a failed task's cause on its nodes: if it keeps happening, they fail with it."""
    for node_id in node_ids:
        try:
            ctx.repo.note_error(node_id, f"{type(exc).__name__}: {exc}")
        except Exception:  # the database itself is failing; the claims expire all the same
            logger.warning("could not record the error of node %s", node_id)


def _company_due(ctx: Context, state: SweeperState) -> bool:
    """Whether finished nodes whose wait for company ran out should wait a little more: a
    poll of jobs in flight is due within a list gap (they are about to finish: one
    get-bulk for both groups; when the collect delay equals the jobs' length every wave
    was otherwise collected alone). Bounded: a node waits at most one list gap more."""
    due = ctx.repo.next_due()
    waited, polled = due.get(NodeState.COLLECTING), due.get(NodeState.RUNNING)
    if waited is None or polled is None:
        return False
    now = ctx.now()
    gap = timedelta(seconds=state.list_gap)
    return waited <= now < waited + gap and polled <= now + gap


def cancel_run(ctx: Context, run_id: str, reason: str) -> list[str]:
    """Cancel a run's unfinished nodes and their remote jobs (best effort on the API)."""
    remote = ctx.repo.cancel_run_nodes(run_id, reason)
    for job_id in remote:
        try:
            ctx.client.cancel_job(job_id)
        except (TransientError, PermanentError) as exc:
            logger.warning("could not cancel job %s: %s", job_id, exc)
    ctx.repo.refresh_runs()
    return remote


def _fail_running_runs(ctx: Context, message: str) -> None:
    for run_id in ctx.repo.running_run_ids():
        ctx.repo.fail_run(run_id, message)


class Sweeper:
    """Runs `sweep` in a loop on a thread until stopped; many may run, one is active.

    It never dies silently: an unexpected error fails the running runs with that error
    (so `--wait` ends with it) and the loop goes on for runs started later.
    """

    def __init__(self, ctx: Context, api_url: str) -> None:
        self.ctx = ctx
        self.state = SweeperState(api_host=urlsplit(api_url).netloc)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Tasks in this process ring it when they change what the sweeper acts on (a job
        # accepted, outputs stored): the next sweep starts at once, not at the next tick.
        self.wake = ctx.wake

    def tick(self) -> TickReport:
        try:
            return sweep(self.ctx, self.state)
        except TransientError as exc:
            logger.warning("sweep failed, will retry: %s", exc)
            return TickReport()
        except Exception as exc:
            logger.exception("the sweeper hit an unexpected error; stopping the running runs")
            message = f"the sweeper stopped the run on an unexpected error: {exc!r}"
            try:
                _fail_running_runs(self.ctx, nodes.cut(message) or message)
            except Exception:  # the database itself is failing: the next tick retries
                logger.exception("could not record the sweeper's error")
            return TickReport()

    def run(self) -> None:
        while not self._stop.is_set():
            report = self.tick()
            if self.wake.wait(self._sleep_after(report)):
                # A task finished something: a node, maybe an item, maybe the run.
                self.state.runs_at = float("-inf")
            self.wake.clear()
        try:  # let another sweeper take over at once rather than after the lease
            self.ctx.repo.release_lease(SWEEPER_LEASE, self.ctx.worker)
        except TransientError as exc:
            logger.warning("could not release the sweeper lease: %s", exc)

    def _sleep_after(self, report: TickReport) -> float:
        """Until the next timer is due, within [SWEEP_MIN_SLEEP, tick]."""
        tick = self.ctx.tuning.tick
        if not report.ran:  # a standby, or the database is failing: no timer to wait for
            return tick
        if report.submitted or report.collected or report.poll.finished:
            return SWEEP_MIN_SLEEP
        try:
            due = self.ctx.repo.next_due()
        except TransientError:
            return tick
        now = self.ctx.now()
        waits = [tick]
        if NodeState.RUNNING in due:  # the next poll, not before the list may be asked again
            mono = time.monotonic()
            gap = 0.0 if self.state.follow_up else self.state.list_gap
            gate = max(self.state.last_list_at + gap, self.state.window_until) - mono
            waits.append(max((due[NodeState.RUNNING] - now).total_seconds(), gate))
        if NodeState.COLLECTING in due:
            waits.append((due[NodeState.COLLECTING] - now).total_seconds())
        if NodeState.PENDING in due:
            # Pending nodes already due were all handed out unless their pool is full, and
            # then a finished job wakes us: only a later timer (a retry's backoff) counts.
            pending_in = (due[NodeState.PENDING] - now).total_seconds()
            if pending_in > 0 or not report.full:
                waits.append(pending_in)
        soonest = min(max(min(waits), SWEEP_MIN_SLEEP), tick)
        if report.poll.group_until is not None:
            # The poll waits for the last job of a group finishing together: it is due to
            # the millisecond, and every one of them freed a slot that waits for the poll.
            group_in = report.poll.group_until - time.monotonic()
            soonest = min(soonest, max(group_in, POLL_MIN_SLEEP))
        return soonest

    def start(self) -> Sweeper:
        self._thread = threading.Thread(target=self.run, name="pipeline-sweeper", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)


# -- collect -----------------------------------------------------------------------------


def collect_nodes(ctx: Context, node_ids: Sequence[int]) -> dict[int, str]:
    """Store the outputs of succeeded jobs: one get-bulk for the whole batch, and its SQL
    in a few transactions (claims, reads, then every output and node's outcome at once)."""
    owner = f"{ctx.worker}:{uuid.uuid4().hex[:8]}"
    results = dict.fromkeys(node_ids, "not-claimed")
    claimed = ctx.repo.claim(node_ids, owner, NodeState.COLLECTING)
    if not claimed:
        return results
    works = ctx.repo.collect_works(claimed)
    events: dict[int, nodes.Event] = {
        node_id: nodes.StoreFailed(owner, "no successful job to collect from")
        for node_id in claimed
        if node_id not in works
    }
    wanted = sorted(
        {
            a
            for w in works.values()
            for i, a in enumerate(w.asset_ids)
            if w.index_of(i) not in w.stored
        }
    )
    try:
        assets = {a.id: a for a in ctx.client.get_assets(wanted)} if wanted else {}
    except TransientError as exc:
        events |= {
            node_id: nodes.Release(owner, f"asset lookup failed: {exc}", exc.retry_after)
            for node_id in works
        }
        works = {}
    except AuthError as exc:
        for w in works.values():
            ctx.repo.fail_run(w.run_id, _auth_message(exc))
            results[w.node_id] = "auth-failed"
        works = {}
    copies = ctx.repo.stored_copies(a for w in works.values() for a in w.asset_ids) if works else {}
    objects: list[NewObject] = []

    def store(work: CollectWork) -> nodes.Event:
        try:
            store_outputs(ctx, work, assets, copies, objects)
        except TransientError as exc:
            return nodes.Release(owner, str(exc), exc.retry_after)
        except PermanentError as exc:
            return nodes.StoreFailed(owner, str(exc), getattr(exc, "hint", None))
        return nodes.Stored(owner)

    # The nodes' outputs are downloaded and stored side by side: the last wave of a run is
    # stored in about the time of one download, not one after another.
    stored = (
        io_threads("download").map(store, works.values())
        if len(works) > 1
        else map(store, works.values())
    )
    events |= {work.node_id: event for work, event in zip(works.values(), stored, strict=True)}
    try:
        moved = ctx.repo.record_collected(objects, events) if events else {}
    except TransientError as exc:
        # As for any transient trouble: the nodes go back, to be collected again soon (what
        # was stored is found at its key then, not downloaded again).
        logger.warning("recording collected nodes %s failed: %s", sorted(events), exc)
        events = {
            node_id: nodes.Release(owner, f"recording failed: {exc}", exc.retry_after)
            if isinstance(event, nodes.Stored)
            else event
            for node_id, event in events.items()
        }
        moved = ctx.repo.record_collected(objects, events)
    for node_id, event in events.items():
        if isinstance(event, nodes.Stored):
            results[node_id] = "succeeded" if node_id in moved else "claim-lost"
        else:
            results[node_id] = "released" if isinstance(event, nodes.Release) else "failed"
    ctx.wake.set()
    return results


def store_outputs(
    ctx: Context,
    work: CollectWork,
    assets: dict[str, Asset],
    copies: dict[str, dict[str, str]],
    recorded: list[NewObject],
) -> None:
    """Download every output of one node into storage; what is stored joins `recorded`
    (also when a later output fails: it is kept, not downloaded again).

    `copies` are the objects stored earlier for these assets (asset id -> {key: sha256}).
    """
    for number, asset_id in enumerate(work.asset_ids):
        index = work.index_of(number)
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
            step=work.step,
        )
        earlier = copies.get(asset_id, {}).get(key)
        found = ctx.storage.head(key) if earlier else None
        if found is not None and found.sha256 == earlier:
            # A reused node whose image is already at its key: record it, download nothing.
            stored, asset = found, asset
        else:
            metadata = {
                "run-id": work.run_id,
                "manifest": work.manifest_name,
                "item": work.manifest_item_id,
                "item-key": work.item_key,
                "seed": str(work.seed),
                "model": work.model,
                "trained-model": work.trained_model or "",
                "step": str(work.step),
                "node-key": work.node_key,
                "job-id": work.scenario_job_id,
                "asset-id": asset_id,
                "parent-asset-id": work.input_asset or "",
                "output-index": str(index),
            }
            stored, asset = _download_into(ctx, asset, key, mime, metadata, work.overwrite)
        recorded.append(
            NewObject(
                node_id=work.node_id,
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
        )


def _download_into(
    ctx: Context,
    asset: Asset,
    key: str,
    mime: str,
    metadata: dict[str, str],
    replace: bool,
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
                stored = ctx.storage.put(
                    key, chunks, content_type=mime, metadata=metadata, replace=replace
                )
                return stored, asset
        except StorageConflict as exc:
            # `overwrite: never`: say where the paid-for image still is.
            raise StorageConflict(
                f"{exc}; the new image stays on Scenario as asset {asset.id} "
                f"(job {metadata.get('job-id')}): put {{seed}} or {{item_key}} in `output`, "
                "or drop `overwrite: never`"
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
