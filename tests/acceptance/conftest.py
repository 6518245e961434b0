"""The real `pipeline` command in a subprocess, against a sandbox on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.sandbox import Sandbox, SandboxConfig

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = Path(sys.executable).with_name("pipeline")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass
class Cli:
    """Runs `pipeline ...` with a clean environment pointing at the test's services."""

    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None  # instead of `pipeline` (e.g. python -c CODE)

    def __call__(self, *args: str, timeout: float = 120, **env: str) -> Result:
        command = self.command or (
            [str(PIPELINE)] if PIPELINE.exists() else [sys.executable, "-m", "pipeline"]
        )
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.cwd),
            "LANG": "C.UTF-8",
            **self.env,
            **env,
        }
        done = subprocess.run(
            [*command, *args],
            cwd=self.cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(SandboxConfig(latency=0.3, seed=7)) as sb:
        yield sb


@pytest.fixture
def cli(tmp_path: Path, sandbox: Sandbox) -> Cli:
    """The CLI on embedded defaults (SQLite, local folder, in-process worker) + the sandbox."""
    return Cli(
        cwd=tmp_path,
        env={
            "SCENARIO_API_URL": sandbox.url,
            "SCENARIO_API_KEY": "sandbox",
            "SCENARIO_API_SECRET": "sandbox",
            "PIPELINE_DATABASE_URL": f"sqlite:///{tmp_path / 'lineage.db'}",
            "PIPELINE_STORAGE_URL": f"file://{tmp_path / 'assets'}",
            "PIPELINE_POLL_INTERVAL": "0.1",
            "PIPELINE_SWEEP_TICK": "0.1",
        },
    )


def write_manifest(directory: Path, text: str, name: str = "batch.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path
