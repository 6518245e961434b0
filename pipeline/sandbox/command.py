"""`pipeline sandbox`: serve the local Scenario API in the foreground until Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

import typer

from pipeline.sandbox.config import DEFAULT_MODEL_TYPES, SandboxConfig
from pipeline.sandbox.server import Sandbox

T = TypeVar("T")


def _pairs(values: list[str], flag: str, convert: Callable[[str], T]) -> dict[str, T]:
    """KEY=VALUE options as a dict; a malformed one is a usage error naming the flag."""
    out: dict[str, T] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            out[key] = convert(raw)
        except ValueError:
            raise typer.BadParameter(f"expected ID=VALUE, got {item!r}", param_hint=flag) from None
    return out


def sandbox_command(
    port: int = typer.Option(8710, "--port", help="TCP port (0 = any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    key: str = typer.Option("sandbox", "--key", help="API key (SCENARIO_API_KEY wins)."),
    secret: str = typer.Option(
        "sandbox", "--secret", help="API secret (SCENARIO_API_SECRET wins)."
    ),
    latency: float = typer.Option(2.0, "--latency", help="Seconds a job takes."),
    latency_spread: float = typer.Option(
        0.0, "--latency-spread", help="Uniform +- seconds added to each job's latency."
    ),
    rtt: float = typer.Option(
        0.0, "--rtt", help="Seconds of network round trip added to every API and CDN request."
    ),
    failure_rate: float = typer.Option(
        0.0, "--failure-rate", help="Share of jobs that fail (0..1)."
    ),
    fail_prompt: list[str] = typer.Option(
        [], "--fail-prompt", help="Jobs whose prompt contains this text fail (repeatable)."
    ),
    missing_model: list[str] = typer.Option(
        [], "--missing-model", help="Model id answered with 404 (repeatable)."
    ),
    url_ttl: float = typer.Option(
        3600.0, "--url-ttl", help="Seconds a signed asset URL stays valid."
    ),
    rate_limit: float | None = typer.Option(
        None, "--rate-limit", help="Requests per second (token bucket); unlimited if unset."
    ),
    rate_burst: int | None = typer.Option(None, "--rate-burst", help="Token bucket size."),
    parallel_jobs: int | None = typer.Option(
        None, "--parallel-jobs", help="Cap on running jobs; unlimited if unset."
    ),
    fault_5xx: float = typer.Option(0.0, "--fault-5xx", help="Share of API calls → 5xx."),
    fault_drop: float = typer.Option(
        0.0, "--fault-drop", help="Share of API calls processed, then closed unanswered."
    ),
    fault_expired: float = typer.Option(
        0.0, "--fault-expired", help="Share of downloads refused with 403 (as if expired)."
    ),
    fault_slow: float = typer.Option(
        0.0, "--fault-slow", help="Share of downloads that stall mid-body."
    ),
    slow_seconds: float = typer.Option(2.0, "--slow-seconds", help="Length of each stall."),
    fault_truncate: float = typer.Option(
        0.0, "--fault-truncate", help="Share of downloads cut off mid-body."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed for reproducible faults."),
    fault_spacing: str = typer.Option(
        "random",
        "--fault-spacing",
        help="random: each request rolls its fault; even: each kind fires on exactly its "
        "share of requests, evenly spaced.",
    ),
    model_type: list[str] = typer.Option(
        [],
        "--model-type",
        help="ID=TYPE: GET /models/ID reports this type (sd-xl-lora, flux.1-lora, ...); "
        "repeatable, added to the demo models.",
    ),
    model_latency: list[str] = typer.Option(
        [],
        "--model-latency",
        help="ID=SECONDS: jobs of this model id or jobType take this long instead of "
        "--latency (repeatable).",
    ),
    limits_access: bool = typer.Option(
        False,
        "--limits-access/--no-limits-access",
        help="Let the key read GET /teams/{teamId}/limits (default: 403, as for many keys).",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request."),
) -> None:
    """Serve a local Scenario-compatible API (under /v1) until Ctrl-C."""
    types = dict(DEFAULT_MODEL_TYPES)
    types.update(_pairs(model_type, "--model-type", str))
    try:
        config = SandboxConfig(
            api_key=os.environ.get("SCENARIO_API_KEY") or key,
            api_secret=os.environ.get("SCENARIO_API_SECRET") or secret,
            latency=latency,
            latency_spread=latency_spread,
            rtt=rtt,
            failure_rate=failure_rate,
            fail_prompts=list(fail_prompt),
            missing_models=list(missing_model),
            url_ttl=url_ttl,
            rate_limit=rate_limit,
            rate_burst=rate_burst,
            parallel_jobs=parallel_jobs,
            fault_5xx_rate=fault_5xx,
            fault_drop_rate=fault_drop,
            fault_expired_rate=fault_expired,
            fault_slow_rate=fault_slow,
            slow_seconds=slow_seconds,
            fault_truncate_rate=fault_truncate,
            seed=seed,
            fault_spacing=fault_spacing,
            model_types=types,
            model_latency=_pairs(model_latency, "--model-latency", float),
            limits_access=limits_access,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    sandbox = Sandbox(config, host=host, port=port, verbose=verbose).start()
    typer.echo(sandbox.url)
    typer.echo(
        f"sandbox: serving the Scenario API at {sandbox.url} (key {config.api_key!r}); "
        "Ctrl-C stops it",
        err=True,
    )
    stopped = threading.Event()
    if threading.current_thread() is threading.main_thread():
        # `docker stop` sends SIGTERM: shut down as cleanly as on Ctrl-C.
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        while not stopped.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()
