"""A soak run by hand: thousands of items through the chaos cluster, with every fault on.

    python benchmarks/soak.py --items 2000 --workers 3 --kill-every 20

Starts its own Redis server, SeaweedFS (S3) and sandbox, uses a fresh PostgreSQL database
on 127.0.0.1:5432, runs `pipeline worker` processes, SIGKILLs a worker every
--kill-every seconds (starting a replacement) and restarts Redis every --redis-every
seconds. At the end it audits the bucket against the lineage database and the sandbox,
and prints the faults injected, retries, duplicate submissions (must be 0) and time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos.harness import Cluster, audit, manifest_text
from tests.services import drop_postgres_database, make_postgres_database, run_seaweedfs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--kill-every", type=float, default=20.0)
    parser.add_argument("--redis-every", type=float, default=45.0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, run_seaweedfs(Path(tmp) / "s3") as s3:
        folder = Path(tmp) / "run"
        folder.mkdir()
        database = make_postgres_database("pipeline_soak")
        bucket = s3.make_bucket("soak")
        cluster = Cluster.create(
            folder,
            database_url=database,
            s3_env=s3.env,
            bucket=bucket,
            latency=args.latency,
            parallel=args.parallel,
        )
        try:
            if cluster.cli("db", "upgrade").returncode != 0:
                raise SystemExit("db upgrade failed")
            for _ in range(args.workers):
                cluster.start_worker()
            (folder / "soak.yaml").write_text(manifest_text(args.items))
            queued = cluster.cli("run", "soak.yaml", "--json", timeout=600)
            if queued.returncode != 0:
                raise SystemExit(queued.stderr)
            run_id = json.loads(queued.stdout)["run_id"]
            print(f"run {run_id}: {args.items + 1} items", flush=True)
            next_kill = time.monotonic() + args.kill_every
            next_redis = time.monotonic() + args.redis_every
            victim = 0
            reported: set[int] = set()
            deadline = time.monotonic() + args.timeout
            doc = cluster.status(run_id)
            while doc["status"] == "running" and time.monotonic() < deadline:
                time.sleep(2.0)
                now = time.monotonic()
                for n, worker in enumerate(cluster.workers):
                    if worker.poll() is not None and n not in reported:
                        reported.add(n)
                        cluster.log(f"worker {n} exited by itself ({worker.returncode})")
                        print(cluster.worker_logs()[-3000:], flush=True)
                        cluster.start_worker()
                if now >= next_kill:
                    alive = [n for n, w in enumerate(cluster.workers) if w.poll() is None]
                    chosen = alive[victim % len(alive)]
                    reported.add(chosen)  # killed by us, not "exited by itself"
                    cluster.kill_worker(chosen)
                    cluster.start_worker()
                    victim += 1
                    next_kill = now + args.kill_every
                if now >= next_redis:
                    cluster.restart_redis()
                    next_redis = now + args.redis_every
                doc = cluster.status(run_id)
                c = doc["counts"]
                print(
                    f"{now - started:7.1f}s  succeeded {c['succeeded']}  failed {c['failed']}"
                    f"  pending {c['pending']}",
                    flush=True,
                )
            figures = audit(cluster, doc)
        finally:
            cluster.stop()
            drop_postgres_database(database)
    figures["seconds"] = round(time.monotonic() - started, 1)
    figures["status"] = doc["status"]
    print("\n".join(cluster.events))
    for item in doc["items"]:
        if item["status"] != "succeeded":
            print(
                f"{item['id']}: {item['status']} after {item['attempts']} attempts: {item['error']}"
            )
    print(json.dumps(figures, indent=1))
    ok = figures["duplicate_submissions"] == 0 and figures["succeeded"] == args.items

    print("OK" if ok else "PROBLEM: duplicates or lost items")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
