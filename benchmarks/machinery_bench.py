"""Pure machinery: how many images a second the distributed pipeline moves when jobs take
no time, nothing caps them and the images are small.

    python benchmarks/machinery_bench.py --items 1000 --workers 2 [--profile DIR] [--limits]

Redis (a server of its own), PostgreSQL (a fresh database on 127.0.0.1:5432), a SeaweedFS
S3 server and `--workers` `pipeline worker` processes (each also a sweeper; one is active),
as in the chaos test but with no fault. The sandbox runs in this process and answers at
once (`--latency`, 0.01 s by default), with no parallel-jobs cap and no rate limit.

Every cap a user would lift for such a run is lifted, the way a user would lift it:
`PIPELINE_REQUESTS_PER_SECOND` (10 by default) is raised to 5000, since the API's pacing is
not what is measured; `PIPELINE_PARALLEL_JOBS` is left unset, so the cap is what the plan
allows: read from `GET /teams/{teamId}/limits` (`--limits`, the sandbox then reports 1000)
or else learned from acceptances, starting at 4 (it passes 400 within 1000 items);
`PIPELINE_POLL_INTERVAL` is left unset (derived from the learned job duration) and each
worker runs `--concurrency` task threads (`PIPELINE_WORKER_CONCURRENCY`'s default, 8).

Prints images per second from the run's recording to its end (the run document's
`created_at` and `finished_at`); CPU seconds per image of each process (the workers, the
sandbox, i.e. this process, Redis, SeaweedFS and the database's live backends) and how busy
the whole machine was (on a shared machine, the rest is someone else's); API requests, SQL
transactions and task messages per image. With `--profile DIR` and `py-spy` on the PATH,
each worker is sampled while the run goes on (threads holding the GIL: CPU in Python) and
the samples are summed up: CPU by activity (sweeper, submit and collect tasks, Celery
itself), by library, and the hottest pipeline functions.

Measured on the 2-core development machine, shared with other jobs (it was 95-100% busy and
the run had about half of it): 1000 items, medians of 3, went from 8.9 images/s (about 100
ms of worker CPU and 36 SQL transactions per image) to 78 images/s (10-13 ms of worker CPU,
15-21 ms in all processes, 4 transactions per image); 5000 items ran at 83 images/s. Per
image the workers' CPU now goes mostly to boto3's PutObject (about a third), the POST, the
CDN download and the SQL of the batches. On the same machine idle (stop 15): a median of 114
images/s at 1000 items (91-125 over 3 runs), 132/s at 5000; 8 ms of worker CPU and 13 ms in
all processes per image, 2.7 transactions per image.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos.harness import Cluster
from tests.services import SeaweedFS, drop_postgres_database, make_postgres_database

TICKS = os.sysconf("SC_CLK_TCK")
ACTIVITIES = (
    ("sweeper", ("run (pipeline/stages.py", "sweep (pipeline/stages.py")),
    ("submit task", ("submit_nodes (pipeline/stages.py",)),
    ("collect task", ("collect_nodes (pipeline/stages.py",)),
)


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


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a live process has used (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy() -> tuple[float, float]:
    """CPU seconds the whole machine has spent busy and idle so far (from /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / TICKS, idle / TICKS


def database_figures(url: str) -> tuple[float, int, int]:
    """CPU seconds of the live backends serving `url`'s database, its commits, and the
    sessions (connections) opened on it so far."""
    import psycopg

    name = url.rsplit("/", 1)[-1]
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}") as conn:
        pids = [
            r[0]
            for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,))
        ]
        row = conn.execute(
            "SELECT xact_commit, sessions FROM pg_stat_database WHERE datname = %s", (name,)
        ).fetchone()
    commits, sessions = (int(row[0]), int(row[1])) if row else (0, 0)
    return sum(cpu_seconds(pid) for pid in pids), commits, sessions


