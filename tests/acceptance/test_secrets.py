"""Acceptance: a planted API key and secret appear nowhere the pipeline writes.

The main job runs against a sandbox that accepts only the planted credentials, with S3
storage and an item that fails; then every output is scanned for the secret, the key and
the Basic-auth token made of them: logs (-v), the --json reports, the SQLite file (and
its WAL), the gallery page, every file in the working folder and every S3 object's
metadata. Exceptions the client raises (401, connection refused, a server echoing the
Authorization header) are checked too.
"""

from __future__ import annotations

import base64
import json
import secrets
import traceback
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.errors import PipelineError
from pipeline.sandbox import Sandbox, SandboxConfig
from pipeline.scenario import ScenarioClient
from pipeline.settings import Settings
from tests.acceptance.conftest import Cli, write_manifest
from tests.services import SeaweedFS, free_port

KEY = "pk_PLANTEDKEY_" + secrets.token_hex(8)
SECRET = "sk_PLANTEDSECRET_" + secrets.token_hex(12)

MANIFEST = """\
name: secret-scan
model: model_bfl-flux-2-dev
seed: 3
params: {numOutputs: 2, width: 64, height: 64}
output: "{manifest}/{item}/{index}.{ext}"
items:
  - id: sword
    prompt: "sword icon"
  - id: shield
    prompt: "shield icon"
  - id: doomed
    prompt: "cursed relic icon"
"""


def needles(key: str = KEY, secret: str = SECRET) -> dict[str, bytes]:
    token = base64.b64encode(f"{key}:{secret}".encode())
    return {
        "secret": secret.encode(),
        "key": key.encode(),
        "basic token": token,
        "basic token (unpadded)": token.rstrip(b"="),
        "secret (base64)": base64.b64encode(secret.encode()).rstrip(b"="),
    }


def assert_clean(where: str, data: bytes | str, key: str = KEY, secret: str = SECRET) -> None:
    blob = data.encode() if isinstance(data, str) else data
    for name, needle in needles(key, secret).items():
        assert needle not in blob, f"the {name} appears in {where}"


@pytest.fixture
def planted_sandbox() -> Iterator[Sandbox]:
    config = SandboxConfig(
        api_key=KEY, api_secret=SECRET, latency=0.3, seed=11, fail_prompts=["cursed"]
    )
    with Sandbox(config) as sb:
        yield sb


def test_the_planted_secret_is_nowhere_the_pipeline_writes(
    planted_sandbox: Sandbox, s3_server: SeaweedFS, s3_bucket: str, tmp_path: Path
) -> None:
    cli = Cli(
        cwd=tmp_path,
        env={
            "SCENARIO_API_URL": planted_sandbox.url,
            "SCENARIO_API_KEY": KEY,
            "SCENARIO_API_SECRET": SECRET,
            "PIPELINE_DATABASE_URL": f"sqlite:///{tmp_path / 'lineage.db'}",
            "PIPELINE_STORAGE_URL": f"s3://{s3_bucket}/outputs",
            "PIPELINE_POLL_INTERVAL": "0.1",
            "PIPELINE_SWEEP_TICK": "0.1",
            "PIPELINE_MAX_JOB_ATTEMPTS": "1",
            **s3_server.env,
        },
    )
    manifest = write_manifest(tmp_path, MANIFEST)
    outputs: list[tuple[str, str]] = []

    run = cli("run", str(manifest), "--wait", "-v")
    outputs.append(("run -v", run.stdout + run.stderr))
    assert run.code == 1, run.stderr  # the cursed item fails; the others are stored
    status = cli("status", "--json")
    outputs.append(("status --json", status.stdout + status.stderr))
    report = status.json()
    by_id = {item["id"]: item for item in report["items"]}
    assert by_id["doomed"]["status"] == "failed" and by_id["doomed"]["error"]
    assert by_id["sword"]["status"] == by_id["shield"]["status"] == "succeeded"

    retry = cli("retry", report["run_id"], "--wait", "--json", "-v")
    outputs.append(("retry --json -v", retry.stdout + retry.stderr))
    assert retry.code == 1 and retry.json()["run_id"] == report["run_id"]
    again = cli("run", str(manifest), "--wait", "--json", "-v")  # skips what is stored
    outputs.append(("second run --json -v", again.stdout + again.stderr))
    stored = by_id["sword"]["outputs"][0]
    lineage = cli("lineage", stored["uri"], "--json")
    outputs.append(("lineage --json", lineage.stdout + lineage.stderr))
    assert lineage.code == 0, lineage.stderr
    gallery = cli("gallery")
    outputs.append(("gallery", gallery.stdout + gallery.stderr))
    assert gallery.code == 0

    for where, text in outputs:
        assert_clean(where, text)

    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != manifest]
    assert any(p.name == "lineage.db" for p in written)
    assert len([p for p in written if p.suffix == ".html"]) >= 2  # run --wait + gallery
    for path in written:
        assert_clean(str(path), path.read_bytes())

    client = s3_server.client()
    keys = [
        obj["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
        for obj in page.get("Contents", [])
    ]
    assert len(keys) == 4  # two items, two outputs each
    for key in keys:
        head = client.head_object(Bucket=s3_bucket, Key=key)
        assert head["Metadata"], key  # lineage metadata is there, so it was really scanned
        assert_clean(f"s3://{s3_bucket}/{key} metadata", json.dumps(head, default=str))


def _exception_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


def test_client_exceptions_never_carry_the_credentials(planted_sandbox: Sandbox) -> None:
    wrong = "sk_WRONGSECRET_" + secrets.token_hex(8)
    with ScenarioClient(planted_sandbox.url, KEY, wrong, read_retry=None) as client:
        assert_clean("repr(client)", repr(client), KEY, wrong)
        with pytest.raises(PipelineError) as refused:
            client.get_job("job_123")
        assert refused.value.__class__.__name__ == "AuthError"
        assert_clean("a 401 error", _exception_text(refused.value), KEY, wrong)

    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    with ScenarioClient(nowhere, KEY, SECRET, read_retry=None, timeout=2) as client:
        with pytest.raises(PipelineError) as unreachable:
            client.get_job("job_123")
        assert_clean("a connection error", _exception_text(unreachable.value))


@pytest.mark.parametrize("status", [400, 401, 403, 500])
def test_a_server_echoing_the_credentials_cannot_leak_them_into_errors(status: int) -> None:
    def echo(request: httpx.Request) -> httpx.Response:
        header = request.headers["Authorization"]
        body = {
            "message": f"bad request with {header} ({KEY}:{SECRET})",
            "name": "EchoError",
            "hint": f"you sent {header.split()[-1]} and {SECRET}",
        }
        return httpx.Response(status, json=body)

    with ScenarioClient(
        "https://api.example.test/v1",
        KEY,
        SECRET,
        transport=httpx.MockTransport(echo),
        read_retry=None,
    ) as client:
        with pytest.raises(PipelineError) as caught:
            client.get_job("job_1")
        error = caught.value
        assert_clean(f"a {status} error", _exception_text(error) + str(getattr(error, "hint", "")))


def test_settings_never_show_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCENARIO_API_KEY", KEY)
    monkeypatch.setenv("SCENARIO_API_SECRET", SECRET)
    settings = Settings()
    assert_clean("repr(settings)", repr(settings) + str(settings))
    assert_clean("settings.model_dump_json()", settings.model_dump_json())
