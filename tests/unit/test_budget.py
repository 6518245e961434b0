"""Budget reservations: atomic, so concurrent workers never reserve past the budget."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import select

from pipeline import budget, db
from pipeline.models import RunRow
from pipeline.repository import Repository


def _run(tmp_path: Path, cap: float | None) -> tuple[Repository, str]:
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    db.upgrade(url)
    repo = Repository(db.make_engine(url))
    run_id = repo.record_run(
        manifest_name="m",
        manifest_path="m.yaml",
        manifest_sha256="0" * 64,
        manifest_body="",
        items=[],
        storage_url="file:///tmp/x",
        api_host=None,
        budget=cap,
    )
    return repo, run_id


def _row(repo: Repository, run_id: str) -> RunRow:
    with repo.session() as s:
        row = s.execute(select(RunRow).where(RunRow.id == run_id)).scalar_one()
        s.expunge(row)
        return row


def test_many_workers_reserve_at_most_the_budget(tmp_path: Path) -> None:
    repo, run_id = _run(tmp_path, 17.0)
    won: list[bool] = []
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        won.append(budget.reserve(repo, run_id, 5.0))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False] * 5 + [True] * 3
    assert _row(repo, run_id).reserved_cu == 15.0


def test_settle_counts_the_billed_cost_and_release_frees_a_refused_post(tmp_path: Path) -> None:
    repo, run_id = _run(tmp_path, 10.0)
    assert budget.reserve(repo, run_id, 4.0) and budget.reserve(repo, run_id, 4.0)
    assert not budget.reserve(repo, run_id, 4.0)  # 8 reserved + 4 > 10
    budget.settle(repo, run_id, 4.0, 3.0)  # billed less than priced
    budget.release(repo, run_id, 4.0)  # a 429: nothing billed
    row = _row(repo, run_id)
    assert (row.spent_cu, row.reserved_cu) == (3.0, 0.0)
    assert budget.reserve(repo, run_id, 7.0)
    assert not budget.reserve(repo, run_id, 0.5)


def test_a_run_without_a_budget_reserves_nothing(tmp_path: Path) -> None:
    repo, run_id = _run(tmp_path, None)
    assert budget.run_budget(repo, run_id) is None
    assert not budget.reserve(repo, run_id, 1.0)
