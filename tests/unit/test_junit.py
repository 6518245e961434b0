"""JUnit XML reports: one testsuite per run, one testcase per item, valid per tests/junit.xsd."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import xmlschema

from pipeline import junit

SCHEMA = Path(__file__).resolve().parents[1] / "junit.xsd"


def item(item_id: str, status: str, **extra: Any) -> dict[str, Any]:
    return {"id": item_id, "status": status, "error": None, "hint": None} | extra


def run_report(run_id: str, name: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "manifest": {"name": name, "path": f"/repo/manifests/{name}.yaml", "sha256": "ab" * 32},
        "status": "failed" if any(i["status"] != "succeeded" for i in items) else "succeeded",
        "created_at": "2026-11-23T02:00:00.500000+00:00",
        "finished_at": "2026-11-23T02:01:30.750000+00:00",
        "error": None,
        "creative_units": 12.5,
        "items": items,
    }


@pytest.fixture(scope="module")
def schema() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(str(SCHEMA))


def test_each_run_is_a_suite_and_each_item_a_case_with_its_outcome(
    schema: xmlschema.XMLSchema,
) -> None:
    reports = [
        run_report(
            "run_1",
            "forest-icons",
            [
                item("iron-sword", "succeeded", duration_seconds=3.25),
                item(
                    "oak-shield",
                    "failed",
                    error="Generation failed: NSFW content detected",
                    hint="Change the prompt",
                    duration_seconds=7.0,
                ),
                item("potion", "canceled", error="the run's deadline passed"),
                item("boots", "skipped", duration_seconds=0.0),
            ],
        ),
        run_report("run_2", "sprites", [item("hero", "succeeded", duration_seconds=1.5)]),
    ]
    text = junit.render(reports)
    schema.validate(text)
    root = ET.fromstring(text)
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("5", "1", "1")
    first, second = root.findall("testsuite")
    assert first.get("name") == "forest-icons" and second.get("name") == "sprites"
    assert first.get("time") == "90.250"  # the run's wall-clock time
    props = {p.get("name"): p.get("value") for p in first.iter("property")}
    assert props["run_id"] == "run_1" and props["creative_units"] == "12.5"
    cases = {c.get("name"): c for c in first.findall("testcase")}
    assert {c.get("classname") for c in cases.values()} == {"forest-icons"}
    assert cases["iron-sword"].get("time") == "3.250" and len(cases["iron-sword"]) == 0
    failure = cases["oak-shield"].find("failure")
    assert failure is not None
    assert failure.get("message") == "Generation failed: NSFW content detected"
    assert failure.text == "Change the prompt"
    skipped = cases["potion"].find("skipped")
    assert skipped is not None and skipped.get("message") == "the run's deadline passed"
    # A pipeline-skipped item (already stored) passed; it says why it did nothing.
    assert cases["boots"].find("skipped") is None and cases["boots"].find("failure") is None
    out = cases["boots"].find("system-out")
    assert out is not None and "already stored" in (out.text or "")


def test_unfinished_items_are_errors_and_control_characters_cannot_break_the_xml(
    schema: xmlschema.XMLSchema,
) -> None:
    report = run_report(
        "run_3",
        "weird",
        [
            item("a", "running"),
            item("b", "failed", error='bad \x00\x1b[31mbyte\x07 <tag> & "quote"', hint=None),
        ],
    )
    report["finished_at"] = None
    text = junit.render([report])
    schema.validate(text)
    cases = ET.fromstring(text).find("testsuite")
    assert cases is not None
    a, b = cases.findall("testcase")
    assert a.find("error") is not None
    failure = b.find("failure")
    assert failure is not None
    assert failure.get("message") == 'bad [31mbyte <tag> & "quote"'


def test_the_schema_rejects_what_ci_tools_would_reject(schema: xmlschema.XMLSchema) -> None:
    # The check is not vacuous: a testcase without a name, or a bad time, is refused.
    with pytest.raises(xmlschema.XMLSchemaValidationError):
        schema.validate(
            '<testsuites><testsuite name="x" tests="1"><testcase/></testsuite></testsuites>'
        )
    with pytest.raises(xmlschema.XMLSchemaValidationError):
        schema.validate(
            '<testsuites><testsuite name="x" tests="1">'
            '<testcase name="a" time="soon"/></testsuite></testsuites>'
        )


def test_write_replaces_the_file_atomically(tmp_path: Path) -> None:
    target = tmp_path / "reports" / "junit.xml"
    junit.write([run_report("run_1", "m", [item("a", "succeeded")])], target)
    assert ET.parse(target).getroot().tag == "testsuites"
    assert [p.name for p in target.parent.iterdir()] == ["junit.xml"]
