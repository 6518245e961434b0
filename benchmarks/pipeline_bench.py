"""Makespan and API requests per image of a whole run, against the sandbox.

Runs N one-image items through the real pipeline (embedded worker, SQLite, local files)
on a sandbox whose jobs take L seconds and which refuses more than P parallel jobs, then
prints the makespan next to the bound N*L/P + L (no scheduler can beat it: P slots, each
busy L per item, plus one job's latency), their ratio, and the API requests per image.

    python benchmarks/pipeline_bench.py --items 200 --latency 1 --parallel 10

Time may be scaled down: the pipeline's poll interval and sweep tick scale with L (a
tenth of it), as they would with a real L = 10 s and the defaults of 1 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from pydantic import SecretStr

from pipeline.executor import Executor
from pipeline.manifest import load_manifest
from pipeline.models import RunStatus
from pipeline.sandbox import Sandbox, SandboxConfig
from pipeline.settings import Settings


def write_manifest(folder: Path, items: int, outputs: int) -> Path:
    lines = [
        "name: bench",
        "model: model_bench-image",
        "seed: 1",
        f"params: {{numOutputs: {outputs}, width: 64, height: 64}}",
        'output: "{manifest}/{item}/{index}.{ext}"',
        "items:",
    ]
    for n in range(items):
        lines += [f"  - id: item-{n:05d}", f'    prompt: "benchmark icon number {n}"']
    path = folder / "bench.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200, help="N, items in the run")
    parser.add_argument("--latency", type=float, default=1.0, help="L, seconds per job")
    parser.add_argument("--parallel", type=int, default=10, help="P, the parallel-jobs cap")
    parser.add_argument("--outputs", type=int, default=1, help="numOutputs per item")
    parser.add_argument("--spread", type=float, default=0.0, help="latency spread, seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp)
        manifest = load_manifest(write_manifest(folder, args.items, args.outputs))
        config = SandboxConfig(
            latency=args.latency, latency_spread=args.spread, parallel_jobs=args.parallel, seed=1
        )
        sandbox = stack.enter_context(Sandbox(config))
        settings = Settings(
            SCENARIO_API_URL=sandbox.url,
            SCENARIO_API_KEY=SecretStr("sandbox"),
            SCENARIO_API_SECRET=SecretStr("sandbox"),
            PIPELINE_DATABASE_URL=f"sqlite:///{folder / 'bench.db'}",
            PIPELINE_STORAGE_URL=f"file://{folder / 'assets'}",
            PIPELINE_BROKER_URL="memory://",
            PIPELINE_PARALLEL_JOBS=args.parallel,
            PIPELINE_REQUESTS_PER_SECOND=200,
            PIPELINE_POLL_INTERVAL=max(0.05, args.latency / 10),
            PIPELINE_SWEEP_TICK=max(0.02, args.latency / 20),
            PIPELINE_WORKER_CONCURRENCY=max(4, args.parallel),
        )
        executor = stack.enter_context(Executor(settings))
        started = time.monotonic()
        run_id = executor.start_run(manifest)
        executor.start_processing(stack)
        while executor.ctx.repo.run_status(run_id) == RunStatus.RUNNING:
            executor.ctx.repo.refresh_runs()
            time.sleep(0.02)
        makespan = time.monotonic() - started
        report = executor.report(run_id)
        stats = sandbox.stats()

    api_requests = sum(n for route, n in stats["requests"].items() if " /cdn" not in route)
    images = len(stats["images"])
    bound = args.items * args.latency / args.parallel + args.latency
    result = {
        "items": args.items,
        "latency_s": args.latency,
        "parallel": args.parallel,
        "status": report["status"],
        "makespan_s": round(makespan, 2),
        "bound_s": round(bound, 2),
        "ratio": round(makespan / bound, 3),
        "images": images,
        "api_requests": api_requests,
        "requests_per_image": round(api_requests / max(1, images), 3),
        "requests_by_route": stats["requests"],
        "responses_429": stats["responses_429"],
        "duplicate_submissions": stats["duplicate_submissions"],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"N={args.items} L={args.latency}s P={args.parallel}: {report['status']}")
    print(f"makespan            {makespan:8.2f} s")
    print(f"bound N*L/P + L     {bound:8.2f} s")
    print(f"ratio               {makespan / bound:8.3f}")
    print(f"images              {images:8d}")
    print(f"API requests        {api_requests:8d}  ({api_requests / max(1, images):.3f} per image)")
    for route, n in sorted(stats["requests"].items()):
        print(f"  {route:40s} {n}")
    print(f"429 responses       {stats['responses_429']}")
    print(f"duplicate submits   {stats['duplicate_submissions']}")


if __name__ == "__main__":
    main()
