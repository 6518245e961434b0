"""How long `pipeline run big.yaml --sandbox` takes until its run is recorded and work begins.

    python benchmarks/record_bench.py --items 100000
    python benchmarks/record_bench.py --items 100000 --postgres
    python benchmarks/record_bench.py --items 20000 --profile /tmp/record.prof
    python benchmarks/record_bench.py --items 1000 --process 60

It writes an N-item manifest and runs the real command, `pipeline run FILE --sandbox`
(embedded: sandbox, worker and sweeper in this process), on a fresh SQLite file, or with
`--postgres` on a fresh PostgreSQL database (tests/services.py; upgraded beforehand by
`pipeline db upgrade`, which is not timed, and dropped afterwards). The
figure is what a user waits for: from importing the CLI to the sweeper handing the first
node to a task; the command is stopped there. Each phase is timed by wrapping the function
the CLI calls for it, in wall and CPU seconds (CPU: every thread of the process), with the
process's peak memory (ru_maxrss). `--no-online-check` is passed on to the command.

`--process SECONDS` lets the command go on that long after the first dispatch and samples
the process's memory (RSS) while the worker and sweeper process items: run it at 1,000 and
at 100,000 items to see whether what they hold grows with the manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIRST_DISPATCH_TIMEOUT = 600.0


class _Stopped(BaseException):
    """Ends the command once the figure is taken (not an Exception: the CLI maps those)."""


class Clock:
    """Wall and CPU seconds of each phase, in the order they ended."""

    def __init__(self) -> None:
        self.phases: list[tuple[float, str, float, float]] = []  # (start, label, wall, cpu)
        self.first_dispatch = threading.Event()
        self.dispatched_at: tuple[float, float] | None = None
        self.recorded_at: tuple[float, float] | None = None  # when start_runs returned

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def add(self, label: str, start: tuple[float, float], end: tuple[float, float]) -> None:
        self.phases.append((start[0], label, end[0] - start[0], end[1] - start[1]))

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.add(label, start, self.now())

    def wrap(self, owner: Any, name: str, label: str) -> None:
        """Time every call of owner.name as the phase `label`."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(label):
                result = original(*args, **kwargs)
            if name == "start_runs":
                self.recorded_at = self.now()
            return result

        setattr(owner, name, timed)

    def watch_dispatch(self, owner: Any) -> None:
        """Note the moment the sweeper first hands a node to a task."""
        original = owner.submit

        def submit(dispatcher: Any, node_id: int) -> None:
            original(dispatcher, node_id)
            if not self.first_dispatch.is_set():
                self.dispatched_at = self.now()
                self.first_dispatch.set()

        owner.submit = submit


def write_manifest(path: Path, items: int) -> None:
    lines = [
        "name: record-bench",
        "model: model_bfl-flux-2-dev",
        "seed: 1",
        "params: {width: 256, height: 256}",
        "items:",
    ]
    for n in range(items):
        lines += [f"  - id: icon-{n:06d}", f'    prompt: "inventory icon number {n}"']
    path.write_text("\n".join(lines) + "\n")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def instrument(clock: Clock, process: float, samples: list[tuple[float, float, str]]) -> None:
    """Wrap what `pipeline run` calls, and stop it after the first dispatch (+ `process`)."""
    from pipeline import batch, cli, executor, repository, runtime

    clock.wrap(batch, "load_manifests", "load + validate")
    clock.wrap(executor.Executor, "__enter__", "open services (db, sandbox, checks)")
    clock.wrap(cli, "_before_paying", "online check (+ budget plan)")
    clock.wrap(batch, "start_runs", "check keys, record the run (start_runs)")
    clock.wrap(executor.Executor, "check", "  check output keys (Executor.check)")
    clock.wrap(executor.Executor, "start_run", "  skip checks + record (start_run)")
    clock.wrap(repository.Repository, "record_run", "    of which record_run")
    clock.wrap(executor.Executor, "start_processing", "start the worker and the sweeper")
    clock.watch_dispatch(runtime.CeleryDispatcher)

    def wait(self: Any, run_id: str, **_kwargs: Any) -> dict[str, Any]:
        if not clock.first_dispatch.wait(FIRST_DISPATCH_TIMEOUT):
            raise RuntimeError(f"nothing was dispatched in {FIRST_DISPATCH_TIMEOUT:.0f} s")
        until = time.monotonic() + process
        while time.monotonic() < until:
            counts = self.progress(run_id)
            samples.append((time.monotonic(), rss_mb(), _detail(counts)))
            time.sleep(min(5.0, max(0.0, until - time.monotonic())))
        raise _Stopped

    executor.Executor.wait = wait


