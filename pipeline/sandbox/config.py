"""The sandbox's knobs: timing, failures, limits and fault rates, changeable at runtime."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

#: Fault kinds, as counted in the stats document and named in the docs.
FAULT_KINDS = ("5xx", "drop", "expired", "slow", "truncate")

#: Model types of the Swagger's model `type` enum (also in the SDK's).
MODEL_TYPES = (
    "custom",
    "flux.1",
    "flux.1-composition",
    "flux.1-kontext-dev",
    "flux.1-kontext-lora",
    "flux.1-krea-dev",
    "flux.1-krea-lora",
    "flux.1-lora",
    "flux.1-pro",
    "flux.1.1-pro-ultra",
    "flux1.1-pro",
    "gpt-image-1",
    "sd-1_5",
    "sd-1_5-composition",
    "sd-1_5-lora",
    "sd-xl",
    "sd-xl-composition",
    "sd-xl-lora",
)

#: Demo trained models every sandbox knows; any other model id is of type "custom".
DEFAULT_MODEL_TYPES = {
    "model_sandbox-sdxl-lora": "sd-xl-lora",
    "model_sandbox-flux1-lora": "flux.1-lora",
    "model_sandbox-sd15-lora": "sd-1_5-lora",
}

FAULT_SPACINGS = ("random", "even")

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
    # Seconds of network round trip added to every API and CDN request: half before the
    # sandbox handles it, half before its answer leaves (a hosted API is tens of ms away).
    rtt: float = 0.0
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
    # "random": each request rolls its fault against the rate (seeded by `seed`).
    # "even": each kind of fault fires on exactly its rate of the requests it applies to,
    # evenly spaced (at a rate of 0.08, the 13th, 25th, 38th, ...), whatever order
    # concurrent requests arrive in: for tests that must see every kind fire.
    fault_spacing: str = "random"
    # model id -> the model `type` GET /models/{id} reports (everything else is "custom").
    model_types: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MODEL_TYPES))
    # model id or jobType -> seconds a job takes instead of `latency` (the model id wins).
    model_latency: dict[str, float] = field(default_factory=dict)
    # Whether the API key may read GET /teams/{teamId}/limits (False: 403, as for many keys).
    limits_access: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError when a field is out of range."""
        for name in _RATE_FIELDS:
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
        for name in ("latency", "latency_spread", "rtt", "slow_seconds"):
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
        if not isinstance(self.model_types, dict):
            raise ValueError("model_types must be an object of model id -> model type")
        for model_id, kind in self.model_types.items():
            if not isinstance(model_id, str) or kind not in MODEL_TYPES:
                raise ValueError(
                    f"model_types[{model_id!r}] must be one of {', '.join(MODEL_TYPES)}, "
                    f"got {kind!r}"
                )
        if not isinstance(self.model_latency, dict):
            raise ValueError("model_latency must be an object of model id or jobType -> seconds")
        for key, seconds in self.model_latency.items():
            if (
                not isinstance(key, str)
                or isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not 0 <= seconds < math.inf
            ):
                raise ValueError(
                    f"model_latency[{key!r}] must be a finite number of seconds >= 0, "
                    f"got {seconds!r}"
                )
        if self.fault_spacing not in FAULT_SPACINGS:
            raise ValueError(
                f"fault_spacing must be one of {', '.join(FAULT_SPACINGS)}, "
                f"got {self.fault_spacing!r}"
            )
        if not isinstance(self.limits_access, bool):
            raise ValueError("limits_access must be true or false")

    def latency_for(self, *keys: str) -> float:
        """`model_latency` of the first key that has one (model id, then jobType), else
        `latency`."""
        for key in keys:
            if key in self.model_latency:
                return float(self.model_latency[key])
        return self.latency

    def model_type(self, model_id: str) -> str:
        """The model's `type`: from `model_types`, else "custom"."""
        return self.model_types.get(model_id, "custom")

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
