"""The package list in pyproject.toml covers the code on disk (a wheel ships all of it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pipeline import db

ROOT = Path(__file__).resolve().parents[2]


def test_every_subpackage_on_disk_is_listed_for_the_wheel() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "pipeline").rglob("__init__.py")
    }
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"
    assert config["package-dir"]["pipeline.migrations"] == "migrations"
    assert (ROOT / "migrations" / "__init__.py").is_file()


def test_the_migrations_are_found_from_a_checkout_and_have_a_head() -> None:
    assert (db.migrations_dir() / "env.py").is_file()
    assert db.head_revision()
