"""The distributed path with real parts: Redis broker, `pipeline worker` processes,
PostgreSQL lineage and an S3 bucket (SeaweedFS), driven by the CLI against the sandbox."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from pipeline.sandbox import Sandbox, SandboxConfig
from tests.acceptance.conftest import Cli, write_manifest

MANIFEST = """\
name: distributed
model: model_bfl-flux-2-dev
seed: 5
params: {numOutputs: 2, width: 96, height: 96}
output: "{manifest}/{item}/{index}.{ext}"
items:
""" + "".join(f"  - id: icon-{n}\n    prompt: distributed icon {n}\n" for n in range(8))


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(SandboxConfig(latency=0.4, parallel_jobs=4, seed=21)) as sb:
        yield sb


@pytest.fixture
def env(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_url: str,
    postgres_database: str,
    s3_server: Any,
) -> dict[str, str]:
    bucket = f"dist-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    s3_server.make_bucket(bucket)
    return {
        **s3_server.env,
        "SCENARIO_API_URL": sandbox.url,
        "SCENARIO_API_KEY": "sandbox",
        "SCENARIO_API_SECRET": "sandbox",
        "PIPELINE_DATABASE_URL": postgres_database,
        "PIPELINE_BROKER_URL": redis_url,
        "PIPELINE_STORAGE_URL": f"s3://{bucket}/generated",
        "PIPELINE_PUBLIC_BASE_URL": "https://cdn.example.test/generated",
        "PIPELINE_PARALLEL_JOBS": "4",
        "PIPELINE_POLL_INTERVAL": "0.1",
        "PIPELINE_SWEEP_TICK": "0.1",
        "PIPELINE_LEASE_SECONDS": "10",
        "PIPELINE_HTTP_TIMEOUT": "3",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
    }


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    pipeline = Path(sys.executable).with_name("pipeline")
    return subprocess.Popen(
        [str(pipeline), "worker", "--concurrency=4"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_workers_on_redis_store_to_s3_with_lineage_in_postgres(
    env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    cli = Cli(cwd=tmp_path, env=env)
    upgraded = cli("db", "upgrade")
    assert upgraded.code == 0, upgraded.stderr
    workers = [start_worker(env, tmp_path / f"worker{n}.log") for n in range(2)]
    try:
        manifest = write_manifest(tmp_path, MANIFEST)
        queued = cli("run", str(manifest), "--json")
        assert queued.code == 0, queued.stderr  # returns at once: the workers do the work
        run_id = queued.json()["run_id"]
        doc = queued.json()
        deadline = time.monotonic() + 120
        while doc["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
            status = cli("status", run_id, "--json")
            assert status.code == 0, status.stderr
            doc = status.json()
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(20)
            except subprocess.TimeoutExpired:
                w.kill()
    assert doc["status"] == "succeeded", _logs(tmp_path)
    served = sandbox.stats()["images"]
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    bucket = env["PIPELINE_STORAGE_URL"].removeprefix("s3://").split("/")[0]
    for item in doc["items"]:
        assert len(item["outputs"]) == 2
        for out in item["outputs"]:
            key = out["uri"].removeprefix(f"s3://{bucket}/")
            obj = s3.get_object(Bucket=bucket, Key=key)
            body = obj["Body"].read()
            assert hashlib.sha256(body).hexdigest() == out["sha256"] == served[out["asset_id"]]
            assert obj["ContentType"] == "image/png"
            assert obj["Metadata"]["item-key"] == item["item_key"]
            assert obj["Metadata"]["job-id"] == item["jobs"][0]
            assert out["public_url"] == f"https://cdn.example.test/{key}"
    stats = sandbox.stats()
    assert stats["duplicate_submissions"] == 0
    assert stats["jobs_created"] == 8
    assert stats["responses_429"].get("parallel", 0) == 0

    lineage = cli("lineage", doc["items"][3]["outputs"][1]["uri"], "--json")
    assert lineage.code == 0, lineage.stderr
    match = lineage.json()["matches"][0]
    assert match["item"]["id"] == "icon-3" and match["job"]["id"] == doc["items"][3]["jobs"][0]


def _logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("worker*.log"))
