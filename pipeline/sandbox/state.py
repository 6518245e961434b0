"""In-memory jobs, assets and counters; job status is computed from timestamps, never ticked."""

from __future__ import annotations

import hashlib
import json
import math
import random
import secrets
import string
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from pipeline.sandbox.catalog import Plan
from pipeline.sandbox.config import FAULT_KINDS, SandboxConfig

TERMINAL = ("success", "failure", "canceled")
ALL_STATUSES = ("pending", "queued", "warming-up", "in-progress", "finalizing", *TERMINAL)
# Where in a job's duration each status begins; the terminal status arrives at 1.0.
_SUCCESS_PATH = (
    ("pending", 0.0),
    ("queued", 0.1),
    ("warming-up", 0.2),
    ("in-progress", 0.3),
    ("finalizing", 0.9),
    ("success", 1.0),
)
_FAILURE_PATH = (*_SUCCESS_PATH[:4], ("failure", 1.0))
_ALNUM = string.ascii_letters + string.digits
_CACHE_BYTES = 256 * 1024 * 1024


@lru_cache(maxsize=65536)  # a job document formats the same few timestamps on every poll
def iso(ts: float) -> str:
    """Epoch seconds as the API's ISO string with milliseconds ("2023-02-03T11:19:41.579Z")."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_iso(text: str) -> float:
    """An ISO 8601 date (with Z or an offset) as epoch seconds; ValueError if malformed."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def body_key(model_id: str, body: dict[str, Any]) -> str:
    """sha256 of the model id plus the canonical JSON body: the identity of a submission."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{model_id}\n{canonical}".encode()).hexdigest()


@dataclass
class Job:
    """A submitted job; everything about its progress derives from `created` and `duration`."""

    seq: int
    job_id: str
    job_type: str
    model_id: str
    body: dict[str, Any]
    created: float
    duration: float
    cost: float
    key: str
    plan: Plan | None = None
    fails: bool = False
    error: str | None = None
    hint: str | None = None
    canceled_at: float | None = None
    asset_ids: list[str] | None = None
    output: dict[str, Any] | None = None
    # Output assets announced before the job ends (the remove-background answer's `asset`).
    reserved_asset_ids: list[str] = field(default_factory=list)

    @property
    def pool(self) -> str:
        """Which parallel-jobs cap the job counts against: "custom" or "inference"."""
        return "custom" if self.job_type == "custom" else "inference"

    def timeline(self) -> list[tuple[str, float]]:
        """(status, time) for every status reached so far or scheduled."""
        path = _FAILURE_PATH if self.fails else _SUCCESS_PATH
        steps = [(name, round(self.created + frac * self.duration, 3)) for name, frac in path]
        if self.canceled_at is not None:
            steps = [(name, at) for name, at in steps if at <= self.canceled_at]
            steps.append(("canceled", self.canceled_at))
        return steps

    def history(self, now: float) -> list[tuple[str, float]]:
        """The statuses reached by `now` (the first one always)."""
        steps = self.timeline()
        return [steps[0]] + [(name, at) for name, at in steps[1:] if at <= now]

    def status(self, now: float) -> str:
        """The job's status at `now`."""
        return self.history(now)[-1][0]

    def progress(self, now: float) -> float:
        """0 until in-progress, then linear to 0.9, 0.95 while finalizing, 1 on success."""
        reached = self.history(now)
        status = reached[-1][0]
        if status == "success":
            return 1.0
        if status in ("failure", "canceled"):
            # A failed or canceled job keeps the progress it had when it stopped.
            now = reached[-1][1]
            status = reached[-2][0] if len(reached) > 1 else "pending"
        if status == "finalizing":
            return 0.95
        if status != "in-progress":
            return 0.0
        start = dict(self.timeline())["in-progress"]
        span = max(0.6 * self.duration, 1e-9)
        return round(min(0.9, max(0.0, 0.9 * (now - start) / span)), 3)


@dataclass
class Asset:
    """An image the sandbox can serve: uploaded bytes or a recipe that renders them."""

    asset_id: str
    created: float
    source: str  # the API's asset source/metadata type: txt2img, uploaded, upscale, ...
    width: int
    height: int
    render: Callable[[], bytes]
    mime: str = "image/png"
    job_id: str | None = None
    model_id: str | None = None
    output_index: int | None = None
    name: str | None = None
    prompt: str | None = None
    seed: str | None = None
    parent_id: str | None = None
    sha256: str | None = None
    size: int | None = None
    meta_type: str | None = None  # metadata.type when it differs from `source`
    deleted: bool = False


