"""Tell someone how the night went: a webhook POST at the end of runs (PIPELINE_NOTIFY_URL).

    summary(reports, galleries)   the JSON body: a Slack-compatible `text` + structured fields
    post(url, payload)            one POST (one more on a dropped connection or a 5xx),
                                  ~5 s timeout; never raises, never logs the URL's path
    NotifyingSweeper              a Sweeper that announces scheduled runs as they finish

A webhook URL is itself a credential (Slack's carries a token in its path): only its host
is ever logged. The body holds what the run document holds, never a setting.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from pipeline import reports as run_reports
from pipeline.stages import Sweeper, TickReport

logger = logging.getLogger(__name__)

TIMEOUT = 5.0
MAX_FAILURES_SHOWN = 10
SCHEDULED_TRIGGER = "schedule"


def _cut(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summary(
    reports: Sequence[Mapping[str, Any]], galleries: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The webhook body for one or more finished runs."""
    galleries = galleries or {}
    totals = {"total": 0, "succeeded": 0, "failed": 0, "skipped": 0, "canceled": 0}
    cost = 0.0
    runs = []
    lines = []
    for report in reports:
        counts = report["counts"]
        for key in totals:
            totals[key] += int(counts.get(key, 0))
        cost += float(report.get("creative_units") or 0.0)
        failures = [
            {
                "item": item["id"],
                "status": item["status"],
                "error": item.get("error"),
                "hint": item.get("hint"),
            }
            for item in report["items"]
            if item["status"] in ("failed", "canceled")
        ]
        gallery = galleries.get(report["run_id"])
        runs.append(
            {
                "run_id": report["run_id"],
                "manifest": report["manifest"]["name"],
                "status": report["status"],
                "counts": dict(counts),
                "creative_units": report.get("creative_units"),
                "error": report.get("error"),
                "failures": failures,
                "gallery": gallery,
            }
        )
        mark = ":white_check_mark:" if report["status"] == "succeeded" else ":x:"
        lines.append(
            f"{mark} *{report['manifest']['name']}* `{report['run_id']}` {report['status']}: "
            f"{counts.get('succeeded', 0)} succeeded, {counts.get('skipped', 0)} skipped, "
            f"{counts.get('failed', 0)} failed, {counts.get('canceled', 0)} canceled "
            f"of {counts.get('total', 0)} · {report.get('creative_units') or 0} CU"
        )
        if report.get("error"):
            lines.append(f"    run error: {_cut(report['error'])}")
        for failure in failures[:MAX_FAILURES_SHOWN]:
            lines.append(
                f"    • {failure['item']} ({failure['status']}): {_cut(failure['error'] or '')}"
            )
        if len(failures) > MAX_FAILURES_SHOWN:
            lines.append(f"    … and {len(failures) - MAX_FAILURES_SHOWN} more")
        if gallery:
            lines.append(f"    gallery: {gallery}")
    status = "succeeded" if all(r["status"] == "succeeded" for r in reports) else "failed"
    head = (
        f"scenario-pipeline: {len(reports)} run(s) {status} · {totals['succeeded']} succeeded, "
        f"{totals['skipped']} skipped, {totals['failed']} failed, {totals['canceled']} canceled "
        f"of {totals['total']} · {round(cost, 4)} CU"
    )
    return {
        "text": "\n".join([head, *lines]),
        "status": status,
        "counts": totals,
        "creative_units": round(cost, 4),
        "runs": runs,
    }


def post(url: str, payload: Mapping[str, Any], *, timeout: float = TIMEOUT) -> bool:
    """POST the payload; True when the webhook took it. Never raises, logs one line."""
    host = urlsplit(url).netloc.rpartition("@")[2] or "the webhook"
    problem = ""
    for _attempt in range(2):  # one retry, only for what a retry can fix
        try:
            response = httpx.post(url, json=dict(payload), timeout=timeout, follow_redirects=False)
        except httpx.TimeoutException:
            problem = f"no answer within {timeout:g} s"
            break  # a slow webhook is not asked again: the run has waited enough
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}"
            continue
        except Exception as exc:  # a notification must never fail the run
            problem = f"{type(exc).__name__}"
            break
        if response.is_success:
            logger.info("notified %s (HTTP %d)", host, response.status_code)
            return True
        problem = f"HTTP {response.status_code}"
        if response.status_code < 500:
            break
    logger.warning("notification to %s failed: %s (the run is not affected)", host, problem)
    return False


def notify(url: str | None, reports: Sequence[Mapping[str, Any]], **kwargs: Any) -> bool:
    """Post the summary of `reports` when a URL is configured."""
    if not url or not reports:
        return False
    try:
        payload = summary(reports, kwargs.get("galleries"))
    except Exception as exc:  # pragma: no cover - a report missing a field
        logger.warning("could not build the notification: %s", type(exc).__name__)
        return False
    return post(url, payload, timeout=kwargs.get("timeout", TIMEOUT))


class NotifyingSweeper(Sweeper):
    """A sweeper that posts the summary of each scheduled run it sees finish.

    Runs started by hand with `--wait` notify from their own process, so only runs the
    schedule started (trigger `schedule`) are announced here; the POST happens on its own
    thread so a slow webhook never holds up sweeping.
    """

    def __init__(self, ctx: Any, api_url: str, notify_url: str) -> None:
        super().__init__(ctx, api_url)
        self.notify_url = notify_url

    def tick(self) -> TickReport:
        report = super().tick()
        if report.finished_runs:
            try:
                docs = [run_reports.run_report(self.ctx.repo, r) for r in report.finished_runs]
                scheduled = [d for d in docs if d and d.get("trigger") == SCHEDULED_TRIGGER]
            except Exception as exc:  # the database hiccuped: no notification, no crash
                logger.warning("could not read finished runs to notify: %s", exc)
                scheduled = []
            if scheduled:
                threading.Thread(
                    target=notify,
                    args=(self.notify_url, scheduled),
                    name="pipeline-notify",
                    daemon=True,
                ).start()
        return report
