"""Run notifications: the summary's content, and a webhook that fails or hangs changes nothing."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from pipeline import notify


class Hook:
    """A webhook on loopback that records what it receives and answers as told."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.status = 200
        self.delay = 0.0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                hook.bodies.append(json.loads(self.rfile.read(length)))
                time.sleep(hook.delay)
                try:
                    self.send_response(hook.status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T0/B0/s3cr3t"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    with Hook() as h:
        yield h


def report(status: str = "failed") -> dict[str, Any]:
    return {
        "run_id": "run_20261123T020000_aaaa",
        "manifest": {"name": "forest-icons", "path": "/m.yaml", "sha256": "00"},
        "status": status,
        "error": None,
        "counts": {"total": 3, "succeeded": 1, "failed": 1, "skipped": 0, "canceled": 1},
        "creative_units": 24.5,
        "items": [
            {"id": "sword", "status": "succeeded", "error": None, "hint": None},
            {"id": "shield", "status": "failed", "error": "NSFW content", "hint": "rephrase"},
            {"id": "potion", "status": "canceled", "error": "deadline passed", "hint": None},
        ],
    }


def test_the_summary_has_slack_text_and_structured_fields() -> None:
    body = notify.summary([report()], {"run_20261123T020000_aaaa": "/srv/runs/r.html"})
    text = body["text"]
    assert "1 succeeded" in text and "1 failed" in text and "24.5 CU" in text
    assert "shield (failed): NSFW content" in text
    assert "potion (canceled): deadline passed" in text
    assert "gallery: /srv/runs/r.html" in text
    assert body["status"] == "failed"
    assert body["creative_units"] == 24.5
    (run,) = body["runs"]
    assert run["failures"][0] == {
        "item": "shield",
        "status": "failed",
        "error": "NSFW content",
        "hint": "rephrase",
    }
    assert run["gallery"] == "/srv/runs/r.html"
    ok = notify.summary([report("succeeded")])
    assert ok["status"] == "succeeded"


def test_post_delivers_the_json(hook: Hook) -> None:
    assert notify.notify(hook.url, [report()]) is True
    (body,) = hook.bodies
    assert body["runs"][0]["run_id"] == "run_20261123T020000_aaaa"
    assert body["text"].startswith("scenario-pipeline: 1 run(s) failed")


def test_a_failing_webhook_is_tried_twice_then_logged_without_its_token(
    hook: Hook, caplog: pytest.LogCaptureFixture
) -> None:
    hook.status = 503
    with caplog.at_level(logging.WARNING, logger="pipeline.notify"):
        assert notify.notify(hook.url, [report()]) is False
    assert len(hook.bodies) == 2  # one retry, no more
    assert "HTTP 503" in caplog.text and "s3cr3t" not in caplog.text
    hook.bodies.clear()
    hook.status = 404
    assert notify.notify(hook.url, [report()]) is False
    assert len(hook.bodies) == 1  # a 4xx will not get better


def test_a_slow_webhook_gives_up_at_the_timeout(hook: Hook) -> None:
    hook.delay = 2.0
    started = time.monotonic()
    assert notify.post(hook.url, {"text": "x"}, timeout=0.3) is False
    assert time.monotonic() - started < 1.5
    assert len(hook.bodies) == 1  # a slow webhook is not asked again


def test_a_closed_port_is_not_an_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert notify.post(f"http://127.0.0.1:{port}/hook", {"text": "x"}, timeout=1) is False
    assert notify.notify(None, [report()]) is False


def test_the_sweeper_announces_only_scheduled_runs_when_they_finish(
    hook: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import stages

    docs = {
        "run_a": report() | {"run_id": "run_a", "trigger": "schedule"},
        "run_b": report() | {"run_id": "run_b", "trigger": "run"},  # its --wait notifies
    }
    monkeypatch.setattr(
        stages.Sweeper, "tick", lambda self: stages.TickReport(finished_runs=["run_a", "run_b"])
    )
    monkeypatch.setattr(notify.run_reports, "run_report", lambda repo, run_id: docs[run_id])

    class Ctx:
        repo = None
        wake = threading.Event()

    sweeper = notify.NotifyingSweeper(Ctx(), "http://127.0.0.1:1/v1", hook.url)
    assert sweeper.tick().finished_runs == ["run_a", "run_b"]
    deadline = time.monotonic() + 5
    while not hook.bodies and time.monotonic() < deadline:
        time.sleep(0.05)
    (body,) = hook.bodies
    assert [r["run_id"] for r in body["runs"]] == ["run_a"]

    # A database error while reading the runs costs the notification, not the sweep.
    def broken(repo: Any, run_id: str) -> Any:
        raise RuntimeError("db down")

    monkeypatch.setattr(notify.run_reports, "run_report", broken)
    assert sweeper.tick().finished_runs == ["run_a", "run_b"]