@dataclass
class Stats:
    """What the sandbox received and produced, for GET /_sandbox/stats."""

    requests: Counter[str] = field(default_factory=Counter)
    submissions: Counter[str] = field(default_factory=Counter)
    duplicate_submissions: int = 0
    jobs_created: int = 0
    jobs_by_type: Counter[str] = field(default_factory=Counter)
    jobs_by_model: Counter[str] = field(default_factory=Counter)
    responses_429: Counter[str] = field(default_factory=lambda: Counter(rate=0, parallel=0))
    faults: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(FAULT_KINDS, 0)))
    uploads: int = 0
    upload_parts: int = 0
    assets_deleted: int = 0
    cdn_downloads: int = 0
    creative_units: float = 0.0


class Store:
    """All sandbox state behind one lock; the clock is injectable for tests."""

    def __init__(self, config: SandboxConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.lock = threading.RLock()
        # Signs CDN links; independent of the config so a runtime change never voids them.
        self.signing_key = secrets.token_bytes(32)
        self.reset()

    def reset(self) -> None:
        """Forget every job, asset and counter; re-seed the random generators."""
        with self.lock:
            seed = self.config.seed
            self.rng = random.Random(seed)
            self.id_rng = random.Random(None if seed is None else f"ids-{seed}")
            self.rolls: Counter[str] = Counter()
            self.jobs: dict[str, Job] = {}
            self.assets: dict[str, Asset] = {}
            self.by_key: dict[str, list[Job]] = {}
            self.active: set[str] = set()
            self.uploads: dict[str, Any] = {}
            self.stats = Stats()
            self.cache: OrderedDict[str, bytes] = OrderedDict()
            self.cache_bytes = 0
            self.tokens = float(self.config.burst)
            self.tokens_at = self.clock()
            self.seq = 0

    def configure(self, **changes: Any) -> SandboxConfig:
        """Apply config changes (ValueError on bad ones); the rate bucket refills."""
        with self.lock:
            self.config = self.config.replaced(**changes)
            if "seed" in changes:  # replay faults from the new seed from here on
                self.rng = random.Random(self.config.seed)
            if {"rate_limit", "rate_burst"} & set(changes):
                self.tokens, self.tokens_at = float(self.config.burst), self.clock()
            return self.config

    def now_ms(self) -> float:
        """The clock truncated to milliseconds (the API's precision), never ahead of it."""
        return math.floor(self.clock() * 1000) / 1000

    # --- randomness -------------------------------------------------------------------
    def roll(self, rate: float, kind: str) -> bool:
        """Whether this request of `kind` gets its fault: with probability `rate` (seeded,
        so a sequence of rolls is reproducible), or with `fault_spacing` "even", on exactly
        the requests of that kind where floor(count * rate) steps up."""
        if rate <= 0:
            return False
        with self.lock:
            if self.config.fault_spacing == "even":
                self.rolls[kind] += 1
                count = self.rolls[kind]
                return math.floor(count * rate) > math.floor((count - 1) * rate)
            return self.rng.random() < rate

    def new_id(self, prefix: str, length: int) -> str:
        """A random id shaped like the API's (job_ + 25, asset_ + 22 alphanumerics)."""
        with self.lock:
            return prefix + "".join(self.id_rng.choice(_ALNUM) for _ in range(length))

    # --- limits -------------------------------------------------------------------------
    def take_token(self) -> float | None:
        """Spend one request token; None if allowed, else seconds until one is available."""
        rate = self.config.rate_limit
        if rate is None:
            return None
        with self.lock:
            now = self.clock()
            capacity = float(self.config.burst)
            self.tokens = min(capacity, self.tokens + (now - self.tokens_at) * rate)
            self.tokens_at = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return None
            self.stats.responses_429["rate"] += 1
            return (1.0 - self.tokens) / rate

    def running_jobs(self, pool: str | None = None) -> int:
        """How many jobs (of one pool: "custom" or "inference") are not terminal now."""
        with self.lock:
            now = self.clock()
            for job_id in list(self.active):
                if self.jobs[job_id].status(now) in TERMINAL:
                    self.active.discard(job_id)
            if pool is None:
                return len(self.active)
            return sum(1 for job_id in self.active if self.jobs[job_id].pool == pool)

    # --- jobs ---------------------------------------------------------------------------
    def add_job(self, job: Job) -> None:
        """Record an accepted, billed submission and count duplicates."""
        with self.lock:
            now = self.clock()
            earlier = self.by_key.setdefault(job.key, [])
            if any(prior.status(now) not in ("failure", "canceled") for prior in earlier):
                self.stats.duplicate_submissions += 1
            earlier.append(job)
            self.jobs[job.job_id] = job
            self.active.add(job.job_id)
            self.stats.submissions[job.key] += 1
            self.stats.jobs_created += 1
            self.stats.jobs_by_type[job.job_type] += 1
            self.stats.jobs_by_model[job.model_id] += 1
            self.stats.creative_units += job.cost

    def next_seq(self) -> int:
        """A job sequence number (creation order)."""
        with self.lock:
            self.seq += 1
            return self.seq

    def job_duration(self, *keys: str) -> float:
        """A job's duration: the latency of the first of `keys` (model id, jobType) in
        model_latency, else `latency`, plus a uniform offset within +-latency_spread."""
        cfg = self.config
        with self.lock:
            offset = self.rng.uniform(-cfg.latency_spread, cfg.latency_spread)
        return max(0.0, cfg.latency_for(*keys) + offset)

    def cancel(self, job: Job) -> bool:
        """Cancel a running job where it stands; False if it had already finished."""
        with self.lock:
            now = self.now_ms()
            if job.status(now) in TERMINAL:
                return False
            job.canceled_at = now
            self.active.discard(job.job_id)
            return True

    # --- assets -------------------------------------------------------------------------
    def find_asset(self, asset_id: str) -> Asset | None:
        """The asset, unless it is unknown or deleted."""
        asset = self.assets.get(asset_id)
        return None if asset is None or asset.deleted else asset

    def add_asset(self, asset: Asset, data: bytes | None = None) -> None:
        """Register an asset (uploaded bytes are cached for good)."""
        with self.lock:
            self.assets[asset.asset_id] = asset
            if data is not None:
                asset.sha256 = hashlib.sha256(data).hexdigest()
                asset.size = len(data)

    def asset_bytes(self, asset: Asset) -> bytes:
        """The asset's bytes, rendered on first use and kept in a bounded cache."""
        with self.lock:
            data = self.cache.get(asset.asset_id)
            if data is not None:
                self.cache.move_to_end(asset.asset_id)
                return data
        data = asset.render()  # outside the lock: rendering may take milliseconds
        with self.lock:
            asset.sha256 = hashlib.sha256(data).hexdigest()
            asset.size = len(data)
            if asset.asset_id not in self.cache:
                self.cache[asset.asset_id] = data
                self.cache_bytes += len(data)
            while self.cache_bytes > _CACHE_BYTES and len(self.cache) > 1:
                _, evicted = self.cache.popitem(last=False)
                self.cache_bytes -= len(evicted)
        return data

    # --- stats --------------------------------------------------------------------------
    def snapshot(self, produced: list[Asset]) -> dict[str, Any]:
        """The stats document (`produced` = every job output asset, already rendered)."""
        with self.lock:
            now = self.clock()
            jobs = Counter(dict.fromkeys(ALL_STATUSES, 0))
            jobs.update(job.status(now) for job in self.jobs.values())
            s = self.stats
            return {
                "requests": dict(s.requests),
                "submissions": dict(s.submissions),
                "duplicate_submissions": s.duplicate_submissions,
                "jobs_created": s.jobs_created,
                "jobs_by_type": dict(s.jobs_by_type),
                "jobs_by_model": dict(s.jobs_by_model),
                "jobs": dict(jobs),
                "images": {a.asset_id: a.sha256 for a in produced},
                "responses_429": dict(s.responses_429),
                "faults": dict(s.faults),
                "uploads": s.uploads,
                "upload_parts": s.upload_parts,
                "assets_deleted": s.assets_deleted,
                "cdn_downloads": s.cdn_downloads,
                "creative_units": s.creative_units,
                "config": self.config.public_dict(),
            }
