"""How long a big manifest takes to validate and to record (runs + items + first nodes).

    python benchmarks/record_bench.py --items 100000
    python benchmarks/record_bench.py --items 20000 --database postgresql://postgres@127.0.0.1/test

It writes an N-item manifest, loads and validates it, then records the run against a
local sandbox (nothing is submitted: the sweeper is not started) and prints each phase's
seconds and the process's peak memory (ru_maxrss), the figures issue 9 asks about.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from pipeline.executor import Executor
from pipeline.manifest import load_manifest
from pipeline.sandbox import Sandbox, SandboxConfig
from pipeline.settings import Settings


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--database", default=None, help="default: a SQLite file in a temp dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Sandbox(SandboxConfig(latency=1.0)) as sandbox:
        folder = Path(tmp)
        manifest_path = folder / "big.yaml"
        write_manifest(manifest_path, args.items)
        os.chdir(folder)
        started = time.perf_counter()
        manifest = load_manifest(manifest_path)
        validated = time.perf_counter()
        settings = Settings(
            SCENARIO_API_URL=sandbox.url,
            SCENARIO_API_KEY="sandbox",
            SCENARIO_API_SECRET="sandbox",
            PIPELINE_DATABASE_URL=args.database or f"sqlite:///{folder / 'lineage.db'}",
            PIPELINE_STORAGE_URL=f"file://{folder / 'assets'}",
        )
        with Executor(settings, sandbox=True) as executor:
            opened = time.perf_counter()
            run_id = executor.start_run(manifest)
            recorded = time.perf_counter()
            counts = executor.progress(run_id)
        size = manifest_path.stat().st_size
    print(f"{args.items} items: {size / 1e6:.1f} MB of YAML")
    print(f"  validate        {validated - started:6.1f} s")
    print(f"  open services   {opened - validated:6.1f} s")
    print(f"  record the run  {recorded - opened:6.1f} s  ({counts})")
    print(f"  validate+record {validated - started + recorded - opened:6.1f} s")
    print(f"  peak memory     {peak_mb():6.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
