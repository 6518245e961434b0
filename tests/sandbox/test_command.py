"""`pipeline sandbox` as a user runs it: a foreground server printing its URL, Ctrl-C stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
# The lead's CLI registers the same function with app.command("sandbox").
LAUNCH = (
    "import typer; from pipeline.sandbox.command import sandbox_command; "
    "app = typer.Typer(); app.command('sandbox')(sandbox_command); app()"
)


def serve(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("SCENARIO_API_KEY", "SCENARIO_API_SECRET")
    }
    full_env.update(env or {})
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url:
        proc.kill()
        pytest.fail(f"no URL printed: {proc.communicate()[1]}")
    return proc, url


def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=10)


def test_serves_until_interrupted_with_the_given_options() -> None:
    proc, url = serve(
        "--key",
        "k1",
        "--secret",
        "s1",
        "--latency",
        "0.05",
        "--missing-model",
        "model_gone",
        "--parallel-jobs",
        "3",
    )
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        assert httpx.get(f"{url}/models/model_a", auth=("k1", "s1")).status_code == 200
        assert httpx.get(f"{url}/models/model_gone", auth=("k1", "s1")).status_code == 404
        config = httpx.get(url.removesuffix("/v1") + "/_sandbox/config").json()
        assert config["latency"] == 0.05 and config["parallel_jobs"] == 3
    finally:
        assert stop(proc) == 0


def test_environment_credentials_win_over_flags() -> None:
    proc, url = serve(
        "--key",
        "flag",
        "--secret",
        "flag",
        env={"SCENARIO_API_KEY": "envkey", "SCENARIO_API_SECRET": "envsecret"},
    )
    try:
        assert httpx.get(f"{url}/models/m", auth=("envkey", "envsecret")).status_code == 200
        assert httpx.get(f"{url}/models/m", auth=("flag", "flag")).status_code == 401
    finally:
        stop(proc)


def test_default_credentials_are_sandbox_sandbox_and_sigterm_stops_cleanly() -> None:
    proc, url = serve()
    try:
        assert httpx.get(f"{url}/models/m", auth=("sandbox", "sandbox")).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
        assert proc.wait(timeout=10) == 0


def test_model_types_latencies_and_limits_access_flags() -> None:
    proc, url = serve(
        "--model-type",
        "model_style=flux.1-lora",
        "--model-latency",
        "upscale=0.25",
        "--model-latency",
        "model_slow=9",
        "--limits-access",
    )
    try:
        auth = ("sandbox", "sandbox")
        model = httpx.get(f"{url}/models/model_style", auth=auth).json()["model"]
        assert model["type"] == "flux.1-lora"
        demo = httpx.get(f"{url}/models/model_sandbox-sdxl-lora", auth=auth).json()["model"]
        assert demo["type"] == "sd-xl-lora"  # the demo models stay
        config = httpx.get(url.removesuffix("/v1") + "/_sandbox/config").json()
        assert config["model_latency"] == {"upscale": 0.25, "model_slow": 9.0}
        assert config["limits_access"] is True
        team = httpx.get(f"{url}/teams", auth=auth).json()["teams"][0]["id"]
        assert httpx.get(f"{url}/teams/{team}/limits", auth=auth).status_code == 200
    finally:
        assert stop(proc) == 0


@pytest.mark.parametrize(
    "args",
    [
        ("--model-type", "model_x"),
        ("--model-type", "model_x=sd-3"),
        ("--model-latency", "upscale=soon"),
        ("--model-latency", "upscale=inf"),
    ],
)
def test_bad_model_flags_are_usage_errors_without_a_traceback(args: tuple[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SCENARIO_API_KEY",)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", LAUNCH, "--port", "0", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr and ("model" in done.stderr or "ID=" in done.stderr)
