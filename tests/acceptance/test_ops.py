"""Acceptance: CI-shaped runs (several manifests, --junit, --json errors) and `pipeline cancel`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import xmlschema

from pipeline.sandbox import Sandbox
from tests.acceptance.conftest import PIPELINE, Cli, write_manifest

SCHEMA = Path(__file__).resolve().parents[1] / "junit.xsd"

ICONS = """\
name: ops-icons
model: model_bfl-flux-2-dev
seed: 42
params: {numOutputs: 1, width: 64, height: 64}
output: "{manifest}/{item}/{index}.{ext}"
items:
  - id: iron-sword
    prompt: "iron sword icon"
  - id: oak-shield
    prompt: "cursed oak shield icon"
"""

SPRITES = """\
name: ops-sprites
model: model_bfl-flux-2-dev
seed: 7
params: {numOutputs: 1, width: 64, height: 64}
output: "{manifest}/{item}/{index}.{ext}"
items:
  - id: hero
    prompt: "hero sprite"
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Hook:
    """A webhook on loopback that keeps what it is sent."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hook.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0/s3cr3t"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_folder_runs_one_run_per_manifest_with_the_worst_exit_code_junit_and_notice(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    write_manifest(folder, ICONS, "a-icons.yaml")
    write_manifest(folder, SPRITES, "b-sprites.yml")
    sandbox.configure(fail_prompts=["cursed"], api_key="key-7f3a9", api_secret="secret-c41d2")
    cli.env.update(SCENARIO_API_KEY="key-7f3a9", SCENARIO_API_SECRET="secret-c41d2")
    hook = Hook()
    try:
        result = cli(
            "run",
            "manifests",
            "--wait",
            "--json",
            "--junit",
            "out/junit.xml",
            PIPELINE_NOTIFY_URL=hook.url,
        )
    finally:
        hook.close()
    assert result.code == 1, result.stderr
    doc = result.json()
    assert doc["exit_code"] == 1
    runs = {r["manifest"]["name"]: r for r in doc["runs"]}
    assert [r["manifest"]["name"] for r in doc["runs"]] == ["ops-icons", "ops-sprites"]
    assert runs["ops-icons"]["status"] == "failed" and runs["ops-sprites"]["status"] == "succeeded"
    assert len({r["run_id"] for r in doc["runs"]}) == 2

    xml = (tmp_path / "out" / "junit.xml").read_text()
    xmlschema.XMLSchema(str(SCHEMA)).validate(xml)
    suites = {s.get("name"): s for s in ET.fromstring(xml).findall("testsuite")}
    assert set(suites) == {"ops-icons", "ops-sprites"}
    props = {p.get("name"): p.get("value") for p in suites["ops-icons"].iter("property")}
    assert props["run_id"] == runs["ops-icons"]["run_id"]
    cases = {c.get("name"): c for c in suites["ops-icons"].findall("testcase")}
    failed = next(i for i in runs["ops-icons"]["items"] if i["id"] == "oak-shield")
    failure = cases["oak-shield"].find("failure")
    assert failure is not None and failure.get("message") == failed["error"]
    assert failed["hint"] and failure.text == failed["hint"]
    assert cases["iron-sword"].find("failure") is None
    assert float(cases["iron-sword"].get("time") or 0) > 0

    (notice,) = hook.bodies
    assert "oak-shield (failed)" in notice["text"] and failed["error"][:40] in notice["text"]
    assert {r["run_id"] for r in notice["runs"]} == {r["run_id"] for r in doc["runs"]}
    assert "key-7f3a9" not in json.dumps(notice) and "secret-c41d2" not in json.dumps(notice)

    # Again, all stored but the failed item: skipped items pass, with a line saying why; a
    # dead webhook changes nothing but one warning line.
    sandbox.configure(fail_prompts=[])
    again = cli(
        "run",
        "manifests",
        "--wait",
        "--junit",
        "out/junit.xml",
        PIPELINE_NOTIFY_URL=f"http://127.0.0.1:{closed_port()}/hook",
    )
    assert again.code == 0, again.stderr
    assert "Traceback" not in again.stderr and "notification" in again.stderr
    suites = {s.get("name"): s for s in ET.parse(tmp_path / "out" / "junit.xml").iter("testsuite")}
    sprite = suites["ops-sprites"].find("testcase")
    assert sprite is not None and sprite.find("skipped") is None
    assert "already stored" in (sprite.findtext("system-out") or "")


def test_one_invalid_manifest_records_nothing_and_says_so_in_one_json_document(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    write_manifest(tmp_path, ICONS, "good.yaml")
    bad = write_manifest(tmp_path, SPRITES.replace("seed: 7", "seed: seven"), "bad.yaml")
    result = cli("run", "good.yaml", "bad.yaml", "--wait", "--json")
    assert result.code == 2
    doc = result.json()  # exactly one document on stdout
    assert doc["exit_code"] == 2 and doc["error"]["code"] == "invalid_input"
    assert doc["error"]["problems"] and all(
        p.startswith(f"{bad.name}:") or p.startswith(str(bad)) for p in doc["error"]["problems"]
    )
    assert "seed" in doc["error"]["problems"][0]
    assert sandbox.stats()["jobs_created"] == 0
    status = cli("status", "--json")  # nothing recorded: not even the valid manifest's run
    assert status.code == 1 and status.json()["error"]["code"] == "not_found"


def test_json_error_documents_for_an_unreachable_api_and_unknown_runs(
    cli: Cli, tmp_path: Path
) -> None:
    write_manifest(tmp_path, ICONS)
    down = cli(
        "run", "batch.yaml", "--json", SCENARIO_API_URL=f"http://127.0.0.1:{closed_port()}/v1"
    )
    assert down.code == 4
    assert down.json()["error"]["code"] == "unreachable" and down.json()["exit_code"] == 4
    assert "Traceback" not in down.stderr

    retried = cli("retry", "run_nope", "--json")
    assert retried.code == 2
    assert retried.json() == {
        "error": {
            "code": "not_found",
            "message": "error: no run run_nope",
            "problems": ["error: no run run_nope"],
        },
        "exit_code": 2,
    }
    canceled = cli("cancel", "run_nope", "--json")
    assert canceled.code == 2 and canceled.json()["error"]["code"] == "not_found"
    canceled = cli("cancel", "run_nope")
    assert canceled.code == 2 and canceled.stdout == ""
    assert canceled.stderr.strip() == "error: no run run_nope"

    usage = cli("run", "--json", "--no-such-option")
    assert usage.code == 2 and usage.json()["error"]["code"] == "usage"
    bad_setting = cli("run", "batch.yaml", "--json", PIPELINE_SCHEDULE="0 2 * *")
    assert bad_setting.code == 2
    assert bad_setting.json()["error"]["code"] == "configuration"
    assert "PIPELINE_SCHEDULE" in bad_setting.json()["error"]["message"]


def test_cancel_stops_a_waited_run_and_its_jobs_on_scenario(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox.configure(latency=60.0)
    write_manifest(tmp_path, ICONS.replace("cursed ", ""))
    waiting = subprocess.Popen(
        [
            str(PIPELINE) if PIPELINE.exists() else sys.executable,
            *([] if PIPELINE.exists() else ["-m", "pipeline"]),
            "run",
            "batch.yaml",
            "--wait",
            "--json",
        ],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **cli.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while (
            sandbox.stats()["jobs"].get("in-progress", 0) + sandbox.stats()["jobs"].get("queued", 0)
            < 2
        ):
            assert waiting.poll() is None, waiting.communicate()
            assert time.monotonic() < deadline, sandbox.stats()["jobs"]
            time.sleep(0.2)
        run_id = cli("status", "--json").json()["run_id"]
        canceled = cli("cancel", run_id, "--reason", "stopped by the night shift")
        assert canceled.code == 0, canceled.stderr
        assert canceled.stdout.strip() == run_id
        out, errors = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 1, errors
    doc = json.loads(out)
    assert doc["run_id"] == run_id and doc["status"] == "canceled"
    assert {i["status"] for i in doc["items"]} == {"canceled"}
    assert all("stopped by the night shift" in (i["error"] or "") for i in doc["items"])
    assert sandbox.stats()["jobs"]["canceled"] == 2
    again = cli("cancel", run_id)
    assert again.code == 0 and "already canceled" in again.stderr


def test_the_scheduled_task_records_a_run_per_manifest_like_pipeline_run(
    cli: Cli, tmp_path: Path, monkeypatch: Any
) -> None:
    from pipeline.schedule import start_scheduled_runs

    folder = tmp_path / "nightly"
    folder.mkdir()
    write_manifest(folder, ICONS.replace("cursed ", ""), "icons.yaml")
    write_manifest(folder, SPRITES, "sprites.yaml")
    for name, value in cli.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    assert start_scheduled_runs(str(folder), timeout=120) == 0
    latest = cli("status", "--json").json()
    assert latest["trigger"] == "schedule" and latest["status"] == "succeeded"
    assert latest["manifest"]["name"] in ("ops-icons", "ops-sprites")
