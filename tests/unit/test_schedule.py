"""The nightly schedule: crontab expressions, the beat entry, the settings that name them."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery.schedules import crontab

from pipeline import batch, schedule
from pipeline.errors import ConfigError, ManifestError
from pipeline.settings import load_settings


def test_a_crontab_expression_maps_to_celerys_fields_in_crontab_order() -> None:
    parsed = schedule.parse_crontab("30 2 1-7 * mon")
    assert parsed == crontab(
        minute="30", hour="2", day_of_month="1-7", month_of_year="*", day_of_week="mon"
    )
    assert parsed.hour == {2} and parsed.minute == {30} and parsed.day_of_week == {1}


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ("0 2 * *", "expected 5 fields"),
        ("@daily", "expected 5 fields"),
        ("61 2 * * *", "59"),
        ("0 24 * * *", "23"),
        ("0 2 * 13 *", "12"),
        ("0 2 31 2 *", "never occurs"),
        ("0 2 * * funday", "funday"),
    ],
)
def test_invalid_expressions_are_refused_with_the_reason(expression: str, says: str) -> None:
    problem = schedule.crontab_problem(expression)
    assert problem is not None and says in problem


def test_a_bad_schedule_setting_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PIPELINE_SCHEDULE", "0 25 * * *")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("invalid setting PIPELINE_SCHEDULE=0 25 * * *: ")
    assert "\n" not in message


def test_a_bad_notify_url_is_refused_without_showing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_NOTIFY_URL", "hooks.example/T000/B000/s3cr3t-token")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "PIPELINE_NOTIFY_URL" in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_beat_schedule_runs_the_folder_on_the_expression(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PIPELINE_SCHEDULE", "0 2 * * *")
    monkeypatch.setenv("PIPELINE_SCHEDULE_MANIFESTS", str(tmp_path))
    settings = load_settings()
    entries = schedule.beat_schedule(settings)
    (entry,) = entries.values()
    assert entry["task"] == "pipeline.scheduled"
    assert entry["args"] == [str(tmp_path.resolve())]
    assert entry["schedule"] == crontab(minute="0", hour="2")
    with pytest.raises(ConfigError, match="PIPELINE_SCHEDULE_MANIFESTS"):
        schedule.manifests_folder(settings)  # an empty folder: nothing would ever run
    monkeypatch.delenv("PIPELINE_SCHEDULE")
    assert schedule.beat_schedule(load_settings()) == {}


def test_the_task_is_registered_under_the_beat_entrys_name() -> None:
    from pipeline.celery_app import app

    app.loader.import_default_modules()
    assert schedule.TASK in app.tasks


def test_worst_exit_code_of_several_runs() -> None:
    assert batch.worst([]) == 0
    assert batch.worst([0, 0]) == 0
    assert batch.worst([0, 1, 0]) == 1
    assert batch.worst([1, 3]) == 3
    assert batch.worst([3, 2, 1]) == 2
    assert batch.worst([1, 4, 2]) == 4


MANIFEST = "name: {name}\nmodel: model_x\nseed: 1\nitems:\n  - id: a\n    prompt: p\n"


def test_a_folder_means_its_manifests_sorted_and_every_problem_is_reported(
    tmp_path: Path,
) -> None:
    (tmp_path / "b.yml").write_text(MANIFEST.format(name="bee"))
    (tmp_path / "a.yaml").write_text(MANIFEST.format(name="ay"))
    (tmp_path / "notes.txt").write_text("not a manifest")
    (tmp_path / "sub.yaml").mkdir()
    assert [p.name for p in batch.manifest_paths([tmp_path])] == ["a.yaml", "b.yml"]
    assert [m.name for m in batch.load_manifests([tmp_path, tmp_path / "a.yaml"])] == ["ay", "bee"]

    (tmp_path / "c.yaml").write_text(MANIFEST.format(name="ay").replace("seed: 1", "seed: x"))
    (tmp_path / "d.yaml").write_text(MANIFEST.format(name="dee").replace("prompt", "promt"))
    with pytest.raises(ManifestError) as caught:
        batch.load_manifests([tmp_path])
    files = {line.split(":", 1)[0] for line in caught.value.problems}
    assert files == {str(tmp_path / "c.yaml"), str(tmp_path / "d.yaml")}

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestError, match=r"no \*\.yaml"):
        batch.load_manifests([empty])
