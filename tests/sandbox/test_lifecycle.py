"""Job lifecycle, computed from timestamps: driven through the API layer with a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from scenario_sdk.types import JobRetrieveResponse

from pipeline.sandbox import Sandbox, SandboxConfig

ORDER = ["pending", "queued", "warming-up", "in-progress", "finalizing", "success"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def make(**fields: Any) -> tuple[Sandbox, FakeClock]:
    clock = FakeClock()
    fields.setdefault("latency", 10.0)
    return Sandbox(SandboxConfig(**fields), clock=clock), clock


def submit(sb: Sandbox, **body: Any) -> str:
    body.setdefault("prompt", "a shield")
    body.setdefault("width", 64)
    body.setdefault("height", 64)
    status, doc = sb.api.generate("model_bfl-flux-2-dev", body, dry_run=False)
    assert status == 200
    return str(doc["job"]["jobId"])


def job(sb: Sandbox, job_id: str) -> dict[str, Any]:
    doc = sb.api.get_job(job_id)[1]
    JobRetrieveResponse.model_validate(doc, strict=True)
    return dict(doc["job"])


def test_job_walks_all_six_statuses_with_growing_progress() -> None:
    sb, clock = make()
    job_id = submit(sb)
    seen: list[str] = []
    progress: list[float] = []
    for _ in range(105):
        doc = job(sb, job_id)
        if not seen or seen[-1] != doc["status"]:
            seen.append(doc["status"])
        progress.append(doc["progress"])
        clock.now += 0.1
    assert seen == ORDER
    assert progress == sorted(progress)
    assert progress[0] == 0 and progress[-1] == 1
    assert any(0 < p < 0.95 for p in progress)
    final = job(sb, job_id)
    assert [h["status"] for h in final["statusHistory"]] == ORDER
    assert final["updatedAt"] == final["statusHistory"][-1]["date"]
    assert len(final["metadata"]["assetIds"]) == 1


def test_latency_spread_is_uniform_seconds_around_latency() -> None:
    sb, _ = make(latency=10.0, latency_spread=4.0, seed=7)
    ids = [submit(sb, seed=i) for i in range(200)]
    durations = [sb.store.jobs[i].duration for i in ids]
    assert 6.0 <= min(durations) < 7.0 and 13.0 < max(durations) <= 14.0


def test_canceled_job_keeps_the_state_it_was_canceled_in() -> None:
    sb, clock = make()
    job_id = submit(sb)
    clock.now += 5.0  # in progress
    before = job(sb, job_id)
    assert before["status"] == "in-progress"
    status, doc = sb.api.cancel_job(job_id, {"action": "cancel"})
    assert status == 200 and doc["job"]["status"] == "canceled"
    clock.now += 60.0
    after = job(sb, job_id)
    assert after["status"] == "canceled"
    assert "assetIds" not in after["metadata"]
    assert after["progress"] == pytest.approx(before["progress"], abs=0.01)
    assert [h["status"] for h in after["statusHistory"]] == [*ORDER[:4], "canceled"]
    again = sb.api.cancel_job(job_id, {"action": "cancel"})[1]["job"]  # a retried cancel
    assert again["statusHistory"] == after["statusHistory"]


def test_cancel_of_a_finished_job_is_refused() -> None:
    sb, clock = make()
    job_id = submit(sb)
    clock.now += 11.0
    with pytest.raises(Exception, match="already success"):
        sb.api.cancel_job(job_id, {"action": "cancel"})


def test_failed_job_carries_error_and_hint_and_no_assets() -> None:
    sb, clock = make(fail_prompts=["cursed"])
    job_id = submit(sb, prompt="a cursed sword")
    clock.now += 11.0
    doc = job(sb, job_id)
    assert doc["status"] == "failure"
    assert "cursed" in doc["metadata"]["error"] and doc["metadata"]["hint"]
    assert "assetIds" not in doc["metadata"]
    assert "finalizing" not in [h["status"] for h in doc["statusHistory"]]


def test_failure_rate_fails_about_that_share_of_jobs() -> None:
    sb, clock = make(failure_rate=0.3, seed=3)
    ids = [submit(sb, seed=i) for i in range(400)]
    clock.now += 11.0
    failed = sum(job(sb, i)["status"] == "failure" for i in ids)
    assert 0.2 * 400 <= failed <= 0.4 * 400


def test_metadata_input_echoes_the_request_and_cost_follows_outputs() -> None:
    sb, _ = make()
    one = job(sb, submit(sb, numOutputs=1, seed=5, modelId="model_trainedStyle01"))
    four = job(sb, submit(sb, numOutputs=4, seed=5))
    assert one["metadata"]["input"]["seed"] == 5
    assert one["metadata"]["input"]["modelId"] == "model_trainedStyle01"
    assert four["billing"]["cuCost"] == 4 * one["billing"]["cuCost"]


def test_duplicates_count_only_repeats_of_jobs_that_did_not_fail() -> None:
    sb, clock = make(fail_prompts=["cursed"])
    submit(sb, prompt="a cursed sword", seed=1)
    clock.now += 11.0
    submit(sb, prompt="a cursed sword", seed=1)  # retry after a failure: not a duplicate
    submit(sb, prompt="a fine sword", seed=1)
    submit(sb, prompt="a fine sword", seed=1)  # paid twice
    stats = sb.stats()
    assert stats["duplicate_submissions"] == 1
    assert sorted(stats["submissions"].values()) == [2, 2]
    assert stats["jobs_created"] == 4


def test_ids_are_shaped_like_the_real_ones() -> None:
    sb, _ = make(latency=0.0)
    doc = job(sb, submit(sb))
    assert doc["jobId"].startswith("job_") and len(doc["jobId"]) == 4 + 25
    asset_id = doc["metadata"]["assetIds"][0]
    assert asset_id.startswith("asset_") and len(asset_id) == 6 + 22
    assert asset_id[6:].isalnum() and doc["jobId"][4:].isalnum()
