"""The pipeline beside its peers: one sandbox, the same limits and time scale, one table.

    python benchmarks/peers_bench.py     # N=100, P=8, real seconds, every case once: ~14 min
    python benchmarks/peers_bench.py --repeat 3 --json peers.json   # medians of 3: ~40 min
    python benchmarks/peers_bench.py --items 40 --case L=1s   # a quicker look at one case

N=100 one-image items against 8 parallel jobs is the case issue 9 was filed with.
    python benchmarks/peers_bench.py --scale 0.1    # everything ten times shorter

For each case it starts one sandbox (`pipeline sandbox` in a subprocess, loopback; jobs of
L seconds, optionally spread; at most P parallel jobs; a request-rate limit) and runs, one
after another on a reset sandbox:

- **pipeline**: `pipeline run manifest.yaml --wait --json` in a subprocess, with default
  settings (no `PIPELINE_*` variable at all: it is not told P, nor the time scale), in a
  fresh temp folder (so a fresh SQLite db and `./assets`), pointed at the sandbox with
  `SCENARIO_API_URL` and dummy credentials. Its makespan is the run's own, from its
  recording to its end (the run document's `created_at` and `finished_at`), as the in-process
  peers are timed without their start-up; the command's wall time is kept in --json.
- **SDK pool**: the official `scenario-sdk` in P threads (P known, as a user reading their
  plan would configure), each submitting, waiting like the JS SDK's `wait` (every 3 s, up
  to 120 s), reading the assets and downloading them (see `peers.py`).
- **guide script**: the integration guide's sequential loop, polling every 2 s. It takes
  about N·L, so it runs on the first `--guide-items` items only (5 by default); its per-
  image figures are its own and its makespan is extrapolated to N items (x N/n), labelled.

`--rtt 0.03` adds a network round trip of 30 ms to every API and CDN request (the sandbox's
`--rtt`: half on the way there, half on the way back), as between a studio and a hosted API;
by default the sandbox answers over loopback, where a round trip is about 0.1 ms.

The sandbox limits requests to `--rate-limit` per second (10 by default, burst one second's
worth: the rate the pipeline paces itself at; Scenario publishes no number) and answers 429
with `Retry-After` beyond it. The SDK retries a 429 twice, then raises; an item lost that way
is counted and footnoted. `--rate-limit 0` lifts the limit.

Time scale: `--scale` multiplies L and every fixed interval of the peers (2 s, 3 s, 120 s);
the request-rate limit (`--rate-limit`, per unscaled second) is divided by it, so a peer
meets the same pressure as at full speed. The pipeline gets no hint: its own constants
(poll floor, sweep tick, request rate) stay in real seconds, so at small L and scale it
pays them in full. That is the point: its defaults must adapt by themselves.

Figures per tool: makespan / bound, where bound = J·L/P + L (J = jobs in the run: N, or 2N
for the two-step recipe; L and the bound in scaled seconds); API requests per stored image
(every `/v1` request the sandbox counted, CDN downloads excluded); 429 answers (rate and
parallel-jobs); CPU seconds per image (the subprocess's rusage for the pipeline, this
process's CPU time for the in-process peers; the sandbox runs in its own process and is
not counted); duplicate submissions; images stored.

The recipe case (generate -> model_photoroom-background-removal) gives the pipeline a
manifest with `steps:` (interface.md, "Recipes"); while `pipeline validate` refuses it, the
pipeline is skipped there with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import Outcome, Recipe, guide_script, sdk_pool, timed

KEY, SECRET = "bench-key", "bench-secret"  # dummy credentials the sandbox is started with
MODEL = "model_bench-image"
BACKGROUND_REMOVAL = "model_photoroom-background-removal"
PARAMS: dict[str, Any] = {"numOutputs": 1, "width": 64, "height": 64}
SEED = 1
TOOLS = ("pipeline", "sdk-pool", "guide-script")
METRICS = ("ratio", "requests_per_image", "responses_429", "cpu_per_image")


@dataclass
class Case:
    name: str
    latency: float  # unscaled seconds
    spread: float = 0.0  # share of L: each job takes L·(1 ± spread) uniformly
    steps: list[str] = field(default_factory=list)


CASES = [
    Case("L=1s", 1.0),
    Case("L=3s", 3.0),
    Case("L=10s", 10.0),
    Case("L=3s ±30%", 3.0, spread=0.3),
    Case("recipe L=3s", 3.0, steps=[BACKGROUND_REMOVAL]),
]


def clean_env() -> dict[str, str]:
    """This environment without any pipeline, Scenario or AWS setting."""
    prefixes = ("PIPELINE_", "SCENARIO_", "AWS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def pipeline_cli() -> list[str]:
    """The `pipeline` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("pipeline")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


