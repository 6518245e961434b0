"""How long `pipeline validate` takes on big generated manifests.

    python benchmarks/validate_bench.py [--items 20000 100000] [--keep DIR]

Writes one manifest per size (items with a prompt, a seed override on every third item and
a few params), then times `pipeline validate` in a fresh process, as a user would run it,
and reports seconds, items/s and the process's peak memory.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def manifest_text(items: int) -> str:
    """A valid manifest of `items` items."""
    lines = [
        "version: 1",
        f"name: bench-{items}",
        "model: model_bfl-flux-2-dev",
        "seed: 42",
        "params: {width: 512, height: 512, numOutputs: 2}",
        "items:",
    ]
    for i in range(items):
        lines.append(f"  - id: item-{i}")
        lines.append(f'    prompt: "a small icon of thing number {i}, flat style"')
        if i % 3 == 0:
            lines.append(f"    seed: {i}")
            lines.append("    params: {guidance: 3.5}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--keep", type=Path, help="write the manifests here and keep them")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="validate-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    for items in args.items:
        path = folder / f"bench-{items}.yaml"
        path.write_text(manifest_text(items), encoding="utf-8")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "validate", str(path)],
            capture_output=True,
            text=True,
            check=False,
            cwd=folder,
        )
        elapsed = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        status = "ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[:200]}"
        print(
            f"{items:>8} items  {path.stat().st_size / 1e6:6.1f} MB  {elapsed:6.2f} s  "
            f"{items / elapsed:9.0f} items/s  peak RSS {max(before, peak) / 1024:6.0f} MiB  "
            f"{status}"
        )


if __name__ == "__main__":
    main()
