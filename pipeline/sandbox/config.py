"""The sandbox's knobs: timing, failures, limits and fault rates, changeable at runtime."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Fault kinds, as counted in the stats document and named in the docs.
FAULT_KINDS = ("5xx", "drop", "expired", "slow", "truncate")

_RATE_FIELDS = (
    "failure_rate",
    "fault_5xx_rate",
    "fault_drop_rate",
    "fault_expired_rate",
    "fault_slow_rate",
    "fault_truncate_rate",
)


@dataclass
class SandboxConfig:
    """Everything that shapes how the sandbox answers; every field has a default."""

    api_key: str = "sandbox"
    api_secret: str = "sandbox"
    # A job takes `latency` seconds from creation to its terminal status, plus a uniform
    # offset in [-latency_spread, +latency_spread] seconds (clamped at zero).
    latency: float = 2.0
    latency_spread: float = 0.0
    failure_rate: float = 0.0
    fail_prompts: list[str] = field(default_factory=list)
    missing_models: list[str] = field(default_factory=list)
    url_ttl: float = 3600.0
    rate_limit: float | None = None
    rate_burst: int | None = None
    parallel_jobs: int | None = None
    fault_5xx_rate: float = 0.0
    fault_drop_rate: float = 0.0
    fault_expired_rate: float = 0.0
    fault_slow_rate: float = 0.0
    slow_seconds: float = 2.0
    fault_truncate_rate: float = 0.0
    # A page of GET /jobs ends early after a job whose sequence number is a multiple of
    # this, the way a scan-backed list stops at a partition boundary. None = never.
    page_cut_every: int | None = 37
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError when a field is out of range."""
        for name in _RATE_FIELDS:
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
        for name in ("latency", "latency_spread", "slow_seconds"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.url_ttl <= 0:
            raise ValueError("url_ttl must be > 0")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError("rate_limit must be > 0 (or None for unlimited)")
        if self.rate_burst is not None and self.rate_burst < 1:
            raise ValueError("rate_burst must be >= 1")
        if self.parallel_jobs is not None and self.parallel_jobs < 1:
            raise ValueError("parallel_jobs must be >= 1 (or None for unlimited)")
        if self.page_cut_every is not None and self.page_cut_every < 1:
            raise ValueError("page_cut_every must be >= 1 (or None)")
        if not isinstance(self.fail_prompts, list) or not isinstance(self.missing_models, list):
            raise ValueError("fail_prompts and missing_models must be lists of strings")

    @property
    def burst(self) -> int:
        """Token-bucket capacity: rate_burst, else one second's worth of requests."""
        if self.rate_burst is not None:
            return self.rate_burst
        return max(1, int(self.rate_limit or 1))

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON, credentials masked."""
        data = dataclasses.asdict(self)
        data["api_secret"] = "***"
        return data

    def replaced(self, **changes: Any) -> SandboxConfig:
        """A validated copy with `changes` applied; unknown field names raise ValueError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)
