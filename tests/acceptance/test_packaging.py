"""Acceptance: the pipeline as a wheel installs it, outside the checkout.

The wheel is built from a copy of the files a release ships (so the checkout gets no
build/ or egg-info), installed into a fresh venv in a temp folder, and run from another
folder: `pipeline db upgrade` and the README's first command must work there. The venv
reuses the test environment's installed dependencies through a .pth line (no network);
the `pipeline` package itself comes only from the wheel, which the test checks.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.acceptance.conftest import ROOT

pytestmark = pytest.mark.slow

SHIPPED = ("pyproject.toml", "README.md", "alembic.ini", "pipeline", "migrations")


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a fresh venv holding only the wheel of this checkout."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    source.mkdir()
    for name in SHIPPED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, source / name)
    dist = base / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)],
        base,
        dict(os.environ),
    )
    (wheel,) = dist.glob("scenario_pipeline-*.whl")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base, dict(os.environ))
    python = venv / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        base,
        {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    ).strip()
    # The dependencies already installed for the tests, without their .pth hooks (so the
    # editable install of the checkout is not visible in the new venv).
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(purelib, "_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    install = ["--no-deps", "--no-index", "-q", str(wheel)]
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", *install],
        base,
        dict(os.environ),
    )
    return venv / "bin"


def test_a_wheel_installed_outside_the_checkout_upgrades_the_database_and_runs_the_example(
    installed: Path, tmp_path: Path
) -> None:
    work = tmp_path / "elsewhere"
    shutil.copytree(ROOT / "manifests", work / "manifests")
    env = {"PATH": f"{installed}:/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8"}

    where = _run(
        [str(installed / "python"), "-c", "import pipeline; print(pipeline.__file__)"], work, env
    )
    assert Path(where.strip()).is_relative_to(installed.parent), where
    assert not Path(where.strip()).is_relative_to(ROOT)

    database = work / "lineage.db"
    upgrade_env = {**env, "PIPELINE_DATABASE_URL": f"sqlite:///{database}"}
    _run([str(installed / "pipeline"), "db", "upgrade"], work, upgrade_env)
    with sqlite3.connect(database) as conn:
        (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert revision

    _run(
        [str(installed / "pipeline"), "run", "manifests/example.yaml", "--sandbox", "--wait"],
        work,
        env,
    )
    stored = sorted(p.relative_to(work / "assets") for p in (work / "assets").rglob("*.png"))
    assert [p for p in stored if p.parts[0] == "forest-icons"] == stored
    assert len(stored) == 8  # 2 + 4 + 2 outputs of manifests/example.yaml
    assert (work / "pipeline.db").is_file()
    assert list((work / "runs").glob("*.html"))
