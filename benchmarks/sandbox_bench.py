"""How fast the sandbox answers: job polls per second and small PNG downloads per second.

    python benchmarks/sandbox_bench.py                 # starts a sandbox in-process
    python benchmarks/sandbox_bench.py --url http://127.0.0.1:8710/v1 --threads 8

Each phase runs for --seconds with --threads client threads (one httpx client each), so the
whole run is bounded (about 2 x seconds plus setup).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.sandbox import Sandbox, SandboxConfig

MODEL = "model_bfl-flux-2-dev"


def hammer(
    threads: int,
    seconds: float,
    make_call: Callable[[httpx.Client, int], object],
    client_args: dict[str, object],
) -> tuple[int, float]:
    """Run make_call in a loop on `threads` threads for `seconds`; return (calls, elapsed)."""
    counts = [0] * threads
    stop_at = time.perf_counter() + seconds
    start = time.perf_counter()

    def worker(slot: int) -> None:
        with httpx.Client(**client_args) as client:  # type: ignore[arg-type]
            i = slot
            while time.perf_counter() < stop_at:
                make_call(client, i)
                counts[slot] += 1
                i += threads

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts), time.perf_counter() - start


def submit_and_wait(api: httpx.Client, jobs: int, outputs: int, size: int) -> list[str]:
    """Submit `jobs` generations and return their asset ids once all have succeeded."""
    ids = []
    for n in range(jobs):
        body = {
            "prompt": f"bench item {n}",
            "numOutputs": outputs,
            "width": size,
            "height": size,
            "seed": n,
        }
        resp = api.post(f"/generate/custom/{MODEL}", json=body)
        resp.raise_for_status()
        ids.append(resp.json()["job"]["jobId"])
    assets: list[str] = []
    deadline = time.monotonic() + 120
    for job_id in ids:
        while True:
            job = api.get(f"/jobs/{job_id}").raise_for_status().json()["job"]
            if job["status"] == "success":
                assets.extend(job["metadata"]["assetIds"])
                break
            if job["status"] in ("failure", "canceled") or time.monotonic() > deadline:
                raise SystemExit(f"job {job_id} ended {job['status']}")
            time.sleep(0.05)
    return assets


def run(url: str, key: str, secret: str, threads: int, seconds: float, size: int) -> None:
    """Both phases against the API at `url`; prints one line per phase."""
    api_args: dict[str, object] = {
        "base_url": url,
        "auth": (key, secret),
        "timeout": 30,
        "verify": False,
    }
    with httpx.Client(**api_args) as api:  # type: ignore[arg-type]
        poll_ids = [
            api.post(
                f"/generate/custom/{MODEL}", json={"prompt": f"poll {n}", "width": 64, "height": 64}
            )
            .raise_for_status()
            .json()["job"]["jobId"]
            for n in range(50)
        ]
        polls, elapsed = hammer(
            threads,
            seconds,
            lambda c, i: c.get(f"/jobs/{poll_ids[i % len(poll_ids)]}").raise_for_status(),
            api_args,
        )
        print(
            f"job polls:   {polls / elapsed:8.0f} /s  ({polls} GET /jobs/{{id}} in "
            f"{elapsed:.1f} s, {threads} threads)"
        )

        asset_ids = submit_and_wait(api, jobs=100, outputs=8, size=size)
        urls: list[str] = []
        for start in range(0, len(asset_ids), 200):
            chunk = asset_ids[start : start + 200]
            bulk = api.post("/assets/get-bulk", json={"assetIds": chunk}).raise_for_status()
            urls.extend(a["url"] for a in bulk.json()["assets"])
    sizes: list[int] = []

    def download(client: httpx.Client, i: int) -> None:
        resp = client.get(urls[i % len(urls)])
        resp.raise_for_status()
        sizes.append(len(resp.content))

    images, elapsed = hammer(threads, seconds, download, {"timeout": 30, "verify": False})
    mean = sum(sizes) / max(1, len(sizes))
    print(
        f"images:      {images / elapsed:8.0f} /s  ({images} downloads of {len(urls)} distinct "
        f"{size}x{size} PNGs, {mean:.0f} B each, {threads} threads)"
    )


def main() -> None:
    """Parse arguments, start a sandbox unless --url is given, run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="API base URL of a running sandbox (default: in-process)")
    parser.add_argument("--key", default="sandbox")
    parser.add_argument("--secret", default="sandbox")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each phase")
    parser.add_argument("--size", type=int, default=64, choices=[64, 128, 256, 512])
    args = parser.parse_args()
    if args.url:
        run(args.url, args.key, args.secret, args.threads, args.seconds, args.size)
        return
    with Sandbox(SandboxConfig(latency=0.0, seed=1)) as sandbox:
        print(f"sandbox at {sandbox.url}")
        run(sandbox.url, "sandbox", "sandbox", args.threads, args.seconds, args.size)


if __name__ == "__main__":
    main()
