"""`db.insert_many` (the bulk path of recording a run) stores what Core's insert stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError

from pipeline import db
from pipeline.models import ItemRow, ItemStatus, ManifestRow, RunRow, RunStatus
from pipeline.repository import ITEMS

COLUMNS = ("manifest_item_id", "item_key", "prompt", "params", "recipe", "status", "finished_at")
NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = (
        f"sqlite:///{tmp_path / 'lineage.db'}"
        if request.param == "sqlite"
        else str(request.getfixturevalue("postgres_database"))
    )
    db.upgrade(url)
    engine = db.make_engine(url)
    with engine.begin() as conn:
        manifest = conn.execute(
            insert(ManifestRow).values(name="m", path="m.yaml", sha256="0" * 64, body="")
        ).inserted_primary_key[0]
        for run in ("core", "bulk"):
            conn.execute(
                insert(RunRow).values(
                    id=run,
                    manifest_id=manifest,
                    trigger="run",
                    status=RunStatus.RUNNING,
                    storage_url="file:///tmp",
                    created_at=NOW,
                )
            )
    yield engine
    engine.dispose()


def rows(count: int) -> list[tuple[Any, ...]]:
    """Items with text to escape, nested JSON, floats, a status and a time or none."""
    return [
        (
            f"item-{n}",
            f"{n:064x}",
            None if n == 3 else f'a "quoted"\tprompt\\ with é and\nlines {n}',
            {"width": 256, "guidance": 3.5, "loras": [{"id": "x", "scale": 0.5}], "n": None},
            {"steps": [], "output": "{manifest}/{item}/{index}.{ext}"},
            ItemStatus.SKIPPED if n % 2 else ItemStatus.PENDING,
            NOW + timedelta(seconds=n) if n % 2 else None,
        )
        for n in range(count)
    ]


def stored(engine: Any, run: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        found = conn.execute(
            select(*(ItemRow.__table__.c[c] for c in (*COLUMNS, "seed", "created_at")))
            .where(ItemRow.run_id == run)
            .order_by(ItemRow.id)
        ).all()
        raw = conn.execute(
            text("SELECT params, created_at FROM items WHERE run_id = :run ORDER BY id"),
            {"run": run},
        ).all()
    return [(*row, str(r.params), str(r.created_at)) for row, r in zip(found, raw, strict=True)]


def test_bulk_rows_read_back_exactly_as_core_inserted_ones(engine: Any) -> None:
    made = rows(7)
    constants = {"line": 4, "seed": 2**40, "model": "m", "trained_model": None}
    constants |= {"skipped_from_id": None, "created_at": NOW, "updated_at": NOW}
    with engine.begin() as conn:
        core = [dict(zip(COLUMNS, row, strict=True)) | constants for row in made]
        conn.execute(insert(ITEMS), [row | {"run_id": "core"} for row in core])
        db.insert_many(conn, ITEMS, COLUMNS, made, constants | {"run_id": "bulk"}, chunk=3)
    assert stored(engine, "bulk") == stored(engine, "core")
    assert len(stored(engine, "bulk")) == 7


def test_a_column_with_a_python_default_must_be_given(engine: Any) -> None:
    with engine.begin() as conn, pytest.raises(ValueError, match=r"no value for .*updated_at"):
        db.insert_many(conn, ITEMS, COLUMNS, rows(1), {"run_id": "bulk", "seed": 1})


def test_a_failing_bulk_insert_raises_as_any_statement_does(engine: Any) -> None:
    """A driver error (here a run that does not exist) comes out as SQLAlchemy's, which
    the repository translates; nothing of the batch stays."""
    constants = {"line": 4, "seed": 1, "model": "m", "trained_model": None}
    constants |= {"skipped_from_id": None, "created_at": NOW, "updated_at": NOW}
    with pytest.raises(IntegrityError), engine.begin() as conn:
        db.insert_many(conn, ITEMS, COLUMNS, rows(2), constants | {"run_id": "missing"})
    assert stored(engine, "missing") == []
