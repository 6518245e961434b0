"""Pure machinery: how many images a second the distributed pipeline moves when jobs take
no time, nothing caps them and the images are small.

    python benchmarks/machinery_bench.py --items 1000 --workers 2

Redis (a server of its own), PostgreSQL (a fresh database on 127.0.0.1:5432), a SeaweedFS
S3 server and `--workers` `pipeline worker` processes, as in the chaos test but with no
fault; the sandbox answers at once (`--latency`, 0.01 s by default) with no parallel-jobs
cap. The API request rate is lifted (`PIPELINE_REQUESTS_PER_SECOND`): this measures the
pipeline's own cost per image (SQL, broker, HTTP, S3), not the API's pacing. Prints images
per second from the run's recording to its end, and where the CPU went.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos.harness import Cluster
from tests.services import SeaweedFS, drop_postgres_database, make_postgres_database


def manifest(items: int) -> str:
    lines = [
        "name: machinery",
        "model: model_bfl-flux-2-dev",
        "seed: 3",
        "params: {width: 64, height: 64}",
        "items:",
    ]
    for n in range(items):
        lines += [f"  - id: m-{n:06d}", f'    prompt: "machinery icon {n}"']
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.01)
    args = parser.parse_args()
    database = make_postgres_database()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        s3 = SeaweedFS(folder / "s3")
        s3.start()
        bucket = f"machinery-{int(time.time())}"
        s3.make_bucket(bucket)
        cluster = Cluster.create(
            folder,
            database_url=database,
            s3_env=s3.env,
            bucket=bucket,
            latency=args.latency,
            parallel=100_000,
            faults={},
        )
        for name in ("PIPELINE_PARALLEL_JOBS", "PIPELINE_POLL_INTERVAL", "PIPELINE_SWEEP_TICK"):
            cluster.env.pop(name, None)
        cluster.env["PIPELINE_REQUESTS_PER_SECOND"] = "5000"
        cluster.sandbox.configure(rate_limit=None, latency_spread=0.0)
        try:
            assert cluster.cli("db", "upgrade").returncode == 0
            for _ in range(args.workers):
                cluster.start_worker()
            (folder / "m.yaml").write_text(manifest(args.items))
            started = time.monotonic()
            done = cluster.cli("run", "m.yaml", "--json", timeout=600)
            if done.returncode != 0:
                print(done.stderr)
                return 1
            run_id = json.loads(done.stdout)["run_id"]
            doc = cluster.status(run_id)
            while doc["status"] == "running" and time.monotonic() - started < 1200:
                time.sleep(0.5)
                doc = cluster.status(run_id)
            seconds = (
                datetime.fromisoformat(doc["finished_at"])
                - datetime.fromisoformat(doc["created_at"])
            ).total_seconds()
            stored = sum(len(i["outputs"]) for i in doc["items"])
            stats = cluster.sandbox.stats()
        finally:
            cluster.stop()
            s3.close()
            drop_postgres_database(database)
    print(
        f"{args.items} items, {args.workers} workers: {doc['status']}, {stored} images stored in "
        f"{seconds:.1f} s = {stored / seconds:.1f} images/s; "
        f"{sum(stats['requests'].values()) / max(1, stored):.2f} API requests per image "
        f"(CDN downloads included), {stats['duplicate_submissions']} duplicate submissions"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
