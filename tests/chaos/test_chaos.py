"""Chaos: workers SIGKILLed, Redis killed and restarted, every sandbox fault switched on.

The batch is a two-step recipe (generate, then remove the background of each image). In the
end every item is final, every item that can succeed did, nothing was paid for twice at any
step, and the bucket holds exactly the recorded outputs with the bytes Scenario served.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import Cluster, audit, manifest_text

ITEMS = 40


@pytest.mark.slow
def test_nothing_lost_nothing_paid_twice_under_chaos(
    tmp_path: Path, postgres_database: str, s3_server: Any
) -> None:
    bucket = f"chaos-{int(time.time())}"
    s3_server.make_bucket(bucket)
    cluster = Cluster.create(
        tmp_path, database_url=postgres_database, s3_env=s3_server.env, bucket=bucket
    )
    try:
        assert cluster.cli("db", "upgrade").returncode == 0
        for _ in range(3):
            cluster.start_worker()
        (tmp_path / "chaos.yaml").write_text(manifest_text(ITEMS))
        queued = cluster.cli("run", "chaos.yaml", "--json")
        assert queued.returncode == 0, queued.stderr
        run_id = json.loads(queued.stdout)["run_id"]

        time.sleep(2.5)
        cluster.kill_worker(0)
        cluster.start_worker()
        time.sleep(2.0)
        cluster.restart_redis()
        time.sleep(1.0)
        s3_server.stop()  # the bucket goes away for a while: collects must wait, not fail
        cluster.log("S3 server killed")
        time.sleep(2.0)
        s3_server.start()
        cluster.log("S3 server restarted")
        cluster.kill_worker(1)
        time.sleep(1.0)
        graceful = cluster.stop_worker(2)  # SIGTERM: finish in-flight work, then exit
        time.sleep(0.5)
        cluster.start_worker()

        deadline = time.monotonic() + 150
        doc = cluster.status(run_id)
        while doc["status"] == "running" and time.monotonic() < deadline:
            time.sleep(1.0)
            doc = cluster.status(run_id)
        survived_redis_restart = cluster.workers[3].poll() is None
        figures = audit(cluster, doc)
        print("\n".join(cluster.events))
        print(json.dumps(figures, indent=1))
    finally:
        cluster.stop()

    assert graceful == 0, "a SIGTERMed worker exits cleanly"
    assert survived_redis_restart, "a worker lives through a Redis restart"
    assert doc["status"] == "failed", cluster.worker_logs()  # the doomed item, only
    states = {i["id"]: i["status"] for i in doc["items"]}
    assert all(s in ("succeeded", "failed") for s in states.values()), states
    assert [k for k, s in states.items() if s == "failed"] == ["doomed"]
    doomed = next(i for i in doc["items"] if i["id"] == "doomed")
    assert doomed["error"] and doomed["hint"] and doomed["attempts"] == 4
    assert figures["succeeded"] == ITEMS
    assert figures["duplicate_submissions"] == 0
    assert figures["objects"] == ITEMS
    # both steps ran for every item that succeeded, each exactly once per output
    assert figures["jobs_by_model"]["model_photoroom-background-removal"] >= ITEMS
    faults = figures["faults"]
    # Each kind fires on exactly its share of its requests (evenly spaced, see FAULTS). The
    # run makes a few hundred API calls, and at least 43 downloads: one whole download per
    # stored output (40) besides those refused (8% of 43 or more: 3) or cut off (5% of the
    # 40 or more not refused: 2). The run above survived all of them.
    assert faults["5xx"] >= 3 and faults["drop"] >= 3
    assert faults["expired"] >= 3 and faults["truncate"] >= 2
