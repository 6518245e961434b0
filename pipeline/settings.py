"""Typed settings, read from the environment (and a `.env` file) at the entry points only.

Core modules never read `os.environ`: the CLI, the Celery worker bootstrap and the tests
build one `Settings` and pass what each part needs down.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_API_URL = "https://api.cloud.scenario.com/v1"


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

    # Fleet-wide limits, enforced by the governor (Redis when distributed).
    parallel_jobs: int = Field(4, ge=1, validation_alias="PIPELINE_PARALLEL_JOBS")
    requests_per_second: float = Field(10.0, gt=0, validation_alias="PIPELINE_REQUESTS_PER_SECOND")
    max_job_attempts: int = Field(2, ge=1, validation_alias="PIPELINE_MAX_JOB_ATTEMPTS")
    poll_interval: float = Field(1.0, gt=0, validation_alias="PIPELINE_POLL_INTERVAL")
    http_timeout: float = Field(30.0, gt=0, validation_alias="PIPELINE_HTTP_TIMEOUT")
    # A task holding an item longer than this is presumed dead and its item re-dispatched.
    lease_seconds: float = Field(90.0, gt=0, validation_alias="PIPELINE_LEASE_SECONDS")
    sweep_tick: float = Field(0.5, gt=0, validation_alias="PIPELINE_SWEEP_TICK")
    worker_concurrency: int = Field(8, ge=1, validation_alias="PIPELINE_WORKER_CONCURRENCY")

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

    @property
    def redis_url(self) -> str | None:
        """The Redis the governor shares with the broker, when the broker is Redis."""
        return self.broker_url if self.broker_url.startswith(("redis://", "rediss://")) else None

    @property
    def distributed(self) -> bool:
        """True when tasks go through a real broker to separate worker processes."""
        return not self.broker_url.startswith("memory://")
