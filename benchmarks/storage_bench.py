"""Throughput of Storage.put against a local folder and a throwaway SeaweedFS S3 server.

    python benchmarks/storage_bench.py [--objects 200] [--size-kb 1500] [--threads 8]

Reports objects/s and MB/s for first writes and for idempotent re-puts (the cost of a
repeated collect), plus how long SeaweedFS took to start.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.storage import Storage, open_storage
from tests.services import run_seaweedfs


def chunks(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    """The body as a download would deliver it."""
    return [data[i : i + size] for i in range(0, len(data), size)]


def timed(label: str, count: int, size: int, threads: int, work: Callable[[int], object]) -> None:
    """Run work(i) for i in range(count) on a thread pool and print the rates."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(count)))
    elapsed = time.perf_counter() - started
    print(
        f"{label:<28} {count / elapsed:8.1f} obj/s {count * size / elapsed / 1e6:8.1f} MB/s"
        f"  ({elapsed:.2f} s)"
    )


def bench(name: str, storage: Storage, bodies: list[bytes], threads: int) -> None:
    """First writes, then the same writes again (idempotent no-ops)."""
    storage.check()
    size = len(bodies[0])

    def put(index: int) -> object:
        body = bodies[index]
        return storage.put(
            f"bench/{index}.png",
            chunks(body),
            content_type="image/png",
            metadata={"item_key": f"ik{index}", "prompt": "benchmark"},
            expected_sha256=hashlib.sha256(body).hexdigest(),
        )

    timed(f"{name}: put", len(bodies), size, threads, put)
    timed(f"{name}: repeated put", len(bodies), size, threads, put)


def main() -> None:
    """Parse arguments and run both backends."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=200)
    parser.add_argument("--size-kb", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    bodies = [os.urandom(args.size_kb * 1024) for _ in range(args.objects)]
    with tempfile.TemporaryDirectory(prefix="storage-bench-") as tmp:
        bench("local", open_storage(f"file://{tmp}/local"), bodies, args.threads)
        with run_seaweedfs(Path(tmp) / "seaweedfs") as server:
            print(f"SeaweedFS started in {server.startup_seconds:.2f} s")
            bucket = server.make_bucket("bench")
            storage = open_storage(f"s3://{bucket}/run", **server.storage_options())
            bench("seaweedfs s3", storage, bodies, args.threads)


if __name__ == "__main__":
    main()