@contextlib.contextmanager
def sandbox(case: Case, args: argparse.Namespace) -> Iterator[str]:
    """`pipeline sandbox` in a subprocess, shaped by the case; yields its API URL."""
    latency = case.latency * args.scale
    command = [
        *pipeline_cli(),
        "sandbox",
        "--port", "0",
        "--key", KEY,
        "--secret", SECRET,
        "--latency", f"{latency:g}",
        "--latency-spread", f"{latency * case.spread:g}",
        "--parallel-jobs", str(args.parallel),
        "--seed", "1",
    ]  # fmt: skip
    if args.rtt > 0:
        command += ["--rtt", f"{args.rtt:g}"]
    if args.rate_limit > 0:
        burst = args.rate_burst or max(1, round(args.rate_limit))
        command += ["--rate-limit", f"{args.rate_limit / args.scale:g}"]
        command += ["--rate-burst", str(burst)]
    proc = subprocess.Popen(
        command, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise SystemExit(f"the sandbox did not start (said {url!r})")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def control(url: str, method: str, route: str) -> dict[str, Any]:
    """Call a sandbox control route (`/_sandbox/...`)."""
    base = url.removesuffix("/v1")
    response = httpx.request(method, f"{base}/_sandbox/{route}", timeout=30)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def prompts(n: int) -> list[str]:
    return [f"benchmark icon number {i}" for i in range(n)]


def manifest_text(case: Case, n: int) -> str:
    lines = [
        "name: bench",
        f"model: {MODEL}",
        f"seed: {SEED}",
        "params: {" + ", ".join(f"{k}: {v}" for k, v in PARAMS.items()) + "}",
        'output: "{manifest}/{item}/{index}.{ext}"',
    ]
    if case.steps:
        lines += ["steps:"] + [f"  - model: {step}" for step in case.steps]
    lines.append("items:")
    for i, prompt in enumerate(prompts(n)):
        lines += [f"  - id: item-{i:05d}", f'    prompt: "{prompt}"']
    return "\n".join(lines) + "\n"


def run_pipeline(url: str, case: Case, args: argparse.Namespace, bound: float) -> dict[str, Any]:
    """The pipeline as a user runs it; figures, or {"skipped": reason}."""
    with tempfile.TemporaryDirectory(prefix="peers-bench-") as tmp:
        folder = Path(tmp)
        (folder / "bench.yaml").write_text(manifest_text(case, args.items))
        env = {**clean_env(), "SCENARIO_API_URL": url}
        env |= {"SCENARIO_API_KEY": KEY, "SCENARIO_API_SECRET": SECRET}
        started = time.monotonic()
        check = subprocess.run(
            [*pipeline_cli(), "validate", "bench.yaml"],
            cwd=folder, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        startup = time.monotonic() - started
        if check.returncode != 0:
            said = (check.stderr or check.stdout).strip().splitlines() or ["(nothing)"]
            return {"skipped": f"`pipeline validate` refuses the manifest: {said[0][:160]}"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        try:
            done = subprocess.run(
                [*pipeline_cli(), "run", "bench.yaml", "--wait", "--json"],
                cwd=folder, env=env, capture_output=True, text=True,
                timeout=max(300.0, 30 * bound),
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            (Path(tempfile.gettempdir()) / "peers-bench-pipeline.log").write_text(err)
            tail = err.strip().splitlines()[-1:] or ["(nothing)"]
            return {
                "skipped": f"`pipeline run --wait` did not finish in {exc.timeout:.0f} s "
                f"(its stderr: {tempfile.gettempdir()}/peers-bench-pipeline.log; last line: "
                f"{tail[0][:120]})"
            }
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        try:
            report = json.loads(done.stdout)
        except ValueError:
            tail = done.stderr.strip().splitlines()[-1:] or ["(nothing)"]
            return {"skipped": f"`pipeline run` exit {done.returncode}: {tail[0][:160]}"}
        stored = [
            o for item in report.get("items", []) for o in item.get("outputs") or [] if o.get("uri")
        ]
        on_disk = [p for p in (folder / "assets").rglob("*.png")] if stored else []
        items = report.get("items", [])
        unfinished = [i for i in items if i.get("status") not in ("succeeded", "skipped")]
        errors = [f"{i['id']}: {i['status']}: {i.get('error')}" for i in unfinished]
        # The batch's own time, from its recording to its end (the run document's clock),
        # as the in-process peers are timed without their Python start-up; the command's
        # wall time, start-up included, is kept beside it.
        try:
            makespan = (
                datetime.fromisoformat(report["finished_at"])
                - datetime.fromisoformat(report["created_at"])
            ).total_seconds()
        except (KeyError, TypeError, ValueError):
            makespan = wall
        return {
            "makespan_s": makespan,
            "cli_wall_s": round(wall, 2),
            "cpu_s": cpu,
            "images": min(len(stored), len(on_disk)),
            "exit_code": done.returncode,
            "status": report.get("status"),
            "cli_startup_s": round(startup, 2),
            "failed_items": len(unfinished),
            "errors": errors[:5],
        }


def run_peer(name: str, url: str, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """One in-process peer on its items; figures."""
    recipe = Recipe(MODEL, dict(PARAMS), list(case.steps), SEED)
    n = args.items if name == "sdk-pool" else min(args.items, args.guide_items)
    with tempfile.TemporaryDirectory(prefix="peers-bench-") as tmp:
        folder = Path(tmp)
        outcome: Outcome
        if name == "sdk-pool":
            outcome, makespan = timed(
                lambda: sdk_pool(
                    url, KEY, SECRET, prompts(n), recipe, args.parallel, args.scale, folder
                )
            )
        else:
            outcome, makespan = timed(
                lambda: guide_script(url, KEY, SECRET, prompts(n), recipe, args.scale, folder)
            )
        on_disk = len(list(folder.glob("*.png")))
    return {
        "items_run": n,
        "makespan_s": makespan,
        "makespan_measured_s": makespan,
        "extrapolated": n < args.items,
        "cpu_s": outcome.cpu_seconds,
        "images": min(outcome.images, on_disk),
        "failed_items": outcome.failed,
        "errors": outcome.errors,
    }


def figures(raw: dict[str, Any], stats: dict[str, Any], bound: float, n: int) -> dict[str, Any]:
    """Add the sandbox's counts and the ratios to one tool's raw figures."""
    api = sum(count for route, count in stats["requests"].items() if " /cdn" not in route)
    images = raw["images"]
    if raw.get("extrapolated"):
        raw["makespan_s"] = raw["makespan_measured_s"] * n / raw["items_run"]
    raw |= {
        "bound_s": bound,
        "ratio": raw["makespan_s"] / bound,
        "api_requests": api,
        "requests_by_route": stats["requests"],
        "requests_per_image": api / max(1, images),
        "responses_429": sum(stats["responses_429"].values()),
        "responses_429_by_kind": stats["responses_429"],
        "cpu_per_image": raw["cpu_s"] / max(1, images),
        "duplicate_submissions": stats["duplicate_submissions"],
        "jobs_created": stats["jobs_created"],
    }
    return raw


def run_case(case: Case, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every tool on the case's sandbox, --repeat times; one dict of tool -> figures per run."""
    latency = case.latency * args.scale
    jobs = args.items * (1 + len(case.steps))
    bound = jobs * latency / args.parallel + latency
    runs: list[dict[str, Any]] = []
    with sandbox(case, args) as url:
        if "sdk-pool" in args.tools:  # the SDK's first call builds its models: not timed
            with tempfile.TemporaryDirectory(prefix="peers-bench-") as tmp:
                recipe = Recipe(MODEL, dict(PARAMS), list(case.steps), SEED)
                sdk_pool(url, KEY, SECRET, prompts(1), recipe, 1, args.scale, Path(tmp))
        for repeat in range(args.repeat):
            run: dict[str, Any] = {}
            for tool in args.tools:
                control(url, "POST", "reset")
                if tool == "pipeline":
                    raw = run_pipeline(url, case, args, bound)
                else:
                    raw = run_peer(tool, url, case, args)
                if "skipped" not in raw:
                    raw = figures(raw, control(url, "GET", "stats"), bound, args.items)
                run[tool] = raw
                print(f"  {case.name} #{repeat + 1} {tool}: {summary(raw)}", file=sys.stderr)
            runs.append(run)
    return runs


def summary(raw: dict[str, Any]) -> str:
    if "skipped" in raw:
        return f"skipped ({raw['skipped']})"
    return (
        f"{raw['makespan_s']:.2f}s / {raw['bound_s']:.2f}s = {raw['ratio']:.2f}x, "
        f"{raw['requests_per_image']:.2f} req/img, {raw['responses_429']} 429s, "
        f"{raw['images']} images, {raw['duplicate_submissions']} dup"
    )


def medians(runs: list[dict[str, Any]], tool: str) -> dict[str, Any] | None:
    done = [run[tool] for run in runs if tool in run and "skipped" not in run[tool]]
    if not done:
        return None
    keys = (*METRICS, "duplicate_submissions", "images", "makespan_s", "bound_s")
    return {k: statistics.median(r[k] for r in done) for k in keys}


def label(tool: str, args: argparse.Namespace) -> str:
    if tool == "pipeline":
        return "pipeline, defaults"
    if tool == "sdk-pool":
        return f"scenario-sdk, {args.parallel} threads"
    n = min(args.items, args.guide_items)
    if n < args.items:
        return f"guide script (ran {n} items; makespan x {args.items}/{n})"
    return "guide script"


def startup_seconds(code: str) -> float:
    """Wall seconds of a fresh interpreter running `code` (a start-up cost, for the notes)."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], env=clean_env(), check=True, timeout=120)
    return time.monotonic() - started


def cli_startup(results: list[tuple[Case, list[dict[str, Any]]]]) -> float:
    """Median wall seconds of `pipeline validate` (mostly the CLI's start-up) over the runs."""
    times = [
        raw["cli_startup_s"]
        for _, runs in results
        for run in runs
        if "cli_startup_s" in (raw := run.get("pipeline") or {})
    ]
    return statistics.median(times) if times else 0.0


def table(results: list[tuple[Case, list[dict[str, Any]]]], args: argparse.Namespace) -> str:
    head = (
        "| case | tool | makespan / bound | API requests / image | 429s | CPU s / image "
        "| duplicate submissions | images stored |"
    )
    rows = [head, "|" + "---|" * 8]
    notes: list[str] = []
    lost_notes: list[str] = []
    for case, runs in results:
        for tool in args.tools:
            m = medians(runs, tool)
            if m is None:
                reasons = {run[tool]["skipped"] for run in runs if tool in run}
                rows.append(f"| {case.name} | {label(tool, args)} | skipped¹ | | | | | |")
                notes += [f"¹ {case.name}, {tool}: {r}" for r in sorted(reasons)]
                continue
            n = args.items if tool != "guide-script" else min(args.items, args.guide_items)
            expected = n * PARAMS["numOutputs"]
            lost = [r for run in runs if (r := run.get(tool)) and r.get("failed_items")]
            if lost:
                mark = "²"
                lost_notes += [
                    f"² {case.name}, {label(tool, args)}: {r['failed_items']} item(s) not "
                    f"stored in one run, e.g. {r['errors'][0][:90]}; its makespan covers the "
                    "rest"
                    for r in lost[:1]
                ]
            else:
                mark = ""
            rows.append(
                f"| {case.name} | {label(tool, args)} | {m['ratio']:.2f}x "
                f"| {m['requests_per_image']:.2f} | {m['responses_429']:g} "
                f"| {m['cpu_per_image']:.3f} | {m['duplicate_submissions']:g} "
                f"| {m['images']:g} / {expected}{mark} |"
            )
    rate = (
        f"request rate limit {args.rate_limit:g}/s (burst "
        f"{args.rate_burst or max(1, round(args.rate_limit))}) unscaled"
        if args.rate_limit > 0
        else "no request rate limit"
    )
    head_note = (
        f"N={args.items} one-image items, P={args.parallel} parallel jobs, time scale "
        f"{args.scale:g} (L and the bound below are in scaled seconds), {rate}, "
        f"medians of {args.repeat} run(s), "
        + (
            f"a network round trip of {args.rtt * 1000:g} ms (unscaled) on every request"
            if args.rtt > 0
            else "loopback (no network round trip)"
        )
        + ". bound = J·L/P + L, "
        "J = jobs per run (N; 2N for the recipe). API requests exclude CDN downloads. "
    )
    if "pipeline" in args.tools:
        head_note += (
            "The pipeline knows neither P nor the scale; its makespan is its run's, from "
            "recording to end, like the in-process peers' (their start-up, python + import "
            f"scenario_sdk: about {args.sdk_startup:.1f} s, is not counted); the pipeline "
            f"command's own start-up is about {cli_startup(results):.1f} s here. "
        )
    head_note += (
        "The bound is the issue's N·L/P + L; when N is a multiple of P a tool can finish "
        "in N/P rounds of about L, i.e. under 1x."
    )
    return "\n".join([head_note, "", *rows, "", *notes, *lost_notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100, help="N, one-image items per run")
    parser.add_argument("--parallel", type=int, default=8, help="P, the sandbox's job cap")
    parser.add_argument("--scale", type=float, default=1.0, help="time scale (L, intervals)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; medians shown")
    parser.add_argument(
        "--guide-items", type=int, default=5, help="items the sequential guide script runs"
    )
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=10.0,
        help="API requests per unscaled second (token bucket); 0 = no limit",
    )
    parser.add_argument(
        "--rate-burst", type=int, help="token bucket size (default: one second's worth)"
    )
    parser.add_argument(
        "--rtt",
        type=float,
        default=0.0,
        help="seconds of network round trip on every API and CDN request (unscaled); 0 = loopback",
    )
    parser.add_argument(
        "--case", action="append", choices=[c.name for c in CASES], help="only these cases"
    )
    parser.add_argument("--tool", action="append", choices=TOOLS, help="only these tools")
    parser.add_argument("--json", type=Path, help="write every raw figure to this file")
    args = parser.parse_args()
    if min(args.items, args.parallel, args.repeat, args.guide_items) < 1 or args.scale <= 0:
        parser.error("--items, --parallel, --repeat, --guide-items must be >= 1; --scale > 0")
    if args.rtt < 0:
        parser.error("--rtt must be >= 0")
    args.tools = [t for t in TOOLS if not args.tool or t in args.tool]
    if shutil.which("pipeline") is None and not Path(sys.executable).with_name("pipeline").exists():
        print("note: no `pipeline` script found; using python -m pipeline", file=sys.stderr)

    args.sdk_startup = startup_seconds("import httpx, scenario_sdk")
    results: list[tuple[Case, list[dict[str, Any]]]] = []
    started = time.monotonic()
    for case in CASES:
        if args.case and case.name not in args.case:
            continue
        print(f"case {case.name}", file=sys.stderr)
        results.append((case, run_case(case, args)))
    print(table(results, args))
    print(f"\n({time.monotonic() - started:.0f} s in all)", file=sys.stderr)
    if args.json:
        doc = {
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "cases": [
                {
                    "case": case.name,
                    "latency_scaled_s": case.latency * args.scale,
                    "spread": case.spread,
                    "steps": case.steps,
                    "runs": runs,
                    "medians": {t: medians(runs, t) for t in args.tools},
                }
                for case, runs in results
            ],
        }
        args.json.write_text(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    main()
