"""The nightly schedule in Celery's own terms: a beat entry built from settings.

    PIPELINE_SCHEDULE="0 2 * * *"             a crontab expression (minute hour day month weekday)
    PIPELINE_SCHEDULE_MANIFESTS=manifests     the folder whose *.yaml/*.yml manifests run

`pipeline scheduler` (or `celery -A pipeline.celery_app beat`) sends the `pipeline.scheduled`
task at those times; a worker runs it, which starts `pipeline run FOLDER --trigger schedule`:
the very code path of a run started by hand (every manifest validated before any run is
recorded), in its own process so the worker's own state is untouched. The workers then
process the runs; a sweeper with PIPELINE_NOTIFY_URL announces each as it finishes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import Celery
from celery.schedules import crontab

from pipeline.errors import ConfigError

logger = logging.getLogger(__name__)

TASK = "pipeline.scheduled"
ENTRY = "pipeline-nightly"
FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
#: A run of the whole folder only records and enqueues (the workers do the work).
START_TIMEOUT = 600.0


def parse_crontab(expression: str) -> crontab:
    """A Celery crontab from a five-field crontab expression; ValueError says what is wrong."""
    fields = expression.split()
    if len(fields) != len(FIELDS):
        raise ValueError(
            f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}"
        )
    spec = dict(zip(FIELDS, fields, strict=True))
    try:
        # Some impossible dates ("31 2") only show when Celery computes the next time: ask
        # it, on a private app (the real one reads these settings while configuring itself).
        check = crontab(**spec, app=_checking_app())
        check.remaining_estimate(datetime.now(UTC))
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None
    return crontab(**spec)


_checker: Celery | None = None


def _checking_app() -> Celery:
    global _checker
    if _checker is None:
        _checker = Celery("pipeline-schedule-check", set_as_current=False)
        _checker.conf.update(timezone="UTC", enable_utc=True)
    return _checker


def crontab_problem(expression: str) -> str | None:
    try:
        parse_crontab(expression)
    except ValueError as exc:
        return f"not a crontab expression: {exc}"
    return None


def manifests_folder(settings: Any) -> Path:
    """The folder of the scheduled manifests, or a ConfigError naming the variable."""
    folder = Path(settings.schedule_manifests)
    if not folder.is_dir():
        raise ConfigError(
            f"PIPELINE_SCHEDULE_MANIFESTS={settings.schedule_manifests}: not a folder "
            f"(from {Path.cwd()})"
        )
    if not any(p.suffix in (".yaml", ".yml") for p in folder.iterdir()):
        raise ConfigError(
            f"PIPELINE_SCHEDULE_MANIFESTS={settings.schedule_manifests}: no *.yaml or *.yml "
            "manifest in this folder"
        )
    return folder


def beat_schedule(settings: Any) -> dict[str, dict[str, Any]]:
    """Celery's `beat_schedule` for the settings (empty without PIPELINE_SCHEDULE)."""
    if not settings.schedule:
        return {}
    return {
        ENTRY: {
            "task": TASK,
            "schedule": parse_crontab(settings.schedule),
            "args": [str(Path(settings.schedule_manifests).resolve())],
            "options": {"queue": "pipeline", "expires": 3600},
        }
    }


def start_scheduled_runs(folder: str, timeout: float = START_TIMEOUT) -> int:
    """Record one run per manifest in `folder`, as `pipeline run FOLDER` does; its exit code.

    An invalid manifest anywhere records nothing (exit 2, logged with its problems).
    """
    command = [sys.executable, "-m", "pipeline", "run", folder, "--trigger", "schedule"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        logger.error("scheduled runs of %s: `pipeline run` did not finish in %g s", folder, timeout)
        return 4
    for line in done.stderr.splitlines():
        logger.log(logging.INFO if done.returncode == 0 else logging.ERROR, "schedule: %s", line)
    for run_id in done.stdout.split():
        logger.info("schedule: started %s", run_id)
    return done.returncode
