"""The peers `peers_bench.py` measures the pipeline against, written as their users would.

- `sdk_pool`: the official `scenario-sdk` in a pool of P threads (P being the plan's
  parallel-jobs limit, which a user reading their plan would configure). Each thread
  submits one item with `client.generate.run_model`, waits for its job the way the JS
  SDK's `wait` does (look, then every 3 s, giving up after 120 s), reads each output with
  `client.assets.retrieve` and downloads its signed URL.
- `guide_script`: the sequential loop of Scenario's integration guide, with plain httpx:
  for each prompt, `POST /generate/custom/{model}`, `GET /jobs/{id}` every 2 s until
  `success` or `failure`, `GET /assets/{id}`, download.

A recipe (generation, then tool models on each output) is chained by hand: each step is
submitted with the previous step's asset id as `image`. Every fixed interval (2 s, 3 s,
120 s) is multiplied by `scale`, the benchmark's time scale. Outputs go to `folder`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from scenario_sdk import Scenario

TERMINAL = ("success", "failure", "canceled")
SDK_POLL_SECONDS = 3.0  # the JS SDK's wait(): every 3 s ...
SDK_WAIT_SECONDS = 120.0  # ... for up to 120 s
GUIDE_POLL_SECONDS = 2.0  # the integration guide's loop: every 2 s


@dataclass
class Recipe:
    """What each item runs: one generation, then each tool model on every output in turn."""

    model: str
    params: dict[str, Any]
    steps: list[str] = field(default_factory=list)
    seed: int = 1


@dataclass
class Outcome:
    """What a peer did: images written, items that did not finish and why, CPU seconds."""

    images: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    cpu_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def stored(self, n: int = 1) -> None:
        with self.lock:
            self.images += n

    def fail(self, item: int, exc: BaseException) -> None:
        with self.lock:
            self.failed += 1
            if len(self.errors) < 5:
                self.errors.append(f"item {item}: {type(exc).__name__}: {str(exc)[:200]}")


class JobFailed(Exception):
    """A job ended in failure or canceled, or outlived the peer's wait."""


def _body(recipe: Recipe, prompt: str) -> dict[str, Any]:
    return {"prompt": prompt, "seed": recipe.seed, **recipe.params}


# --- the official SDK in a thread pool --------------------------------------------------------
def _sdk_wait(client: Scenario, job_id: str, scale: float) -> list[str]:
    """The JS SDK's wait(): look at the job, then every 3 s, for at most 120 s."""
    deadline = time.monotonic() + SDK_WAIT_SECONDS * scale
    while True:
        job = client.jobs.retrieve(job_id).job
        if job.status == "success":
            return list(job.metadata.asset_ids or [])
        if job.status in TERMINAL:
            raise JobFailed(f"job {job_id} ended {job.status}")
        if time.monotonic() >= deadline:
            raise JobFailed(f"job {job_id} still {job.status} after the wait's timeout")
        time.sleep(SDK_POLL_SECONDS * scale)


def _sdk_item(
    client: Scenario,
    cdn: httpx.Client,
    recipe: Recipe,
    n: int,
    prompt: str,
    scale: float,
    folder: Path,
    outcome: Outcome,
) -> None:
    try:
        job = client.generate.run_model(recipe.model, body=_body(recipe, prompt)).job
        assets = _sdk_wait(client, job.job_id, scale)
        for step in recipe.steps:
            chained: list[str] = []
            for asset_id in assets:
                job = client.generate.run_model(step, body={"image": asset_id}).job
                chained += _sdk_wait(client, job.job_id, scale)
            assets = chained
        for index, asset_id in enumerate(assets):
            asset = client.assets.retrieve(asset_id).asset
            response = cdn.get(asset.url)
            response.raise_for_status()
            (folder / f"item-{n:05d}-{index}.png").write_bytes(response.content)
            outcome.stored()
    except Exception as exc:  # a user's pool logs the failed item and goes on
        outcome.fail(n, exc)


def sdk_pool(
    url: str,
    key: str,
    secret: str,
    prompts: list[str],
    recipe: Recipe,
    threads: int,
    scale: float,
    folder: Path,
) -> Outcome:
    """Run every prompt through the official SDK in a pool of `threads` threads."""
    outcome = Outcome()
    with (
        Scenario(api_key=key, api_secret=secret, base_url=url) as client,
        httpx.Client(timeout=60) as cdn,
        ThreadPoolExecutor(max_workers=threads) as pool,
    ):
        for n, prompt in enumerate(prompts):
            pool.submit(_sdk_item, client, cdn, recipe, n, prompt, scale, folder, outcome)
    return outcome


# --- the integration guide's sequential script ------------------------------------------------
def _guide_wait(api: httpx.Client, job_id: str, scale: float) -> list[str]:
    while True:
        response = api.get(f"/jobs/{job_id}")
        response.raise_for_status()
        job = response.json()["job"]
        if job["status"] == "success":
            return list(job["metadata"].get("assetIds") or [])
        if job["status"] == "failure":
            raise JobFailed(f"job {job_id} failed: {job['metadata'].get('error')}")
        time.sleep(GUIDE_POLL_SECONDS * scale)


def _guide_submit(api: httpx.Client, model: str, body: dict[str, Any]) -> str:
    response = api.post(f"/generate/custom/{model}", json=body)
    response.raise_for_status()
    return str(response.json()["job"]["jobId"])


def guide_script(
    url: str, key: str, secret: str, prompts: list[str], recipe: Recipe, scale: float, folder: Path
) -> Outcome:
    """The guide's loop: one prompt after another, polling its job every 2 s."""
    outcome = Outcome()
    with (
        httpx.Client(base_url=url, auth=(key, secret), timeout=60) as api,
        httpx.Client(timeout=60) as cdn,
    ):
        for n, prompt in enumerate(prompts):
            try:
                assets = _guide_wait(
                    api, _guide_submit(api, recipe.model, _body(recipe, prompt)), scale
                )
                for step in recipe.steps:
                    assets = [
                        a
                        for asset_id in assets
                        for a in _guide_wait(
                            api, _guide_submit(api, step, {"image": asset_id}), scale
                        )
                    ]
                for index, asset_id in enumerate(assets):
                    response = api.get(f"/assets/{asset_id}")
                    response.raise_for_status()
                    image = cdn.get(response.json()["asset"]["url"])
                    image.raise_for_status()
                    (folder / f"item-{n:05d}-{index}.png").write_bytes(image.content)
                    outcome.stored()
            except Exception as exc:
                outcome.fail(n, exc)
    return outcome


def timed(run: Callable[[], Outcome]) -> tuple[Outcome, float]:
    """Run a peer in this process; (its outcome with CPU seconds filled in, wall seconds)."""
    cpu, wall = time.process_time(), time.monotonic()
    outcome = run()
    outcome.cpu_seconds = time.process_time() - cpu
    return outcome, time.monotonic() - wall
