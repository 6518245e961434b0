"""JUnit XML for CI dashboards: one testsuite per run, one testcase per item.

The document follows the common Jenkins/Ant JUnit schema (tests/junit.xsd):

    <testsuites name="scenario-pipeline" tests= failures= errors= skipped= time=>
      <testsuite name=MANIFEST id= tests= failures= errors= skipped= time= timestamp=>
        <properties><property name="run_id" value=.../>...</properties>
        <testcase classname=MANIFEST name=ITEM time=SECONDS>
          <failure message="Scenario's error" type="failed">the hint</failure>   a failed item
          <skipped message="the reason"/>                                      a canceled item
          <system-out>skipped: outputs already stored ...</system-out>         a skipped item
        </testcase>

An item the pipeline skipped (its outputs were already stored) passed: nothing had to be
done. An item still unfinished (the run was stopped) is an `error`.
"""

from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

SUITES_NAME = "scenario-pipeline"


def _seconds(value: Any) -> str:
    return f"{float(value or 0.0):.3f}"


def _clean(text: Any) -> str:
    """XML 1.0 cannot carry most control characters, even escaped: drop them."""
    return "".join(
        c for c in str(text) if c in "\t\n\r" or (ord(c) >= 0x20 and ord(c) not in (0xFFFE, 0xFFFF))
    )


def _testcase(suite: ET.Element, manifest: str, item: dict[str, Any]) -> dict[str, int]:
    case = ET.SubElement(
        suite,
        "testcase",
        {
            "classname": manifest,
            "name": _clean(item["id"]),
            "time": _seconds(item.get("duration_seconds")),
        },
    )
    status = item.get("status")
    message = _clean(item.get("error") or "")
    if status == "failed":
        failure = ET.SubElement(
            case, "failure", {"message": message or "the item failed", "type": "failed"}
        )
        failure.text = _clean(item.get("hint") or "")
        return {"failures": 1}
    if status == "canceled":
        ET.SubElement(case, "skipped", {"message": message or "canceled"})
        return {"skipped": 1}
    if status == "skipped":
        out = ET.SubElement(case, "system-out")
        out.text = "skipped: outputs already stored by an earlier run (nothing was paid)"
        return {}
    if status != "succeeded":
        ET.SubElement(
            case,
            "error",
            {"message": f"the item did not finish (status {status})", "type": "unfinished"},
        )
        return {"errors": 1}
    return {}


def _wall_seconds(start: Any, end: Any) -> float | None:
    try:
        return max(
            0.0, (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
        )
    except (TypeError, ValueError):
        return None


def _testsuite(root: ET.Element, report: dict[str, Any]) -> dict[str, float]:
    manifest = _clean(report["manifest"]["name"])
    items = report["items"]
    number = str(len(root))
    suite = ET.SubElement(root, "testsuite", {"name": manifest, "id": number})
    props = ET.SubElement(suite, "properties")
    for name, value in (
        ("run_id", report["run_id"]),
        ("status", report["status"]),
        ("manifest_path", report["manifest"].get("path")),
        ("manifest_sha256", report["manifest"].get("sha256")),
        ("creative_units", report.get("creative_units")),
        ("run_error", report.get("error")),
    ):
        if value is not None:
            ET.SubElement(props, "property", {"name": name, "value": _clean(value)})
    totals = {"tests": len(items), "failures": 0, "errors": 0, "skipped": 0}
    time = 0.0
    for item in items:
        for key, n in _testcase(suite, manifest, item).items():
            totals[key] += n
        time += float(item.get("duration_seconds") or 0.0)
    for key, n in totals.items():
        suite.set(key, str(n))
    # Items run in parallel: the suite's time is the run's wall-clock time when known.
    wall = _wall_seconds(report.get("created_at"), report.get("finished_at"))
    time = wall if wall is not None else time
    suite.set("time", _seconds(time))
    if report.get("created_at"):
        # The schema's timestamp is an ISO 8601 date-time without a time zone.
        suite.set("timestamp", str(report["created_at"])[:19])
    suite.set("hostname", "scenario")
    return {**totals, "time": time}


def render(reports: Sequence[dict[str, Any]]) -> str:
    """The JUnit XML document of one or more run reports (`reports.run_report`)."""
    root = ET.Element("testsuites", {"name": SUITES_NAME})
    totals = {"tests": 0.0, "failures": 0.0, "errors": 0.0, "skipped": 0.0, "time": 0.0}
    for report in reports:
        for key, value in _testsuite(root, report).items():
            totals[key] += value
    for key in ("tests", "failures", "errors", "skipped"):
        root.set(key, str(int(totals[key])))
    root.set("time", _seconds(totals["time"]))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write(reports: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write the report atomically (a CI step never reads half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(render(reports))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
