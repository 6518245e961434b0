"""A real cluster for chaos runs: its own Redis server, `pipeline worker` processes,
PostgreSQL, an S3 bucket and a faulty sandbox. Used by the chaos test and the soak script.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from pipeline.sandbox import Sandbox, SandboxConfig

PIPELINE = Path(sys.executable).with_name("pipeline")

FAULTS = {
    "failure_rate": 0.08,  # generations that fail and succeed on a second try
    "fault_5xx_rate": 0.05,
    "fault_drop_rate": 0.05,
    "fault_expired_rate": 0.08,
    "fault_slow_rate": 0.04,
    "slow_seconds": 0.6,
    "fault_truncate_rate": 0.05,
    # Each kind fires on exactly its share of the requests it applies to, so a run of 40
    # items certainly meets every kind (at random, both download faults missed about 1
    # run in 30: a run makes only about 40 downloads).
    "fault_spacing": "even",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def manifest_text(items: int, doomed: str | None = "doomed", recipe: bool = True) -> str:
    """A chaos batch; with `recipe`, each image goes through a background removal too."""
    lines = [
        "name: chaos",
        "model: model_chaos-image",
        "seed: 9",
        "params: {numOutputs: 1, width: 64, height: 64}",
        'output: "{manifest}/{item}/{index}.{ext}"',
    ]
    if recipe:
        lines += ["steps:", "  - model: model_photoroom-background-removal"]
    lines.append("items:")
    for n in range(items):
        lines += [f"  - id: item-{n:05d}", f'    prompt: "chaos icon {n}"']
    if doomed:
        lines += [f"  - id: {doomed}", f'    prompt: "{doomed} icon that always fails"']
    return "\n".join(lines) + "\n"


class RedisServer:
    """A redis-server of our own on a free port, without persistence (a restart loses all)."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@dataclass
class Cluster:
    """Everything a chaos run needs; `env` is what every pipeline process gets."""

    folder: Path
    sandbox: Sandbox
    redis: RedisServer
    env: dict[str, str]
    bucket: str
    s3: Any
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def create(
        cls,
        folder: Path,
        *,
        database_url: str,
        s3_env: dict[str, str],
        bucket: str,
        latency: float = 0.5,
        parallel: int = 6,
        faults: dict[str, Any] | None = None,
        doomed: str = "doomed",
    ) -> Cluster:
        config = SandboxConfig(
            latency=latency,
            latency_spread=latency / 2,
            parallel_jobs=parallel,
            rate_limit=80.0,
            rate_burst=40,
            fail_prompts=[doomed],
            seed=20261122,
            **(faults if faults is not None else FAULTS),
        )
        sandbox = Sandbox(config).start()
        redis = RedisServer(folder)
        redis.start()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(folder),
            **s3_env,
            "SCENARIO_API_URL": sandbox.url,
            "SCENARIO_API_KEY": "sandbox",
            "SCENARIO_API_SECRET": "sandbox",
            "PIPELINE_DATABASE_URL": database_url,
            "PIPELINE_BROKER_URL": redis.url,
            "PIPELINE_STORAGE_URL": f"s3://{bucket}/chaos",
            "PIPELINE_PARALLEL_JOBS": str(parallel),
            "PIPELINE_REQUESTS_PER_SECOND": "60",
            "PIPELINE_MAX_JOB_ATTEMPTS": "4",
            "PIPELINE_POLL_INTERVAL": "0.2",
            "PIPELINE_SWEEP_TICK": "0.2",
            "PIPELINE_LEASE_SECONDS": "8",
            "PIPELINE_HTTP_TIMEOUT": "2.5",
        }
        s3 = boto3.client(
            "s3",
            endpoint_url=s3_env["AWS_ENDPOINT_URL"],
            aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"],
            region_name=s3_env.get("AWS_DEFAULT_REGION", "us-east-1"),
        )
        return cls(folder, sandbox, redis, env, bucket, s3)

    def log(self, event: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:6.1f}s {event}")

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(PIPELINE), *args],
            env=self.env,
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start_worker(self, concurrency: int = 4) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        proc = subprocess.Popen(
            [str(PIPELINE), "worker", f"--concurrency={concurrency}"],
            env=self.env,
            cwd=self.folder,
            stdout=(self.folder / f"worker-{n}.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        self.log(f"started worker {n} (pid {proc.pid})")
        return proc

    def kill_worker(self, n: int) -> None:
        proc = self.workers[n]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            self.log(f"SIGKILLed worker {n}")

    def stop_worker(self, n: int, timeout: float = 60.0) -> int:
        """SIGTERM a worker (a redeploy) and wait for it; returns its exit code."""
        proc = self.workers[n]
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout)
        self.log(f"SIGTERMed worker {n}: exited {code}")
        return code

    def restart_redis(self, down_for: float = 1.5) -> None:
        self.redis.kill()
        self.log("killed redis (no persistence: every queued message is lost)")
        time.sleep(down_for)
        self.redis.start()
        self.log("restarted redis")

    def status(self, run_id: str) -> dict[str, Any]:
        done = self.cli("status", run_id, "--json")
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        return dict(json.loads(done.stdout))

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.redis.kill()
        self.sandbox.stop()

    def bucket_objects(self) -> dict[str, str]:
        """Every object in the bucket: key -> sha256 of its bytes."""
        found: dict[str, str] = {}
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket):
            for entry in page.get("Contents", []):
                body = self.s3.get_object(Bucket=self.bucket, Key=entry["Key"])["Body"].read()
                found[entry["Key"]] = hashlib.sha256(body).hexdigest()
        return found

    def worker_logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-2000:] for p in sorted(self.folder.glob("worker-*.log"))
        )


def audit(cluster: Cluster, doc: dict[str, Any]) -> dict[str, Any]:
    """Check a finished chaos run; returns figures (raises AssertionError on a problem)."""
    stats = cluster.sandbox.stats()
    served: dict[str, str] = stats["images"]
    outputs = {
        o["uri"].removeprefix(f"s3://{cluster.bucket}/"): o
        for item in doc["items"]
        for o in item["outputs"]
    }
    in_bucket = cluster.bucket_objects()
    assert set(in_bucket) == set(outputs), (
        f"orphans: {sorted(set(in_bucket) - set(outputs))[:5]}, "
        f"missing: {sorted(set(outputs) - set(in_bucket))[:5]}"
    )
    for key, out in outputs.items():
        assert in_bucket[key] == out["sha256"] == served[out["asset_id"]], key
    return {
        "items": doc["counts"]["total"],
        "succeeded": doc["counts"]["succeeded"],
        "failed": doc["counts"]["failed"],
        "objects": len(in_bucket),
        "duplicate_submissions": stats["duplicate_submissions"],
        "jobs_created": stats["jobs_created"],
        "jobs_by_model": stats["jobs_by_model"],
        "jobs": stats["jobs"],
        "faults": stats["faults"],
        "responses_429": stats["responses_429"],
        "retries": stats["jobs_created"] - sum(i["nodes"] for i in doc["items"]),
        "requests": sum(stats["requests"].values()),
    }
