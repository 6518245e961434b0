"""Typed settings, read from the environment (and a `.env` file) at the entry points only.

Core modules never read `os.environ`: the CLI, the Celery worker bootstrap and the tests
build one `Settings` and pass what each part needs down.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import ConfigError
from pipeline.redact import redact_url, shown

DEFAULT_API_URL = "https://api.cloud.scenario.com/v1"
ENV_FILE = ".env"

#: Fields whose value may carry a password (URLs with userinfo): redacted in repr and errors.
_URL_FIELDS = (
    "api_url",
    "database_url",
    "broker_url",
    "storage_url",
    "public_base_url",
    "s3_endpoint_url",
)
_SECRET_VARIABLES = {
    "SCENARIO_API_KEY",
    "SCENARIO_SDK_API_KEY",
    "SCENARIO_API_SECRET",
    "SCENARIO_SDK_API_SECRET",
    "PIPELINE_NOTIFY_URL",
}


def _http_url_problem(url: str) -> str | None:
    from pipeline.storage import http_url_problem

    return http_url_problem(url)


class Settings(BaseSettings):
    """Everything the pipeline can be configured with."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )

    api_url: str = Field(DEFAULT_API_URL, validation_alias="SCENARIO_API_URL")
    api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("SCENARIO_API_KEY", "SCENARIO_SDK_API_KEY")
    )
    api_secret: SecretStr | None = Field(
        None, validation_alias=AliasChoices("SCENARIO_API_SECRET", "SCENARIO_SDK_API_SECRET")
    )
    database_url: str = Field("sqlite:///pipeline.db", validation_alias="PIPELINE_DATABASE_URL")
    broker_url: str = Field("memory://", validation_alias="PIPELINE_BROKER_URL")
    storage_url: str = Field("file://./assets", validation_alias="PIPELINE_STORAGE_URL")
    public_base_url: str | None = Field(None, validation_alias="PIPELINE_PUBLIC_BASE_URL")
    s3_endpoint_url: str | None = Field(None, validation_alias="AWS_ENDPOINT_URL")

    # Fleet-wide limits, enforced by the governor (Redis when distributed). Every number
    # is finite, positive and bounded: `inf` or 1e23 would overflow timers and kill loops.
    # A ceiling only: the plan's cap is read or learned (pipeline.capacity).
    parallel_jobs: int | None = Field(
        None, ge=1, le=10_000, validation_alias="PIPELINE_PARALLEL_JOBS"
    )
    # A safety pacing, not the plan's number (Scenario publishes none): generations are
    # already held to the parallel-jobs cap and the pipeline spends about 1.3 requests per
    # image, so 20/s keeps up with about 15 images a second (a 16-job plan on 1 s tool jobs);
    # 10/s was the bottleneck of an 8-job plan on 1 s jobs. A 429 halves it fleet-wide.
    requests_per_second: float = Field(
        20.0, gt=0, le=10_000, allow_inf_nan=False, validation_alias="PIPELINE_REQUESTS_PER_SECOND"
    )
    max_job_attempts: int = Field(2, ge=1, le=100, validation_alias="PIPELINE_MAX_JOB_ATTEMPTS")
    # None: derived from the learned job durations (see stages.list_interval).
    poll_interval: float | None = Field(
        None, gt=0, le=3600, allow_inf_nan=False, validation_alias="PIPELINE_POLL_INTERVAL"
    )
    http_timeout: float = Field(
        30.0, gt=0, le=3600, allow_inf_nan=False, validation_alias="PIPELINE_HTTP_TIMEOUT"
    )
    # A task holding an item longer than this is presumed dead and its item re-dispatched.
    lease_seconds: float = Field(
        90.0, gt=0, le=7 * 86400, allow_inf_nan=False, validation_alias="PIPELINE_LEASE_SECONDS"
    )
    sweep_tick: float = Field(
        0.5, gt=0, le=3600, allow_inf_nan=False, validation_alias="PIPELINE_SWEEP_TICK"
    )
    worker_concurrency: int = Field(
        8, ge=1, le=1000, validation_alias="PIPELINE_WORKER_CONCURRENCY"
    )
    # Nightly operations (pipeline/schedule.py, pipeline/notify.py). A webhook URL often
    # carries a token in its path: it is a secret, never shown.
    notify_url: SecretStr | None = Field(None, validation_alias="PIPELINE_NOTIFY_URL")
    schedule: str | None = Field(None, validation_alias="PIPELINE_SCHEDULE")
    schedule_manifests: str = Field("manifests", validation_alias="PIPELINE_SCHEDULE_MANIFESTS")

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        return _checked("SCENARIO_API_URL", value, _http_url_problem(value))

    @field_validator("public_base_url")
    @classmethod
    def _public_base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return _checked("PIPELINE_PUBLIC_BASE_URL", value, _http_url_problem(value))

    @field_validator("notify_url")
    @classmethod
    def _notify_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        problem = _http_url_problem(value.get_secret_value())
        if problem:  # the value is not shown: it may hold the webhook's token
            raise ValueError(f"PIPELINE_NOTIFY_URL=***: {problem}")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        from pipeline.schedule import crontab_problem

        if value is None or not value.strip():
            return None
        return _checked("PIPELINE_SCHEDULE", value, crontab_problem(value))

    @field_validator("s3_endpoint_url")
    @classmethod
    def _s3_endpoint_url(cls, value: str | None) -> str | None:
        from pipeline.storage import endpoint_url_problem

        if value is None or value == "":
            return None  # boto3 treats an empty AWS_ENDPOINT_URL as unset too
        return _checked("AWS_ENDPOINT_URL", value, endpoint_url_problem(value))

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        from pipeline.db import url_problem

        return _checked("PIPELINE_DATABASE_URL", value, url_problem(value))

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            return _checked("PIPELINE_BROKER_URL", value, "not a valid URL")
        if parts.scheme == "memory":
            return value
        if parts.scheme not in ("redis", "rediss"):
            problem = "must be memory:// (embedded) or redis://host:port/db (distributed)"
        elif not parts.hostname:
            problem = "names no host"
        else:
            problem = None
        return _checked("PIPELINE_BROKER_URL", value, problem)

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, value: str) -> str:
        from pipeline.storage import url_problem

        return _checked("PIPELINE_STORAGE_URL", value, url_problem(value))

    @model_validator(mode="after")
    def _lease_outlives_a_request(self) -> Settings:
        # A submit renews its lease right before the POST; the POST must end (or time out)
        # well inside it, or another worker could take the item over and POST as well.
        if self.lease_seconds < 3 * self.http_timeout:
            raise ValueError(
                f"PIPELINE_LEASE_SECONDS ({self.lease_seconds:g}) must be at least three times "
                f"PIPELINE_HTTP_TIMEOUT ({self.http_timeout:g})"
            )
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # SecretStr already hides the API credentials; URLs may carry passwords too.
        for name, value in super().__repr_args__():
            if name in _URL_FIELDS and isinstance(value, str):
                value = redact_url(value)
            yield name, value

    @property
    def redis_url(self) -> str | None:
        """The Redis the governor shares with the broker, when the broker is Redis."""
        return self.broker_url if self.broker_url.startswith(("redis://", "rediss://")) else None

    @property
    def distributed(self) -> bool:
        """True when tasks go through a real broker to separate worker processes."""
        return not self.broker_url.startswith("memory://")


def _checked(variable: str, value: str, problem: str | None) -> str:
    if problem:
        raise ValueError(f"{variable}={shown(value)}: {problem}")
    return value


def load_settings(**values: Any) -> Settings:
    """Settings from the environment and `.env`, or a one-line ConfigError naming the cause.

    The line names the variable and its value (secrets as ***, long values cut short).
    """
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{Path(ENV_FILE).resolve()}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
            f"at offset {exc.start})"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{Path(ENV_FILE).resolve()}: cannot read it: {exc.strerror or exc}"
        ) from None


def _describe(exc: ValidationError) -> str:
    """One line for the first problem: `invalid setting VAR=value: message`."""
    first = exc.errors(include_url=False)[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    variable = ".".join(str(p) for p in first["loc"])
    if first["type"] == "value_error":
        # Our own validators already name the variable and its (redacted) value.
        return f"invalid setting {message}" if variable else f"invalid settings: {message}"
    if not variable:
        return f"invalid settings: {message}"
    value = shown(first.get("input"), secret=variable in _SECRET_VARIABLES)
    return f"invalid setting {variable}={value}: {message}"