def broker_messages(url: str) -> int:
    """Task messages sent through the broker so far (LPUSH to the queue)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0))
    finally:
        client.close()


def learned_caps(url: str) -> dict[str, str]:
    """The parallel-jobs caps in the database at the end (see pipeline/capacity.py)."""
    import psycopg

    name = url.rsplit("/", 1)[-1]
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}") as conn:
        rows = conn.execute("SELECT name, value FROM cursors WHERE name LIKE 'capacity:%'")
        return {str(n).rsplit(":", 1)[-1]: str(v) for n, v in rows}


def wait_ready(cluster: Cluster, timeout: float = 60.0) -> None:
    """Until every worker's Celery consumer answers a ping."""
    from celery import Celery

    app = Celery(broker=cluster.env["PIPELINE_BROKER_URL"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(app.control.ping(timeout=1.0)) >= len(cluster.workers):
            return
    raise RuntimeError(f"workers not ready:\n{cluster.worker_logs()}")


def start_profilers(cluster: Cluster, folder: Path) -> list[subprocess.Popen[bytes]]:
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy is not on the PATH: no profile (pip install py-spy)", file=sys.stderr)
        return []
    folder.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(w.pid),
                "--rate",
                "200",
                "--gil",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(folder / f"worker-{n}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for n, w in enumerate(cluster.workers)
    ]


def summarize_profile(folder: Path, top: int = 25) -> str:
    """CPU by activity, by library (where the leaf frame is) and the hottest pipeline
    functions (inclusive), from py-spy's collapsed stacks of every worker."""
    activity: Counter[str] = Counter()
    library: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for path in sorted(folder.glob("worker-*.txt")):
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            name = next((a for a, marks in ACTIVITIES if any(m in stack for m in marks)), None)
            activity[name or "celery, kombu and the rest"] += n
            where = stack.rsplit("(", 1)[-1]  # the leaf frame's file: "sqlalchemy/orm/x.py:12)"
            library[where.split("/")[0] if "/" in where else where.split(".py")[0]] += n
            for func in {f.rsplit(":", 1)[0] + ")" for f in stack.split(";") if "(pipeline/" in f}:
                inclusive[func] += n
    total = sum(activity.values())
    if not total:
        return "profile: no samples"
    lines = [f"profile: {total} samples of the workers' threads holding the GIL (CPU in Python)"]
    for title, counter, k in (
        ("by activity", activity, 10),
        ("by library (leaf frame)", library, 12),
        ("pipeline functions, inclusive", inclusive, top),
    ):
        lines.append(f"  {title}:")
        lines += [f"    {100 * n / total:5.1f}%  {what}" for what, n in counter.most_common(k)]
    return "\n".join(lines)


def run_status(database: str, run_id: str) -> str:
    import psycopg

    name = database.rsplit("/", 1)[-1]
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}") as conn:
        row = conn.execute("SELECT status FROM runs WHERE id = %s", (run_id,)).fetchone()
    return str(row[0]) if row else "missing"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8, help="task threads per worker")
    parser.add_argument("--latency", type=float, default=0.01)
    parser.add_argument(
        "--limits", action="store_true", help="the key may read its plan's limits (else learned)"
    )
    parser.add_argument("--profile", type=Path, help="py-spy every worker; samples go here")
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
            parallel=1,
            faults={},
        )
        # The harness's chaos settings, back to what a user has: defaults, caps lifted.
        for name in (
            "PIPELINE_PARALLEL_JOBS",
            "PIPELINE_POLL_INTERVAL",
            "PIPELINE_SWEEP_TICK",
            "PIPELINE_LEASE_SECONDS",
            "PIPELINE_HTTP_TIMEOUT",
            "PIPELINE_MAX_JOB_ATTEMPTS",
        ):
            cluster.env.pop(name, None)
        cluster.env["PIPELINE_REQUESTS_PER_SECOND"] = "5000"
        cluster.sandbox.configure(
            rate_limit=None,
            rate_burst=None,
            parallel_jobs=None,
            latency_spread=0.0,
            page_cut_every=None,
            limits_access=args.limits,
        )
        profilers: list[subprocess.Popen[bytes]] = []
        try:
            assert cluster.cli("db", "upgrade").returncode == 0
            for _ in range(args.workers):
                cluster.start_worker(args.concurrency)
            wait_ready(cluster)
            (folder / "m.yaml").write_text(manifest(args.items))
            if args.profile:
                profilers = start_profilers(cluster, args.profile)
            others = {
                "redis": cluster.redis.proc.pid if cluster.redis.proc else None,
                "seaweedfs": s3.pid,
            }
            cpu0 = {w.pid: cpu_seconds(w.pid) for w in cluster.workers}
            others0 = {k: cpu_seconds(p) for k, p in others.items()}
            db_cpu0, commits0, sessions0 = database_figures(database)
            messages0 = broker_messages(cluster.redis.url)
            sandbox0 = time.process_time()
            busy0, idle0 = machine_busy()
            started = time.monotonic()
            done = cluster.cli("run", "m.yaml", "--json", timeout=600)
            if done.returncode != 0:
                print(done.stderr)
                return 1
            run_id = json.loads(done.stdout)["run_id"]
            while run_status(database, run_id) == "running" and time.monotonic() - started < 1800:
                time.sleep(0.2)
            sandbox_cpu = time.process_time() - sandbox0
            busy1, idle1 = machine_busy()
            cpu = {w.pid: cpu_seconds(w.pid) - cpu0[w.pid] for w in cluster.workers}
            other_cpu = {k: cpu_seconds(p) - others0[k] for k, p in others.items()}
            db_cpu, commits, sessions = database_figures(database)
            messages = broker_messages(cluster.redis.url) - messages0
            caps = learned_caps(database)
            for spy in profilers:
                spy.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
            for spy in profilers:
                spy.wait(30)
            doc = cluster.status(run_id)
            stats = cluster.sandbox.stats()
        finally:
            for spy in profilers:
                if spy.poll() is None:
                    spy.kill()
            cluster.stop()
            s3.close()
            drop_postgres_database(database)
    seconds = (
        datetime.fromisoformat(doc["finished_at"]) - datetime.fromisoformat(doc["created_at"])
    ).total_seconds()
    stored = sum(len(i["outputs"]) for i in doc["items"])
    per = max(1, stored)
    requests = stats["requests"]
    print(
        f"{args.items} items, {args.workers} workers x {args.concurrency} threads: "
        f"{doc['status']}, {stored} images stored in {seconds:.1f} s = "
        f"{stored / seconds:.1f} images/s; {stats['duplicate_submissions']} duplicate submissions"
    )
    cpu_line = ", ".join(f"worker {n} {c * 1000 / per:.1f}" for n, c in enumerate(cpu.values()))
    print(
        f"CPU ms per image: {cpu_line}, sandbox {sandbox_cpu * 1000 / per:.1f}, "
        f"redis {other_cpu['redis'] * 1000 / per:.1f}, "
        f"seaweedfs {other_cpu['seaweedfs'] * 1000 / per:.1f}, "
        f"postgres backends {(db_cpu - db_cpu0) * 1000 / per:.1f} "
        f"(workers' total {sum(cpu.values()):.1f} s over {seconds:.1f} s)"
    )
    ours = sum(cpu.values()) + sandbox_cpu + sum(other_cpu.values()) + db_cpu - db_cpu0
    busy, idle = busy1 - busy0, idle1 - idle0
    print(
        f"machine: {100 * busy / (busy + idle):.0f}% busy while the run went on, "
        f"{100 * ours / (busy + idle):.0f}% of it in the processes above "
        f"({ours * 1000 / per:.1f} ms CPU per image in all)"
    )
    print(
        f"per image: {sum(requests.values()) / per:.2f} API requests (CDN downloads "
        f"included), {(commits - commits0) / per:.1f} SQL transactions, "
        f"{messages / per:.2f} task messages; {sessions - sessions0} database connections "
        "opened"
    )
    print("  parallel-jobs caps at the end: " + (", ".join(f"{k} {v}" for k, v in caps.items())))
    print("  requests: " + ", ".join(f"{k} {v}" for k, v in sorted(requests.items())))
    if profilers and args.profile:
        print(summarize_profile(args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
