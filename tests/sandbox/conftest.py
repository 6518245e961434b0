"""Fixtures: a sandbox started in-process per test, SDK and raw HTTP clients, the Swagger file."""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from scenario_sdk import Scenario

from pipeline.sandbox import Sandbox, SandboxConfig

REPO = Path(__file__).resolve().parents[2]
SWAGGER_NAME = "swagger-2025-11-04.yaml"
SWAGGER_CANDIDATES = [
    REPO / "docs" / "scenario" / SWAGGER_NAME,
    REPO / "tests" / "sandbox" / SWAGGER_NAME,
    REPO.parent / "shared" / "scenario" / SWAGGER_NAME,
]


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A fresh sandbox with short job latency."""
    with Sandbox(SandboxConfig(latency=0.15, seed=1234)) as sb:
        yield sb


@pytest.fixture
def make_sandbox() -> Iterator[Callable[..., Sandbox]]:
    """Start a sandbox with custom config fields; all are stopped after the test."""
    started: list[Sandbox] = []

    def make(**fields: Any) -> Sandbox:
        fields.setdefault("latency", 0.15)
        fields.setdefault("seed", 1234)
        sb = Sandbox(SandboxConfig(**fields)).start()
        started.append(sb)
        return sb

    yield make
    for sb in started:
        sb.stop()


TOOL_MODELS = (
    "model_scenario-image-slicer",
    "model_photoroom-background-removal",
    "model_upscale-v3",
)


def sdk_client(sb: Sandbox, **kwargs: Any) -> Scenario:
    """The official SDK pointed at the sandbox, validating responses strictly, no retries."""
    kwargs.setdefault("max_retries", 0)
    return Scenario(
        api_key=sb.config.api_key,
        api_secret=sb.config.api_secret,
        base_url=sb.url,
        _strict_response_validation=True,
        **kwargs,
    )


class Kit:
    """A raw httpx client on one sandbox plus the helpers most tests need."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        # verify=False: plain-HTTP loopback only, and it skips loading CA certificates.
        self.http = httpx.Client(
            base_url=sb.url, auth=("sandbox", "sandbox"), timeout=10, verify=False
        )
        self.cdn = httpx.Client(timeout=10, verify=False)  # no credentials, like a CDN

    def generate(self, model: str = "model_bfl-flux-2-dev", **body: Any) -> str:
        """Submit a generation (64x64 by default for image models); return the job id."""
        if model not in TOOL_MODELS:
            body.setdefault("prompt", "a red sword icon")
            body.setdefault("width", 64)
            body.setdefault("height", 64)
        resp = self.http.post(f"/generate/custom/{model}", json=body)
        assert resp.status_code == 200, resp.text
        return str(resp.json()["job"]["jobId"])

    def wait(self, job_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """Poll GET /jobs/{id} until terminal; return the raw job document."""
        deadline = time.monotonic() + timeout
        while True:
            job: dict[str, Any] = self.http.get(f"/jobs/{job_id}").raise_for_status().json()["job"]
            if job["status"] in ("success", "failure", "canceled"):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(0.03)

    def asset_url(self, asset_id: str) -> str:
        """A fresh signed URL for the asset."""
        return str(self.http.get(f"/assets/{asset_id}").raise_for_status().json()["asset"]["url"])

    def outputs(self, job_id: str) -> list[bytes]:
        """Wait for the job to succeed and download every output through its signed URL."""
        job = self.wait(job_id)
        assert job["status"] == "success", job
        out = []
        for asset_id in job["metadata"]["assetIds"]:
            resp = self.cdn.get(self.asset_url(asset_id))
            assert resp.status_code == 200, resp.text
            out.append(resp.content)
        return out

    def close(self) -> None:
        """Close both HTTP clients."""
        self.http.close()
        self.cdn.close()

    def stats(self) -> dict[str, Any]:
        """GET /_sandbox/stats over HTTP."""
        doc: dict[str, Any] = self.cdn.get(self.sb.base_url + "/_sandbox/stats").json()
        return doc


@pytest.fixture
def client(sandbox: Sandbox) -> Iterator[Scenario]:
    """SDK client for the `sandbox` fixture."""
    with sdk_client(sandbox) as sdk:
        yield sdk


@pytest.fixture
def make_client() -> Iterator[Callable[..., Scenario]]:
    """Build SDK clients for any sandbox; closed after the test."""
    made: list[Scenario] = []

    def make(sb: Sandbox, **kwargs: Any) -> Scenario:
        made.append(sdk_client(sb, **kwargs))
        return made[-1]

    yield make
    for sdk in made:
        sdk.close()


@pytest.fixture
def kit(sandbox: Sandbox) -> Iterator[Kit]:
    """Raw-HTTP helpers for the `sandbox` fixture."""
    k = Kit(sandbox)
    yield k
    k.close()


@pytest.fixture
def make_kit() -> Iterator[Callable[[Sandbox], Kit]]:
    """Raw-HTTP helpers for any sandbox; closed after the test."""
    made: list[Kit] = []

    def make(sb: Sandbox) -> Kit:
        made.append(Kit(sb))
        return made[-1]

    yield make
    for k in made:
        k.close()


def _swagger_path() -> Path | None:
    env = os.environ.get("SCENARIO_SWAGGER")
    if env:
        return Path(env)
    return next((p for p in SWAGGER_CANDIDATES if p.exists()), None)


@pytest.fixture(scope="session")
def swagger(pytestconfig: pytest.Config) -> dict[str, Any]:
    """The Scenario Swagger document, parsed once and cached across sessions (pickle)."""
    path = _swagger_path()
    if path is None or not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SWAGGER_NAME} not found (set SCENARIO_SWAGGER)")
        pytest.skip(f"{SWAGGER_NAME} not found: set SCENARIO_SWAGGER to its path")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:16]
    cache = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    cache_dir = cache.mkdir("sandbox-swagger") if cache is not None else None
    cached = cache_dir / f"{digest}.pickle" if cache_dir else None
    if cached is not None and cached.exists():
        with cached.open("rb") as fh:
            doc: dict[str, Any] = pickle.load(fh)
        return doc
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    doc = yaml.load(raw, Loader=loader)
    if cached is not None:
        with cached.open("wb") as fh:
            pickle.dump(doc, fh)
    return doc
