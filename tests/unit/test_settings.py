"""Settings are validated when read: one line naming the variable and its value, no secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.redact import redact_url, shorten
from pipeline.settings import load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No pipeline variable from the caller's shell, and no .env but the test's own."""
    import os

    for name in list(os.environ):
        if name.startswith(("SCENARIO_", "PIPELINE_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> str:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert variable in message
    return message


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("SCENARIO_API_URL", "not a url", "http:// or https://"),
        ("SCENARIO_API_URL", "ftp://api.example.com/v1", "http:// or https://"),
        ("SCENARIO_API_URL", "https://", "no host"),
        ("SCENARIO_API_URL", "http://127.0.0.1:99999/v1", "not a valid URL"),
        ("PIPELINE_DATABASE_URL", "oracle+nope://db/x", "unknown database scheme"),
        ("PIPELINE_DATABASE_URL", "mysql://user@db/x", "not installed"),
        ("PIPELINE_DATABASE_URL", "postgresql+psycopg2://db/x", "not installed"),
        ("PIPELINE_DATABASE_URL", "::::", "not a database URL"),
        ("PIPELINE_BROKER_URL", "amqp://guest@rabbit//", "memory:// (embedded) or redis://"),
        ("PIPELINE_BROKER_URL", "redis://", "no host"),
        ("PIPELINE_STORAGE_URL", "gs://bucket", "unsupported storage URL scheme"),
        ("PIPELINE_STORAGE_URL", "s3://", "no bucket"),
        ("PIPELINE_STORAGE_URL", "s3://no spaces allowed", "not a bucket name"),
        ("AWS_ENDPOINT_URL", "minio:9000", "http:// or https://"),
        ("AWS_ENDPOINT_URL", "http://", "no host"),
        ("PIPELINE_PUBLIC_BASE_URL", "cdn.example.com/assets", "http:// or https://"),
        ("PIPELINE_PARALLEL_JOBS", "1e23", "valid integer"),
        ("PIPELINE_PARALLEL_JOBS", "100000000000000000000000", "less than or equal"),
        ("PIPELINE_PARALLEL_JOBS", "0", "greater than or equal to 1"),
        ("PIPELINE_POLL_INTERVAL", "inf", "finite"),
        ("PIPELINE_POLL_INTERVAL", "nan", "finite"),
        ("PIPELINE_SWEEP_TICK", "1e23", "less than or equal"),
        ("PIPELINE_REQUESTS_PER_SECOND", "-infinity", "finite"),
        ("PIPELINE_HTTP_TIMEOUT", "0", "greater than 0"),
        ("PIPELINE_LEASE_SECONDS", "Infinity", "finite"),
        ("PIPELINE_MAX_JOB_ATTEMPTS", "1e3", "valid integer"),
        ("PIPELINE_WORKER_CONCURRENCY", "99999", "less than or equal"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable_and_its_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, reason: str
) -> None:
    message = refused(monkeypatch, variable, value)
    assert f"{variable}={value}" in message
    assert reason in message


def test_a_sqlite_path_under_a_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "plain-file").write_text("not a folder")
    message = refused(
        monkeypatch, "PIPELINE_DATABASE_URL", f"sqlite:///{tmp_path}/plain-file/sub/lineage.db"
    )
    assert "not a folder" in message and "plain-file" in message


def test_passwords_in_urls_are_hidden_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refused(monkeypatch, "PIPELINE_DATABASE_URL", "mysql://app:hunter2pw@db/lineage")
    assert "hunter2pw" not in message and "app:***@db" in message
    monkeypatch.delenv("PIPELINE_DATABASE_URL")
    message = refused(monkeypatch, "PIPELINE_BROKER_URL", "amqp://:hunter2pw@rabbit:5672//")
    assert "hunter2pw" not in message
    monkeypatch.delenv("PIPELINE_BROKER_URL")
    message = refused(monkeypatch, "PIPELINE_STORAGE_URL", "s3://AKIAKEY:hunter2pw@bucket")
    assert "hunter2pw" not in message and "credentials" in message


def test_a_megabyte_value_gives_a_short_line(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refused(monkeypatch, "SCENARIO_API_URL", "x" * 1_000_000)
    assert len(message) < 250
    monkeypatch.delenv("SCENARIO_API_URL")
    message = refused(monkeypatch, "PIPELINE_PARALLEL_JOBS", "9" * 100_000)
    assert len(message) < 250


def test_control_characters_stay_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refused(monkeypatch, "SCENARIO_API_URL", "http://api\n.example.com\x1b[2J")
    assert "\x1b" not in message and "\\n" in message


def test_the_lease_must_outlive_three_http_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_HTTP_TIMEOUT", "60")
    message = refused(monkeypatch, "PIPELINE_LEASE_SECONDS", "100")
    assert "PIPELINE_HTTP_TIMEOUT" in message


def test_a_dotenv_that_is_not_utf8_names_the_file(clean_environment: Path) -> None:
    (clean_environment / ".env").write_bytes(b"SCENARIO_API_KEY=caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith(f"{clean_environment / '.env'}: not UTF-8")


def test_valid_settings_and_the_defaults_load(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings()
    assert defaults.database_url == "sqlite:///pipeline.db" and not defaults.distributed
    monkeypatch.setenv("PIPELINE_BROKER_URL", "rediss://:pw@cache.internal:6380/2")
    monkeypatch.setenv("PIPELINE_DATABASE_URL", "postgresql://u:pw@db:5432/lineage")
    monkeypatch.setenv("PIPELINE_STORAGE_URL", "s3://my-bucket/outputs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("PIPELINE_POLL_INTERVAL", "0.05")
    settings = load_settings()
    assert settings.distributed and settings.s3_endpoint_url == "http://127.0.0.1:9000"
    assert settings.poll_interval == 0.05


def test_repr_and_str_never_show_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCENARIO_API_KEY", "key-9f8e7d6c")
    monkeypatch.setenv("SCENARIO_API_SECRET", "secret-1a2b3c4d")
    monkeypatch.setenv("PIPELINE_DATABASE_URL", "postgresql://app:dbpass-5e6f@db/lineage")
    monkeypatch.setenv("PIPELINE_BROKER_URL", "redis://:redispass-7a8b@cache:6379/0")
    settings = load_settings()
    for text in (repr(settings), str(settings), f"{settings}", f"{settings!r}"):
        for secret in ("key-9f8e7d6c", "secret-1a2b3c4d", "dbpass-5e6f", "redispass-7a8b"):
            assert secret not in text
    assert settings.database_url == "postgresql://app:dbpass-5e6f@db/lineage"  # usable as is
    assert settings.api_secret is not None
    assert settings.api_secret.get_secret_value() == "secret-1a2b3c4d"


def test_redaction_helpers() -> None:
    assert redact_url("postgresql://u:p@h/db") == "postgresql://u:***@h/db"
    assert redact_url("https://token@cdn.example.com/x") == "https://***@cdn.example.com/x"
    assert redact_url("postgresql://postgres@h/db") == "postgresql://postgres@h/db"
    assert redact_url("sqlite:///pipeline.db") == "sqlite:///pipeline.db"
    assert redact_url("http://u:p@h:badport/") == "http://u:***@h:badport/"
    assert redact_url("http://u:p@[bad/") == "http://***@[bad/"  # unparsable: cut anyway
    assert shorten("a" * 200) == "a" * 79 + "…"
    assert shorten("short") == "short"
