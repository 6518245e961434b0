"""Request-rate and parallel-jobs limits answer 429; the control routes reset and reconfigure."""

from __future__ import annotations

import time
from typing import Any

import httpx

MODEL = "model_bfl-flux-2-dev"
VALID = {"prompt": "a lantern", "width": 64, "height": 64}


def test_request_rate_over_the_bucket_gets_429_with_retry_after(
    make_sandbox: Any, make_kit: Any
) -> None:
    kit = make_kit(make_sandbox(rate_limit=2, rate_burst=5))
    answers = [kit.http.get(f"/models/{MODEL}") for _ in range(20)]
    codes = [a.status_code for a in answers]
    assert codes[:5] == [200] * 5
    refused = [a for a in answers if a.status_code == 429]
    assert len(refused) >= 8
    first = refused[0]
    assert int(first.headers["Retry-After"]) >= 1  # integer seconds, rounded up
    wait_ms = float(first.headers["retry-after-ms"])
    assert 0 < wait_ms <= 1000
    assert first.json()["message"]
    stats = kit.stats()
    assert stats["responses_429"]["rate"] == len(refused)
    assert stats["requests"]["GET /models/{modelId}"] == 20
    time.sleep(wait_ms / 1000 + 0.05)
    assert kit.http.get(f"/models/{MODEL}").status_code == 200


def test_the_bucket_refills_at_the_configured_rate(make_sandbox: Any, make_kit: Any) -> None:
    kit = make_kit(make_sandbox(rate_limit=50, rate_burst=1))
    start = time.monotonic()
    ok = attempts = 0
    while time.monotonic() - start < 0.5:
        attempts += 1
        ok += kit.http.get(f"/models/{MODEL}").status_code == 200
    elapsed = time.monotonic() - start
    assert ok <= 1 + 50 * elapsed + 1  # never more than the rate allows
    assert ok >= 0.5 * min(attempts, 50 * elapsed)  # and it does refill


def test_parallel_jobs_cap_refuses_with_429_naming_the_limit(
    make_sandbox: Any, make_kit: Any
) -> None:
    kit = make_kit(make_sandbox(parallel_jobs=2, latency=30))
    first = kit.generate(prompt="one")
    kit.generate(prompt="two")
    refused = kit.http.post(f"/generate/custom/{MODEL}", json={**VALID, "prompt": "three"})
    assert refused.status_code == 429
    body = refused.json()
    assert body["limit"] == 2 and "(2)" in body["message"]
    assert body["name"] == "ParallelJobsLimitError"
    dry = kit.http.post(f"/generate/custom/{MODEL}", params={"dryRun": "true"}, json=VALID)
    assert dry.status_code == 269  # estimating is not running
    stats = kit.stats()
    assert stats["jobs_created"] == 2 and len(stats["submissions"]) == 2
    assert stats["responses_429"] == {"rate": 0, "parallel": 1}
    kit.http.post(f"/jobs/{first}/action", json={"action": "cancel"}).raise_for_status()
    kit.generate(prompt="three")  # a slot freed up


def test_finished_jobs_free_their_slot(make_sandbox: Any, make_kit: Any) -> None:
    kit = make_kit(make_sandbox(parallel_jobs=1, latency=0.1))
    kit.wait(kit.generate(prompt="one"))
    kit.generate(prompt="two")


def test_reset_clears_everything_and_config_changes_at_runtime(
    make_sandbox: Any, make_kit: Any
) -> None:
    sb = make_sandbox()
    kit = make_kit(sb)
    job_id = kit.generate()
    kit.wait(job_id)
    control = httpx.Client(base_url=sb.base_url + "/_sandbox")
    assert control.get("/stats").json()["jobs_created"] == 1
    assert control.post("/reset").status_code == 200
    stats = control.get("/stats").json()
    assert stats["jobs_created"] == 0 and stats["images"] == {} and stats["requests"] == {}
    assert kit.http.get(f"/jobs/{job_id}").status_code == 404
    changed = control.post("/config", json={"latency": 0.0, "parallel_jobs": 3})
    assert changed.status_code == 200 and changed.json()["parallel_jobs"] == 3
    assert changed.json()["api_secret"] == "***"
    assert sb.config.latency == 0.0
    assert control.post("/config", json={"no_such_field": 1}).status_code == 400
    assert control.post("/config", json={"failure_rate": 2}).status_code == 400
    assert sb.config.failure_rate == 0.0
    control.close()


def test_python_interface_mirrors_the_control_routes(sandbox: Any, kit: Any) -> None:
    kit.generate()
    assert sandbox.stats()["jobs_created"] == 1
    sandbox.reset()
    assert sandbox.stats()["jobs_created"] == 0
    sandbox.configure(missing_models=["model_x"])
    assert kit.http.get("/models/model_x").status_code == 404


def test_the_sdk_waits_out_a_429_using_retry_after_ms(make_sandbox: Any, make_client: Any) -> None:
    # One token every half second: back-to-back calls meet a 429 even on a loaded machine.
    sb = make_sandbox(rate_limit=2, rate_burst=1)
    client = make_client(sb, max_retries=2)
    start = time.monotonic()
    for _ in range(3):
        client.models.retrieve(MODEL)
    assert time.monotonic() - start >= 0.75  # two waits of about 0.5 s each
    assert sb.stats()["responses_429"]["rate"] >= 2