def _detail(counts: dict[str, int]) -> str:
    return ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))


def run_command(manifest: Path, options: list[str], profile: Path | None) -> None:
    from pipeline import cli

    profiler = cProfile.Profile() if profile else None
    try:
        if profiler:
            profiler.enable()
        cli.app(["run", str(manifest), "--sandbox", *options], standalone_mode=False)
    except _Stopped:
        pass
    finally:
        if profiler:
            profiler.disable()
            profiler.dump_stats(str(profile))


def report(
    items: int,
    size: int,
    where: str,
    command: str,
    clock: Clock,
    started: tuple[float, float],
    ended: float,
) -> None:
    print(f"{items} items ({size / 1e6:.1f} MB of YAML), {where}: `{command}`")
    print(f"  {'phase':40} {'wall s':>7} {'cpu s':>7}")
    for _start, label, wall, cpu in sorted(clock.phases):
        print(f"  {label:40} {wall:7.2f} {cpu:7.2f}")
    assert clock.dispatched_at is not None
    recorded = clock.recorded_at
    assert recorded is not None
    wall, cpu = clock.dispatched_at[0] - recorded[0], clock.dispatched_at[1] - recorded[1]
    print(f"  {'from recorded to the first dispatch':40} {wall:7.2f} {cpu:7.2f}")
    wall, cpu = clock.dispatched_at[0] - started[0], clock.dispatched_at[1] - started[1]
    print(f"  {'until the first work is enqueued':40} {wall:7.2f} {cpu:7.2f}")
    print(f"  {'peak memory until then (MB)':40} {ended:7.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--postgres", action="store_true", help="a fresh PostgreSQL database")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the command here")
    parser.add_argument("--no-online-check", action="store_true", help="passed to the command")
    parser.add_argument(
        "--process", type=float, default=0.0, help="seconds to go on processing, sampling RSS"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        manifest = folder / "big.yaml"
        write_manifest(manifest, args.items)
        database = f"sqlite:///{folder / 'lineage.db'}"
        where = "SQLite"
        if args.postgres:
            from tests.services import drop_postgres_database, make_postgres_database

            database = make_postgres_database("record_bench")
            stack.callback(drop_postgres_database, database)
            where = "PostgreSQL"
        os.environ |= {
            "PIPELINE_DATABASE_URL": database,
            "PIPELINE_STORAGE_URL": f"file://{folder / 'assets'}",
            "PIPELINE_BROKER_URL": "memory://",
        }
        os.chdir(folder)
        if args.postgres:  # a separate command, before `run` (which refuses an old schema)
            upgrade = [sys.executable, "-m", "pipeline.cli", "db", "upgrade"]
            subprocess.run(upgrade, check=True, capture_output=True)
        clock = Clock()
        started = clock.now()
        with clock.phase("import the CLI"):
            from pipeline import cli  # noqa: F401
        samples: list[tuple[float, float, str]] = []
        instrument(clock, args.process, samples)
        options = ["--no-online-check"] if args.no_online_check else []
        run_command(manifest, options, args.profile)
        ended = peak_mb()
        command = " ".join(["pipeline run FILE --sandbox", *options])
        report(args.items, manifest.stat().st_size, where, command, clock, started, ended)
    if samples:
        first = samples[0][0]
        print("  processing: seconds after the first dispatch, RSS MB, items")
        for at, rss, detail in samples:
            print(f"    {at - first:6.0f} {rss:7.0f}  {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
