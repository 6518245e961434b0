"""Acceptance: bad configuration and unreachable services, through the real command.

Every command answers a bad setting with exit 2 and one line naming the variable; a run
whose API, database or bucket cannot be reached exits 4 within seconds, naming it, and
records nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.sandbox import Sandbox
from tests.acceptance.conftest import Cli, Result, write_manifest
from tests.services import free_port

MANIFEST = """\
name: config-check
seed: 1
model: model_bfl-flux-2-dev
params: {width: 64, height: 64}
items:
  - id: one
    prompt: "a single icon"
"""


def one_line_error(result: Result, code: int) -> str:
    assert result.code == code, (result.code, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


BAD_SETTINGS = [
    ("SCENARIO_API_URL", "api.cloud.scenario.com/v1"),
    ("PIPELINE_DATABASE_URL", "nosuchdb://host/x"),
    ("PIPELINE_DATABASE_URL", "mysql+pymysql://user@db/x"),
    ("PIPELINE_BROKER_URL", "amqp://rabbit//"),
    ("PIPELINE_STORAGE_URL", "ftp://files/x"),
    ("AWS_ENDPOINT_URL", "not a url"),
    ("PIPELINE_PARALLEL_JOBS", "1e23"),
    ("PIPELINE_POLL_INTERVAL", "inf"),
    ("PIPELINE_SWEEP_TICK", "nan"),
    ("PIPELINE_LEASE_SECONDS", "1e23"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_SETTINGS)
def test_a_bad_setting_exits_2_from_run_with_the_variable_named(
    cli: Cli, sandbox: Sandbox, tmp_path: Path, variable: str, value: str
) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    line = one_line_error(cli("run", str(manifest), "--wait", **{variable: value}), 2)
    assert f"{variable}={value}" in line
    assert sum(sandbox.stats()["requests"].values()) == 0
    assert not (tmp_path / "lineage.db").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["validate", "batch.yaml"],
        ["status"],
        ["retry", "run_x"],
        ["worker"],
        ["poller"],
        ["lineage", "abc"],
        ["gallery"],
        ["db", "upgrade"],
    ],
)
def test_every_command_reports_a_bad_setting_in_one_line(
    cli: Cli, tmp_path: Path, command: list[str]
) -> None:
    write_manifest(tmp_path, MANIFEST)
    line = one_line_error(cli(*command, PIPELINE_POLL_INTERVAL="inf"), 2)
    assert "PIPELINE_POLL_INTERVAL=inf" in line


def test_a_dotenv_that_is_not_utf8_is_one_line_naming_the_file(cli: Cli, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    (tmp_path / ".env").write_bytes(b"PIPELINE_PARALLEL_JOBS=4\nSCENARIO_API_KEY=\xff\xfe\n")
    for command in (["run", str(manifest), "--wait"], ["validate", str(manifest)], ["status"]):
        line = one_line_error(cli(*command), 2)
        assert str(tmp_path / ".env") in line and "UTF-8" in line


def test_a_sqlite_path_under_a_file_is_one_line(cli: Cli, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    (tmp_path / "a-file").write_text("x")
    url = f"sqlite:///{tmp_path}/a-file/lineage.db"
    for command in (["run", str(manifest), "--wait"], ["db", "upgrade"], ["status"]):
        line = one_line_error(cli(*command, PIPELINE_DATABASE_URL=url), 2)
        assert "PIPELINE_DATABASE_URL" in line and "not a folder" in line


def test_an_api_where_nothing_listens_exits_4_within_seconds_and_records_nothing(
    cli: Cli, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    url = f"http://127.0.0.1:{free_port()}/v1"
    started = time.monotonic()
    line = one_line_error(cli("run", str(manifest), "--wait", SCENARIO_API_URL=url), 4)
    elapsed = time.monotonic() - started
    assert f"the Scenario API at {url}" in line
    assert elapsed < 20, f"took {elapsed:.1f}s"  # not a 40-second retry loop
    assert "no runs recorded" in cli("status").stderr


def test_wrong_credentials_exit_2_before_a_run_is_recorded(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    result = cli("run", str(manifest), "--wait", SCENARIO_API_SECRET="wrong-secret-4242")
    line = one_line_error(result, 2)
    assert "credentials" in line and "wrong-secret-4242" not in line
    assert sandbox.stats()["requests"].get("POST /generate/custom/{modelId}", 0) == 0
    assert "no runs recorded" in cli("status").stderr


def test_an_api_url_that_is_not_the_api_base_exits_2_naming_the_variable(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    wrong = sandbox.url.removesuffix("/v1") + "/v2"
    line = one_line_error(cli("run", str(manifest), "--wait", SCENARIO_API_URL=wrong), 2)
    assert f"SCENARIO_API_URL={wrong}" in line


def test_an_invalid_s3_endpoint_names_the_variable_not_an_outage(cli: Cli, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    line = one_line_error(
        cli(
            "run",
            str(manifest),
            "--wait",
            PIPELINE_STORAGE_URL="s3://bucket/prefix",
            AWS_ENDPOINT_URL="http//minio:9000",
        ),
        2,
    )
    assert "AWS_ENDPOINT_URL=http//minio:9000" in line and "reach" not in line


def test_an_s3_endpoint_where_nothing_listens_exits_4_naming_the_bucket(
    cli: Cli, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, MANIFEST)
    endpoint = f"http://127.0.0.1:{free_port()}"
    line = one_line_error(
        cli(
            "run",
            str(manifest),
            "--wait",
            PIPELINE_STORAGE_URL="s3://bucket/prefix",
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="test",
            AWS_SECRET_ACCESS_KEY="test-secret",
            AWS_EC2_METADATA_DISABLED="true",
        ),
        4,
    )
    assert "s3://bucket" in line and endpoint in line and "AWS_ENDPOINT_URL" in line


def test_db_upgrade_to_an_unknown_revision_exits_2_with_one_line(cli: Cli) -> None:
    line = one_line_error(cli("db", "upgrade", "no-such-revision"), 2)
    assert "no-such-revision" in line


def test_db_upgrade_when_postgres_is_unreachable_exits_4(cli: Cli) -> None:
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/lineage"
    line = one_line_error(cli("db", "upgrade", PIPELINE_DATABASE_URL=url), 4)
    assert "database" in line
