"""The request governor: the in-process bucket, and the fleet-wide one on a real Redis."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from pipeline import governor as governor_module
from pipeline.errors import TransientError
from pipeline.governor import (
    DEFAULT_PAUSE,
    LocalGovernor,
    NullGovernor,
    RedisGovernor,
    make_governor,
)
from tests.services import free_port, require_service

NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of its own for each test, deleted afterwards."""
    import redis

    name = f"test:governor:{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{name}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def assert_bucket_respected(stamps: list[float], rate: float, burst: int) -> None:
    """No window of acquisitions holds more than the burst plus what the rate refilled."""
    stamps = sorted(stamps)
    for i, j in itertools.combinations(range(len(stamps)), 2):
        allowed = burst + rate * (stamps[j] - stamps[i]) + 1.5  # slack for clock reads
        assert j - i + 1 <= allowed, f"{j - i + 1} acquisitions in {stamps[j] - stamps[i]:.3f}s"


# ---------------------------------------------------------------- LocalGovernor


class FakeClock:
    """A monotonic clock that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def local(rate: float, burst: int) -> tuple[LocalGovernor, FakeClock]:
    clock = FakeClock()
    return LocalGovernor(rate, burst, clock=clock, sleep=clock.sleep), clock


@pytest.mark.parametrize(("rate", "burst", "count"), [(10.0, 5, 25), (2.0, 1, 9), (100.0, 20, 20)])
def test_local_rate_over_many_acquires(rate: float, burst: int, count: int) -> None:
    governor, clock = local(rate, burst)
    start = clock.now
    for _ in range(count):
        governor.acquire()
    assert clock.now - start == pytest.approx(max(0, count - burst) / rate)


def test_local_penalize_pauses_then_slows_then_recovers() -> None:
    governor, clock = local(10.0, 5)
    governor.penalize(3.0)
    start = clock.now
    governor.acquire()
    # The pause, then one token at the halved rate: the bucket was emptied.
    assert clock.now - start == pytest.approx(3.0 + 1 / 5.0, rel=0.05)
    assert governor.current_rate() < 10.0
    clock.now += 30.0  # additive recovery: back to the configured rate
    assert governor.current_rate() == 10.0


def test_local_penalize_without_retry_after_uses_the_default_pause() -> None:
    governor, clock = local(1000.0, 1)
    governor.penalize(None)
    start = clock.now
    governor.acquire()
    assert clock.now - start == pytest.approx(DEFAULT_PAUSE, abs=0.01)


def test_local_penalties_of_one_burst_halve_the_rate_once() -> None:
    governor, _ = local(8.0, 1)
    for _ in range(5):
        governor.penalize(1.0)
    assert governor.current_rate() == pytest.approx(4.0)


def test_local_acquire_times_out_with_a_transient_error() -> None:
    governor, clock = local(10.0, 1)
    governor.penalize(30.0)
    with pytest.raises(TransientError) as caught:
        governor.acquire(timeout=1.0)
    assert caught.value.retry_after == pytest.approx(30.0)
    assert clock.slept == []  # gave up at once instead of sleeping past the deadline


def test_local_governor_is_thread_safe_in_real_time() -> None:
    rate, burst, per_thread = 40.0, 2, 6
    governor = LocalGovernor(rate, burst)
    stamps: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(per_thread):
            governor.acquire()
            with lock:
                stamps.append(time.monotonic())

    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    assert len(stamps) == 24
    assert (24 - burst) / rate * 0.9 <= elapsed < 3.0
    assert_bucket_respected(stamps, rate, burst)


def test_null_governor_never_waits() -> None:
    governor = NullGovernor()
    for _ in range(1000):
        governor.acquire(timeout=0)
    governor.penalize(5.0)
    assert (governor.acquired, governor.penalties) == (1000, [5.0])


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        (None, LocalGovernor),
        ("", LocalGovernor),
        ("memory://", LocalGovernor),
        ("redis://127.0.0.1:6379/0", RedisGovernor),
    ],
)
def test_make_governor_picks_by_url(url: str | None, kind: type) -> None:
    assert type(make_governor(url, 5.0, 2)) is kind


def test_redis_governor_repr_hides_the_url_password() -> None:
    governor = RedisGovernor("redis://:hunter2@127.0.0.1:6379/0", 5.0, 2)
    assert "hunter2" not in repr(governor)


# ---------------------------------------------------------------- RedisGovernor


def _acquire_many(
    url: str, key_prefix: str, rate: float, burst: int, count: int, out: object
) -> None:
    """Child-process body: acquire `count` tokens and report when each was granted."""
    governor = RedisGovernor(url, rate, burst, key_prefix=key_prefix)
    stamps = []
    for _ in range(count):
        governor.acquire(timeout=30)
        stamps.append(time.time())
    out.put(stamps)  # type: ignore[attr-defined]


def test_two_workers_share_one_bucket(redis_url: str, prefix: str) -> None:
    rate, burst, per_worker = 40.0, 4, 20
    workers = [RedisGovernor(redis_url, rate, burst, key_prefix=prefix) for _ in range(2)]
    stamps: list[float] = []
    lock = threading.Lock()

    def run(governor: RedisGovernor) -> None:
        for _ in range(per_worker):
            governor.acquire(timeout=30)
            with lock:
                stamps.append(time.time())

    start = time.time()
    threads = [threading.Thread(target=run, args=(g,)) for g in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.time() - start
    # One shared bucket: 40 tokens at 40/s after a burst of 4 take ~0.9 s, not ~0.4 s.
    assert (2 * per_worker - burst) / rate * 0.85 <= elapsed < 5.0
    assert_bucket_respected(stamps, rate, burst)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_two_processes_share_one_bucket(redis_url: str, prefix: str) -> None:
    rate, burst, per_process = 30.0, 3, 12
    # The parent connects first: children must rebuild their connection after the fork.
    parent = RedisGovernor(redis_url, rate, burst, key_prefix=prefix)
    parent.acquire()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    args = (redis_url, prefix, rate, burst, per_process, queue)
    children = [context.Process(target=_acquire_many, args=args) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=30) for _ in children]
    for child in children:
        child.join(timeout=10)
        assert child.exitcode == 0
    stamps = [s for result in results for s in result]
    assert len(stamps) == 2 * per_process
    # The parent's token came out of the same bucket.
    assert_bucket_respected(stamps, rate, burst - 1)
    assert max(stamps) - min(stamps) >= (2 * per_process - burst) / rate * 0.85


def test_penalize_from_one_worker_pauses_the_other(redis_url: str, prefix: str) -> None:
    first = RedisGovernor(redis_url, 100.0, 10, key_prefix=prefix)
    second = RedisGovernor(redis_url, 100.0, 10, key_prefix=prefix)
    second.acquire()
    first.penalize(0.6)
    start = time.monotonic()
    second.acquire(timeout=5)
    assert time.monotonic() - start >= 0.5
    first.penalize(5.0)
    with pytest.raises(TransientError):
        second.acquire(timeout=0.5)


def test_penalize_empties_the_shared_burst(redis_url: str, prefix: str) -> None:
    rate, burst = 20.0, 10
    first = RedisGovernor(redis_url, rate, burst, key_prefix=prefix)
    second = RedisGovernor(redis_url, rate, burst, key_prefix=prefix)
    first.penalize(0.2)
    start = time.monotonic()
    for _ in range(4):
        second.acquire(timeout=5)
    # Without the penalty these 4 would come from the full burst at once; now they trickle
    # in after the pause at the halved rate.
    assert time.monotonic() - start >= 0.2 + 3 / (rate / 2) * 0.9


def test_unreachable_redis_degrades_to_a_local_limit(caplog: pytest.LogCaptureFixture) -> None:
    governor = RedisGovernor(f"redis://127.0.0.1:{free_port()}/0", 20.0, 2)
    caplog.set_level(logging.WARNING, logger="pipeline.governor")
    start = time.monotonic()
    for _ in range(8):
        governor.acquire(timeout=5)
    governor.penalize(0.1)
    governor.acquire(timeout=5)
    elapsed = time.monotonic() - start
    assert elapsed >= (8 - 2) / 20.0 * 0.9  # still limited, locally
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Redis unreachable" in warnings[0].getMessage()


class PrivateRedis:
    """A throwaway redis-server of our own, so a test can stop and restart it."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", *NO_PERSISTENCE],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=5)
        self.process = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        require_service("redis-server", "binary not installed")
    server = PrivateRedis(binary or "")
    server.start()
    yield server
    server.stop()


def test_redis_restart_mid_run_is_survived(
    private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    monkeypatch.setattr(governor_module, "REDIS_RETRY_INTERVAL", 0.05)
    governor = RedisGovernor(private_redis.url, 200.0, 5, key_prefix="restart")
    governor.acquire(timeout=2)  # scripts now cached by the first server

    private_redis.stop()
    for _ in range(3):
        governor.acquire(timeout=2)  # no crash: the local fallback answers
    governor.penalize(0.05)

    private_redis.start()
    time.sleep(0.1)  # past REDIS_RETRY_INTERVAL: the next call tries Redis again
    # The fresh server has no scripts cached: they must be loaded again transparently.
    governor.acquire(timeout=2)
    probe = redis.Redis.from_url(private_redis.url)
    assert probe.exists("restart:bucket") == 1
    probe.close()
