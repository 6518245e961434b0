"""The stages (submit, sweep, collect) on a real database and the sandbox, without Celery.

A queue dispatcher stands in for the broker so each test can decide when a task runs,
run it twice, or lose it, the way a broker does on a bad night.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from pipeline import db, nodes, reports, stages
from pipeline.errors import DatabaseTransientError
from pipeline.keys import compute_item_key, compute_recipe_key
from pipeline.models import Base, ItemRow, ItemStatus, JobRow, NodeRow
from pipeline.repository import InFlightJob, NewItem, Repository
from pipeline.sandbox import Sandbox, SandboxConfig
from pipeline.scenario import ScenarioClient
from pipeline.stages import (
    FINALIZING_MIN,
    SWEEP_MIN_SLEEP,
    Context,
    Sweeper,
    SweeperState,
    TickReport,
    Tuning,
    coalesced_until,
    collect_nodes,
    poll_jobs,
    submit_nodes,
    sweep,
    warm,
)
from pipeline.storage import open_storage

MODEL = "model_test-image"


@dataclass
class QueueDispatcher:
    submits: list[int] = field(default_factory=list)
    collects: list[list[int]] = field(default_factory=list)
    dispatched_at: dict[int, float] = field(default_factory=dict)

    def submit(self, node_ids: Sequence[int]) -> None:
        self.submits.extend(node_ids)
        self.dispatched_at.update(dict.fromkeys(node_ids, time.time()))

    def collect(self, node_ids: Sequence[int]) -> None:
        self.collects.append(list(node_ids))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = (
        f"sqlite:///{tmp_path / 'lineage.db'}"
        if request.param == "sqlite"
        else str(request.getfixturevalue("postgres_database"))
    )
    db.upgrade(url)
    return url


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(SandboxConfig(latency=0.2, seed=3)) as sb:
        yield sb


@pytest.fixture
def ctx(database_url: str, sandbox: Sandbox, tmp_path: Path) -> Iterator[Context]:
    engine = db.make_engine(database_url)
    client = ScenarioClient(sandbox.url, "sandbox", "sandbox", timeout=5)
    context = Context(
        repo=Repository(engine),
        client=client,
        storage=open_storage(f"file://{tmp_path / 'out'}"),
        dispatch=QueueDispatcher(),
        tuning=Tuning(
            parallel_jobs=3,
            lease_seconds=1.0,
            list_interval=0.05,
            tick=0.05,
            resubmit_delay=0.0,
            collect_delay=0.05,
            in_sweeper=False,  # the tasks' path; the sweeper's own is tested where named
        ),
        sleep=lambda _s: None,
    )
    yield context
    client.close()
    engine.dispose()


BACKGROUND_REMOVAL = "model_photoroom-background-removal"
UPSCALE = "model_upscale-v3"
TEMPLATE = "{manifest}/{item}/{index}.{ext}"


def step(model: str, output: str | None = None, **params: Any) -> dict[str, Any]:
    return {
        "model": model,
        "endpoint": "custom",
        "params": params,
        "prompt": None,
        "output": output,
        "expected_outputs": 1,
    }


def record(
    ctx: Context,
    prompts: list[str],
    outputs: int = 1,
    *,
    steps: Sequence[dict[str, Any]] = (),
    overwrite: str = "replace",
    force: bool = False,
) -> str:
    items = []
    for n, prompt in enumerate(prompts):
        body = {"prompt": prompt, "seed": 100 + n, "numOutputs": outputs, "width": 64, "height": 64}
        key = compute_item_key(
            model=MODEL,
            trained_model=None,
            seed=100 + n,
            params=body,
            prompt=prompt,
            input_hashes=[],
        )
        settings = [{k: s[k] for k in ("model", "endpoint", "params", "prompt")} for s in steps]
        items.append(
            NewItem(
                manifest_item_id=f"item-{n}",
                line=n + 1,
                item_key=compute_recipe_key(key, settings),
                prompt=prompt,
                seed=100 + n,
                model=MODEL,
                trained_model=None,
                params=body,
                endpoint="custom",
                body=body,
                generation_key=key,
                generation_outputs=outputs,
                recipe={"steps": list(steps), "output": TEMPLATE, "overwrite": overwrite},
            )
        )
    return ctx.repo.record_run(
        manifest_name="stages",
        manifest_path="/m.yaml",
        manifest_sha256="0" * 64,
        manifest_body="",
        items=items,
        storage_url=ctx.storage.url,
        api_host="sandbox",
        force=force,
    )


def submit_node(ctx: Context, node_id: int, dispatched_at: float | None = None) -> str:
    """A submit task handed one node."""
    return submit_nodes(ctx, [node_id], dispatched_at)[node_id]


def report_of(ctx: Context, run_id: str) -> dict[str, Any]:
    report = reports.run_report(ctx.repo, run_id)
    assert report is not None
    return report


def drain(
    ctx: Context, state: SweeperState, *, timeout: float = 20.0, drop_submits: int = 0
) -> Any:
    """Run sweeps and the tasks they dispatch until every run is final."""
    dispatcher = ctx.dispatch
    assert isinstance(dispatcher, QueueDispatcher)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sweep(ctx, state)
        while dispatcher.submits:
            node_id = dispatcher.submits.pop(0)
            if drop_submits:
                drop_submits -= 1  # the broker lost this message
                continue
            submit_node(ctx, node_id, dispatcher.dispatched_at.get(node_id))
        while dispatcher.collects:
            collect_nodes(ctx, dispatcher.collects.pop(0))
        if not ctx.repo.running_run_ids():
            return
        time.sleep(0.03)
    raise AssertionError("run did not finish")


def test_items_flow_through_submit_poll_collect_within_the_parallel_cap(
    ctx: Context, sandbox: Sandbox
) -> None:
    sandbox.configure(parallel_jobs=3)  # the API would 429 a fourth concurrent job
    run_id = record(ctx, [f"icon {n}" for n in range(7)], outputs=2)
    drain(ctx, SweeperState(api_host="sandbox"))
    report = report_of(ctx, run_id)
    assert report["status"] == "succeeded"
    served = sandbox.stats()["images"]
    for item in report["items"]:
        assert len(item["outputs"]) == 2
        for out in item["outputs"]:
            data = Path(out["uri"].removeprefix("file://")).read_bytes()
            assert hashlib.sha256(data).hexdigest() == out["sha256"] == served[out["asset_id"]]
    stats = sandbox.stats()
    assert stats["responses_429"].get("parallel", 0) == 0
    assert stats["jobs_created"] == 7 and stats["duplicate_submissions"] == 0


def test_polling_uses_the_jobs_list_not_one_request_per_job(ctx: Context, sandbox: Sandbox) -> None:
    sandbox.configure(latency=0.5)
    record(ctx, [f"icon {n}" for n in range(3)])
    drain(ctx, SweeperState(api_host="sandbox"))
    requests = sandbox.stats()["requests"]
    assert requests.get("GET /jobs/{jobId}", 0) == 0
    assert 1 <= requests.get("GET /jobs", 0) <= 30


def test_a_submit_killed_after_the_post_is_reconciled_not_resubmitted(
    ctx: Context, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = record(ctx, ["lonely icon"])
    state = SweeperState(api_host="sandbox")
    sweep(ctx, state)
    (item_id,) = ctx.dispatch.submits  # type: ignore[attr-defined]
    ctx.dispatch.submits.clear()  # type: ignore[attr-defined]

    # The worker dies between Scenario's answer and our write of the job id.
    original = ctx.repo.record_accepted

    def die(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("SIGKILL")

    monkeypatch.setattr(ctx.repo, "record_accepted", die)
    with pytest.raises(SystemExit):
        submit_node(ctx, item_id)
    monkeypatch.setattr(ctx.repo, "record_accepted", original)
    assert sandbox.stats()["jobs_created"] == 1

    time.sleep(1.1)  # the dead worker's lease expires; the sweeper hands the item out again
    drain(ctx, state)
    report = report_of(ctx, run_id)
    assert report["status"] == "succeeded"
    assert sandbox.stats()["jobs_created"] == 1
    assert sandbox.stats()["duplicate_submissions"] == 0
    assert report["items"][0]["attempts"] == 1


def test_a_redelivered_submit_message_is_harmless(ctx: Context, sandbox: Sandbox) -> None:
    record(ctx, ["twice delivered"])
    sweep(ctx, SweeperState(api_host="sandbox"))
    (item_id,) = ctx.dispatch.submits  # type: ignore[attr-defined]
    assert submit_node(ctx, item_id) == "submitted"
    assert submit_node(ctx, item_id) == "not-claimed"
    assert sandbox.stats()["jobs_created"] == 1


def test_a_submit_task_takes_a_batch_and_posts_each_node_once(
    ctx: Context, sandbox: Sandbox
) -> None:
    record(ctx, [f"batch {n}" for n in range(3)])
    sweep(ctx, SweeperState(api_host="sandbox"))
    handed = list(ctx.dispatch.submits)  # type: ignore[attr-defined]
    assert len(handed) == 3
    assert submit_node(ctx, handed[0]) == "submitted"  # another task took this one first
    assert submit_nodes(ctx, handed) == {
        handed[0]: "not-claimed",
        handed[1]: "submitted",
        handed[2]: "submitted",
    }
    stats = sandbox.stats()
    assert stats["jobs_created"] == 3 and stats["duplicate_submissions"] == 0


def test_lost_messages_are_rebuilt_from_sql(ctx: Context, sandbox: Sandbox) -> None:
    run_id = record(ctx, ["a", "b"])
    drain(ctx, SweeperState(api_host="sandbox"), drop_submits=2)
    report = report_of(ctx, run_id)
    assert report["status"] == "succeeded"
    assert sandbox.stats()["jobs_created"] == 2


def test_failed_generation_is_resubmitted_then_fails_with_error_and_hint(
    ctx: Context, sandbox: Sandbox
) -> None:
    sandbox.configure(fail_prompts=["cursed"])
    run_id = record(ctx, ["cursed relic", "fine relic"])
    drain(ctx, SweeperState(api_host="sandbox"))
    report = report_of(ctx, run_id)
    assert report["status"] == "failed"
    cursed = report["items"][0]
    assert cursed["status"] == "failed" and cursed["attempts"] == 2
    assert len(cursed["jobs"]) == 2 and cursed["error"] and cursed["hint"]
    assert report["items"][1]["status"] == "succeeded"


def test_expired_asset_urls_are_refreshed(ctx: Context, sandbox: Sandbox) -> None:
    sandbox.configure(fault_expired_rate=0.5, seed=11)
    run_id = record(ctx, [f"icon {n}" for n in range(4)], outputs=2)
    drain(ctx, SweeperState(api_host="sandbox"))
    report = report_of(ctx, run_id)
    assert report["status"] == "succeeded"
    assert sandbox.stats()["faults"]["expired"] > 0


def test_deadline_cancels_remote_jobs(ctx: Context, sandbox: Sandbox) -> None:
    sandbox.configure(latency=30.0)
    run_id = record(ctx, ["slow one", "slow two"])
    state = SweeperState(api_host="sandbox")
    sweep(ctx, state)
    for item_id in list(ctx.dispatch.submits):  # type: ignore[attr-defined]
        submit_node(ctx, item_id)
    ctx.repo.set_deadline(run_id, ctx.now())
    time.sleep(0.01)
    sweep(ctx, state)
    report = report_of(ctx, run_id)
    assert report["status"] == "canceled"
    assert all("deadline" in (i["error"] or "") for i in report["items"])
    assert sandbox.stats()["jobs"].get("canceled") == 2
    assert all(i["status"] == str(ItemStatus.CANCELED) for i in report["items"])


def test_a_submit_that_outlived_its_lease_does_not_post(
    ctx: Context, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker A stalls after writing its intent (a GC pause, a long wait for the governor)
    until its lease runs out; worker B takes the item over and submits it. When A wakes up
    it must not POST as well."""
    record(ctx, ["stalled"])
    state = SweeperState(api_host="sandbox")
    sweep(ctx, state)
    dispatcher = ctx.dispatch
    assert isinstance(dispatcher, QueueDispatcher)
    (item_id,) = dispatcher.submits
    dispatcher.submits.clear()
    original = ctx.repo.record_intents
    outcomes: list[str] = []

    def stall_then_let_b_in(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        monkeypatch.setattr(ctx.repo, "record_intents", original)
        time.sleep(ctx.tuning.lease_seconds + 0.2)
        sweep(ctx, state)  # the sweeper sees the expired lease and hands the item out again
        assert dispatcher.submits == [item_id]
        outcomes.append(submit_node(ctx, dispatcher.submits.pop()))  # worker B
        return result

    monkeypatch.setattr(ctx.repo, "record_intents", stall_then_let_b_in)
    assert submit_node(ctx, item_id) == "claim-lost"  # worker A
    assert outcomes == ["submitted"]
    assert sandbox.stats()["jobs_created"] == 1


def test_overwrite_never_keeps_stored_bytes_and_names_the_new_asset(
    ctx: Context, sandbox: Sandbox
) -> None:
    existing = ctx.storage.put(
        "stages/item-0/0.png", [b"an older image"], content_type="image/png", metadata={}
    )
    run_id = record(ctx, ["regenerated icon"], overwrite="never")
    drain(ctx, SweeperState(api_host="sandbox"))
    report = report_of(ctx, run_id)
    assert report["status"] == "failed"
    error = report["items"][0]["error"]
    (asset_id,) = sandbox.stats()["images"]
    assert asset_id in error and "{seed}" in error
    assert ctx.storage.verify("stages/item-0/0.png", existing.sha256)  # the old bytes stay


def test_a_job_the_list_never_shows_is_found_by_its_own_polls(
    ctx: Context, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """E.g. a tool model whose jobs have another jobType than the list filter asks for."""
    ctx.tuning = dataclasses.replace(ctx.tuning, straggler_default=0.2)
    run_id = record(ctx, ["hidden from the list", "listed"])
    hidden: set[str] = set()
    iter_jobs = ctx.client.iter_jobs

    def without_hidden(**kwargs: Any) -> Any:
        for job in iter_jobs(**kwargs):
            if job.input.get("prompt") == "hidden from the list":
                hidden.add(job.id)
                continue
            yield job

    monkeypatch.setattr(ctx.client, "iter_jobs", without_hidden)
    drain(ctx, SweeperState(api_host="sandbox"))
    report = report_of(ctx, run_id)
    assert report["status"] == "succeeded"
    assert hidden  # the list really did hide it
    requests = sandbox.stats()["requests"]
    assert 1 <= requests.get("GET /jobs/{jobId}", 0) <= 6


def test_transient_database_errors_delay_items_but_lose_none(
    ctx: Context, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database blips while outputs are recorded and while a job id is written."""
    run_id = record(ctx, ["blip one", "blip two"])
    failures = {"record_collected": 1, "record_accepted": 1}

    def flaky(name: str) -> Any:
        original = getattr(ctx.repo, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if failures[name] > 0:
                failures[name] -= 1
                raise DatabaseTransientError("database error: server closed the connection")
            return original(*args, **kwargs)

        return call

    for name in failures:
        monkeypatch.setattr(ctx.repo, name, flaky(name))
    real_submit = submit_node

    def submit_as_the_task_does(
        c: Context, node_id: int, dispatched_at: float | None = None
    ) -> str:
        try:
            return real_submit(c, node_id, dispatched_at)
        except DatabaseTransientError:
            return "deferred"  # tasks.submit: the lease expires and the sweeper retries

    monkeypatch.setattr(sys.modules[__name__], "submit_node", submit_as_the_task_does)
    drain(ctx, SweeperState(api_host="sandbox"))
    report = report_of(ctx, run_id)
    assert report["status"] == "succeeded"
    assert failures == {"record_collected": 0, "record_accepted": 0}
    assert sandbox.stats()["jobs_created"] == 2  # the unrecorded job was reconciled, not redone


def _generate_calls_by_model(sandbox: Sandbox) -> dict[str, int]:
    return dict(sandbox.stats()["jobs_by_model"])


def test_a_recipe_runs_each_step_on_every_output_of_the_step_before(
    ctx: Context, sandbox: Sandbox
) -> None:
    """generate (2 outputs) -> remove background -> upscale: 2 + 2 + 2 jobs, 2 final files."""
    recipe = [step(BACKGROUND_REMOVAL), step(UPSCALE, upscaleFactor=2)]
    run_id = record(ctx, ["potion"], outputs=2, steps=recipe)
    drain(ctx, SweeperState(api_host="sandbox"))
    report = report_of(ctx, run_id)
    assert report["status"] == "succeeded", report
    (item,) = report["items"]
    assert item["nodes"] == 5 and len(item["jobs"]) == 5
    assert [o["index"] for o in item["outputs"]] == [0, 1]
    served = sandbox.stats()["images"]
    for out in item["outputs"]:
        path = Path(out["uri"].removeprefix("file://"))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == served[out["asset_id"]]
        chain = out["chain"]
        assert [c["model"] for c in chain] == [MODEL, BACKGROUND_REMOVAL, UPSCALE]
        assert chain[-1]["output_asset"] == out["asset_id"]
        # each step's input was the previous step's output, by Scenario asset id
        inputs = [job.body.get("image") for job in sandbox.api.store.jobs.values()]
        assert chain[0]["output_asset"] in inputs and chain[1]["output_asset"] in inputs
    # nothing was uploaded again: the steps ran on Scenario's own assets
    assert sandbox.stats()["requests"].get("POST /assets", 0) == 0
    assert _generate_calls_by_model(sandbox) == {MODEL: 1, BACKGROUND_REMOVAL: 2, UPSCALE: 2}


def test_a_rerun_pays_only_for_the_steps_that_changed(ctx: Context, sandbox: Sandbox) -> None:
    first = [step(BACKGROUND_REMOVAL), step(UPSCALE, upscaleFactor=2)]
    record(ctx, ["shield"], steps=first)
    drain(ctx, SweeperState(api_host="sandbox"))
    before = _generate_calls_by_model(sandbox)
    assert before == {MODEL: 1, BACKGROUND_REMOVAL: 1, UPSCALE: 1}

    changed = [step(BACKGROUND_REMOVAL), step(UPSCALE, upscaleFactor=4)]
    run_id = record(ctx, ["shield"], steps=changed)
    drain(ctx, SweeperState(api_host="sandbox"))
    report = report_of(ctx, run_id)
    assert report["status"] == "succeeded"
    assert _generate_calls_by_model(sandbox) == {MODEL: 1, BACKGROUND_REMOVAL: 1, UPSCALE: 2}
    (item,) = report["items"]
    assert item["reused_nodes"] == 2
    (out,) = item["outputs"]
    assert [c["reused"] for c in out["chain"]] == [True, True, False]

    # --force pays for everything again
    forced = record(ctx, ["shield"], steps=changed, force=True)
    drain(ctx, SweeperState(api_host="sandbox"))
    assert report_of(ctx, forced)["status"] == "succeeded"
    assert _generate_calls_by_model(sandbox) == {MODEL: 2, BACKGROUND_REMOVAL: 2, UPSCALE: 3}


def test_an_intermediate_step_is_stored_only_where_it_has_an_output(
    ctx: Context, sandbox: Sandbox
) -> None:
    cutout = "{manifest}/{item}/cutout/{index}.{ext}"
    recipe = [step(BACKGROUND_REMOVAL, output=cutout), step(UPSCALE)]
    run_id = record(ctx, ["lantern"], outputs=2, steps=recipe)
    drain(ctx, SweeperState(api_host="sandbox"))
    assert report_of(ctx, run_id)["status"] == "succeeded"
    root = Path(ctx.storage.url.removeprefix("file://"))
    stored = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    assert stored == [
        "stages/item-0/0.png",
        "stages/item-0/1.png",
        "stages/item-0/cutout/0.png",
        "stages/item-0/cutout/1.png",
    ]


def test_the_plans_cap_is_learned_without_being_configured(ctx: Context, sandbox: Sandbox) -> None:
    """P is unknown to the pipeline: it grows until the API refuses, then holds there."""
    # Jobs long enough for 6 to be in flight at once even on a busy machine.
    sandbox.configure(parallel_jobs=6, latency=1.0)
    ctx.tuning = dataclasses.replace(ctx.tuning, parallel_jobs=None)
    run_id = record(ctx, [f"icon {n}" for n in range(30)])
    drain(ctx, SweeperState(api_host="sandbox"), timeout=60)
    assert report_of(ctx, run_id)["status"] == "succeeded"
    stats = sandbox.stats()
    assert stats["jobs_created"] == 30 and stats["duplicate_submissions"] == 0
    assert 1 <= stats["responses_429"]["parallel"] <= 6
    # This harness runs tasks one at a time, so how many jobs were really in flight at a
    # refusal is only roughly known: the learned cap is near the API's, never far below.
    assert 6 <= ctx.caps.get("custom").value <= 12
    # The next run of the same key starts from what was learned: few refusals, if any.
    refused = stats["responses_429"]["parallel"]
    second = record(ctx, [f"again {n}" for n in range(12)])
    drain(ctx, SweeperState(api_host="sandbox"), timeout=60)
    assert report_of(ctx, second)["status"] == "succeeded"
    assert sandbox.stats()["responses_429"]["parallel"] <= refused + 6
    assert sandbox.stats()["duplicate_submissions"] == 0
    # This key may not read its plan's limits: asked once, not again on every run.
    assert sandbox.stats()["requests"]["GET /teams/{teamId}/limits"] == 1


def test_a_key_that_may_read_its_plans_limits_is_never_refused(
    ctx: Context, sandbox: Sandbox
) -> None:
    sandbox.configure(parallel_jobs=5, latency=0.3, limits_access=True)
    ctx.tuning = dataclasses.replace(ctx.tuning, parallel_jobs=None)
    run_id = record(ctx, [f"icon {n}" for n in range(15)])
    drain(ctx, SweeperState(api_host="sandbox"), timeout=60)
    assert report_of(ctx, run_id)["status"] == "succeeded"
    assert sandbox.stats()["responses_429"]["parallel"] == 0
    assert ctx.caps.get("custom").value == 5 and ctx.caps.get("custom").known


def test_a_batchs_posts_go_out_side_by_side(
    ctx: Context, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slots freed together are refilled together: one POST does not wait for another."""
    record(ctx, [f"side by side {n}" for n in range(3)])
    sweep(ctx, SweeperState(api_host="sandbox"))
    handed = list(ctx.dispatch.submits)  # type: ignore[attr-defined]
    generate = ctx.client.generate
    lock = threading.Lock()
    out = [0, 0]  # POSTs in flight now, most at once

    def slow_generate(*args: Any, **kwargs: Any) -> Any:
        with lock:
            out[0] += 1
            out[1] = max(out)
        time.sleep(0.3)
        try:
            return generate(*args, **kwargs)
        finally:
            with lock:
                out[0] -= 1

    monkeypatch.setattr(ctx.client, "generate", slow_generate)
    assert set(submit_nodes(ctx, handed).values()) == {"submitted"}
    assert out[1] == 3
    assert len(ctx.repo.in_flight_jobs()) == 3  # every acceptance recorded
    stats = sandbox.stats()
    assert stats["jobs_created"] == 3 and stats["duplicate_submissions"] == 0


def test_a_slow_post_does_not_hold_back_the_records_of_quick_ones(
    ctx: Context, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    record(ctx, [f"one slow {n}" for n in range(3)])
    sweep(ctx, SweeperState(api_host="sandbox"))
    handed = list(ctx.dispatch.submits)  # type: ignore[attr-defined]
    generate = ctx.client.generate
    release = threading.Event()

    def one_stuck(model: str, body: dict[str, Any], **kwargs: Any) -> Any:
        if body["prompt"].endswith("0"):
            release.wait(10)  # a POST the network holds up
        return generate(model, body, **kwargs)

    monkeypatch.setattr(ctx.client, "generate", one_stuck)
    task = threading.Thread(target=submit_nodes, args=(ctx, handed))
    task.start()
    try:
        deadline = time.monotonic() + 5
        while len(ctx.repo.in_flight_jobs()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        # The two quick jobs are recorded (and polled) while the slow POST is still out.
        assert len(ctx.repo.in_flight_jobs()) == 2
    finally:
        release.set()
        task.join(10)
    assert len(ctx.repo.in_flight_jobs()) == 3
    assert sandbox.stats()["duplicate_submissions"] == 0


def test_a_tight_group_of_jobs_is_polled_when_its_last_is_due_not_later(ctx: Context) -> None:
    """Jobs due within a few percent of their duration share one list call, which waits
    for the last of them only, not a fixed window; a job due later is not waited for."""
    state = SweeperState(api_host="sandbox")
    state.samples_cache[MODEL] = (time.monotonic(), [3.0])  # jobs of 3 s: a 60 ms window
    now = ctx.now()

    def job(n: int, due_ms: int) -> InFlightJob:
        due = now + timedelta(milliseconds=due_ms)
        return InFlightJob(n, f"job-{n}", n, MODEL, "custom", 0, now, due, 1)

    group = [job(1, 0), job(2, 4), job(3, 9), job(4, 200)]
    assert coalesced_until(ctx, state, group, now) == now + timedelta(milliseconds=9)
    assert coalesced_until(ctx, state, group[:1], now) == now


def test_jobs_due_within_a_list_gap_of_a_group_join_it(ctx: Context) -> None:
    """Jobs due after the group window but within the least gap between two list calls
    (a twentieth of 3 s: 150 ms) could not be listed sooner on their own: the group waits
    for them. A wave split by a first look that fell between its finishes so becomes one
    group again, where it would otherwise cost two list calls every round."""
    ctx = dataclasses.replace(ctx, tuning=dataclasses.replace(ctx.tuning, list_interval=None))
    state = SweeperState(api_host="sandbox")
    state.samples_cache[MODEL] = (time.monotonic(), [3.0])
    now = ctx.now()

    def job(n: int, due_ms: int) -> InFlightJob:
        due = now + timedelta(milliseconds=due_ms)
        return InFlightJob(n, f"job-{n}", n, MODEL, "custom", 0, now, due, 1)

    split = [job(1, 0), job(2, 3), job(3, 120), job(4, 124), job(5, 400)]
    assert coalesced_until(ctx, state, split, now) == now + timedelta(milliseconds=124)


def test_a_full_pool_does_not_keep_the_sweeper_spinning(ctx: Context, sandbox: Sandbox) -> None:
    """Pending nodes waiting for a slot wake nobody: a finished job frees it (and the
    sweeper polls for that on its own timer); an empty other pool changes nothing."""
    record(ctx, [f"waiting {n}" for n in range(5)])
    sweeper = Sweeper(ctx, sandbox.url)
    first = sweeper.tick()
    assert first.submitted == 3 and first.full
    second = sweeper.tick()
    assert second.submitted == 0 and second.full
    assert sweeper._sleep_after(second) == ctx.tuning.tick


def grouped_pair(
    ctx: Context, sandbox: Sandbox, first_in: float, second_in: float, duration: float = 3.0
) -> Sweeper:
    """Two jobs of a model whose jobs take `duration` s (a group window of 2% of it: 60 ms
    by default) in flight, due `first_in` and `second_in` seconds from now; the sweeper
    that handed them out."""
    record(ctx, [f"grouped {n}" for n in range(2)])
    sweeper = Sweeper(ctx, sandbox.url)
    sweeper.tick()
    submit_nodes(ctx, list(ctx.dispatch.submits))  # type: ignore[attr-defined]
    first, second = sorted(ctx.repo.in_flight_jobs(), key=lambda j: j.row_id)
    sweeper.state.samples_cache[MODEL] = (time.monotonic(), [duration])
    now = ctx.now()
    ctx.repo.schedule_polls(
        {
            (first.row_id, first.node_id): now + timedelta(seconds=first_in),
            (second.row_id, second.node_id): now + timedelta(seconds=second_in),
        }
    )
    return sweeper


def test_a_poll_waiting_for_a_groups_last_job_sleeps_until_it_is_due(
    ctx: Context, sandbox: Sandbox
) -> None:
    """Every job of a group that finished freed a slot: the sweeper looks when the last
    one is due, to the millisecond, not after its usual least sleep."""
    # The last job due in 100 ms (6 s jobs: a 120 ms group window): time for the pass's
    # queries on a loaded machine, and its lead (10 ms at first), before the wake-up.
    sweeper = grouped_pair(ctx, sandbox, first_in=-0.005, second_in=0.1, duration=6.0)
    report = sweeper.tick()
    assert report.poll.list_calls == 0 and report.poll.group_until is not None
    time.sleep(max(0.0, report.poll.group_until - time.monotonic() - 0.008))
    pause = sweeper._sleep_after(report)  # the last job is due in about 8 ms
    assert 0 < pause < SWEEP_MIN_SLEEP
    assert pause == pytest.approx(report.poll.group_until - time.monotonic(), abs=0.005)


def test_a_sweeper_with_no_job_due_yet_sleeps_until_the_groups_last_job_is_due(
    ctx: Context, sandbox: Sandbox
) -> None:
    """A group of jobs submitted together is looked at once, when its last job is due: the
    sweeper's wake-up is that moment, not its first job's due time (a pass then would only
    find that it must wait, and its queries would delay the list)."""
    ctx.tuning = dataclasses.replace(ctx.tuning, tick=1.0)
    # 6 s jobs: a 120 ms group window, so that the second job can be due well after the
    # first and a busy machine's slow queries do not blur the two.
    sweeper = grouped_pair(ctx, sandbox, first_in=0.15, second_in=0.26, duration=6.0)
    scheduled = time.monotonic()  # just after the due times were written
    report = sweeper.tick()
    assert report.poll.list_calls == 0 and report.poll.group_until is not None
    pause = sweeper._sleep_after(report)
    assert pause == pytest.approx(report.poll.group_until - time.monotonic(), abs=0.02)
    # Past the first job's due time, at the second's less the pass's lead (10 ms at first),
    # however long the pass's queries took.
    assert time.monotonic() + pause - scheduled > 0.2


def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.01)


def sweep_until_a_list_sees_jobs_end(ctx: Context, state: SweeperState) -> TickReport:
    deadline = time.monotonic() + 10
    while not (report := sweep(ctx, state)).poll.finished:
        assert time.monotonic() < deadline, "no job was seen ending"
        time.sleep(0.02)
    return report


def test_a_first_wave_of_up_to_a_batch_is_sent_by_the_sweeper_itself(
    ctx: Context, sandbox: Sandbox
) -> None:
    """No queue between a run's recording and its first POSTs: the pass that finds the run
    claims, writes the intents and POSTs its first wave from its own thread."""
    ctx.tuning = dataclasses.replace(ctx.tuning, in_sweeper=True)
    run_id = record(ctx, [f"first wave {n}" for n in range(3)])
    report = sweep(ctx, SweeperState(api_host="sandbox"))
    assert report.submitted == 3
    assert ctx.dispatch.submits == []  # type: ignore[attr-defined]
    wait_for(lambda: sandbox.stats()["jobs_created"] == 3)
    # Accepted and recorded, each once (answers later than REFILL_HOLD by another thread).
    wait_for(lambda: {i["status"] for i in report_of(ctx, run_id)["items"]} == {"running"})
    assert sandbox.stats()["duplicate_submissions"] == 0


def test_a_sweeper_that_dies_between_its_hand_out_and_its_posts_leaves_each_sent_once(
    ctx: Context, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch the sweeper sends itself is claimed, read and given its intents in the
    hand-out's own transaction, so that only the POSTs are left. Should the process die
    right after it, its nodes wait for their claims to expire, are handed out again, and
    each is submitted once: the intents already written are resolved, not doubled."""
    ctx.tuning = dataclasses.replace(ctx.tuning, in_sweeper=True)
    run_id = record(ctx, [f"orphan {n}" for n in range(3)])
    monkeypatch.setattr(stages, "send_here", lambda *_a, **_k: None)  # dies before its POSTs
    state = SweeperState(api_host="sandbox")
    assert sweep(ctx, state).submitted == 3
    assert ctx.dispatch.submits == []  # type: ignore[attr-defined]
    with ctx.repo.session() as s:
        intents = s.execute(select(JobRow.node_id).where(JobRow.scenario_job_id.is_(None)))
        orphans = sorted(intents.scalars())
    assert len(orphans) == 3  # one open intent per node, written with the hand-out
    monkeypatch.undo()
    time.sleep(ctx.tuning.lease_seconds + 0.1)
    sweep(ctx, state)  # the claims expired: handed out again, to tasks
    assert sorted(ctx.dispatch.submits) == orphans  # type: ignore[attr-defined]
    for node in ctx.dispatch.submits:  # type: ignore[attr-defined]
        submit_node(ctx, node)
    stats = sandbox.stats()
    assert stats["jobs_created"] == 3 and stats["duplicate_submissions"] == 0
    assert {i["status"] for i in report_of(ctx, run_id)["items"]} == {"running"}


def log_calls(steps: list[str], obj: Any, **labels: str) -> None:
    """Each method of `obj` named in `labels` appends its label to `steps` when called."""
    for name, label in labels.items():
        method = getattr(obj, name)

        def logged(*args: Any, _label: str = label, _method: Any = method, **kw: Any) -> Any:
            steps.append(_label)
            return _method(*args, **kw)

        setattr(obj, name, logged)


def waiting_for_a_group_with_a_refill_read_ahead(
    ctx: Context, sandbox: Sandbox, pending: int
) -> tuple[SweeperState, list[int]]:
    """Two 1 s jobs of a known duration in flight on a cap of two, `pending` items
    waiting: the sweeper passes until one waits for the pair's end; its state and the
    nodes in flight."""
    # 1 s: time enough, on a loaded machine, for a pass to see the pair in flight and wait
    # for its end (with 0.4 s jobs a CI run's pass came after they had ended).
    sandbox.configure(latency=1.0, latency_spread=0.0)
    ctx.tuning = dataclasses.replace(ctx.tuning, parallel_jobs=2, in_sweeper=True)
    ctx.repo.policy = ctx.tuning.policy()
    record(ctx, [f"read ahead {n}" for n in range(2 + pending)])
    state = SweeperState(api_host="sandbox")
    learnt = (time.monotonic() + 60, [1.0])  # a duration learnt before, in both caches
    state.samples_cache[MODEL] = ctx.durations[MODEL] = learnt
    sweep(ctx, state)  # the first wave, POSTed by the sweeper
    wait_for(lambda: len(ctx.repo.in_flight_jobs()) == 2)
    while (report := sweep(ctx, state)).poll.group_end is None:
        assert not report.poll.list_calls, "a list was sent before the pair was due"
        time.sleep(0.01)
    return state, [j.node_id for j in ctx.repo.in_flight_jobs()]


def test_a_refill_read_ahead_leaves_nothing_but_its_posts_after_the_list(
    ctx: Context, sandbox: Sandbox
) -> None:
    """While the sweeper waits for a group of jobs to end, it reads what refilling their
    slots needs (slots in use, caps, pending nodes, their POSTs, durations), and right
    before the list that sees them end it writes the hand-out (claims, intents): after the
    list's answer there is no query at all before the new POSTs, even when the durations
    read ahead have expired since (as they have by then for jobs of 5 s or more): the new
    jobs' first looks were read ahead too. The list is not asked before the group's last
    job is due. The cap holds and every node is submitted once."""
    from sqlalchemy import event

    state, wave = waiting_for_a_group_with_a_refill_read_ahead(ctx, sandbox, pending=2)
    assert state.ahead is not None and state.ahead.nodes.count == 2
    group_end = state.ahead.group_end
    ctx.durations.clear()
    steps: list[str] = []
    listed_at: list[datetime] = []
    event.listen(ctx.repo.engine, "commit", lambda _conn: steps.append("commit"))
    log_calls(steps, ctx.client, iter_jobs="list", generate="post")
    log_calls(steps, ctx.repo, duration_samples="durations", hand_out="hand-out")
    iter_jobs = ctx.client.iter_jobs
    ctx.client.iter_jobs = lambda **kw: listed_at.append(ctx.now()) or iter_jobs(**kw)  # type: ignore[method-assign]
    sweep_until_a_list_sees_jobs_end(ctx, state)
    last_list = len(steps) - 1 - steps[::-1].index("list")
    between = steps[last_list + 1 : steps.index("post", last_list)]
    assert between == []
    assert steps[last_list - 2 : last_list] == ["hand-out", "commit"]
    assert listed_at[-1] >= group_end
    assert state.ahead is None and state.prepared is None  # used once
    wait_for(lambda: len(ctx.repo.in_flight_jobs()) == 2)
    refill = ctx.repo.in_flight_jobs()
    assert not {j.node_id for j in refill} & set(wave)
    for job in refill:  # first looked at when its learnt 1 s is up, not a fifth of that
        assert job.due_at is not None
        assert (job.due_at - job.accepted_at).total_seconds() > 0.3
    stats = sandbox.stats()
    assert stats["jobs_created"] == 4 and stats["duplicate_submissions"] == 0
    assert sum(stats["responses_429"].values()) == 0


def test_a_refill_for_jobs_that_did_not_end_when_due_is_given_back_never_posted(
    ctx: Context, sandbox: Sandbox
) -> None:
    """The refill written before the list assumed the whole group would end when due. One
    job of the pair runs late: the list sees one slot free, so one node is POSTed and the
    other is given back, pending again with no intent and no attempt counted, its item
    pending; it is POSTed once, when the late job ends. No 429, no duplicate."""
    state, _ = waiting_for_a_group_with_a_refill_read_ahead(ctx, sandbox, pending=2)
    late = ctx.repo.in_flight_jobs()[0].scenario_job_id
    sandbox.store.jobs[late].duration = 2.5  # still running when the pair is due
    given_back: list[list[int]] = []
    give_back = ctx.repo.give_back

    def logged(handout: Any, node_ids: Any) -> list[int]:
        given_back.append(give_back(handout, node_ids))
        return given_back[-1]

    ctx.repo.give_back = logged  # type: ignore[method-assign]
    report = sweep_until_a_list_sees_jobs_end(ctx, state)
    assert report.submitted == 1 and len(report.poll.finished) == 1
    assert len(given_back) == 1 and len(given_back[0]) == 1
    back = given_back[0][0]
    with ctx.repo.session() as s:
        assert s.execute(select(JobRow.id).where(JobRow.node_id == back)).first() is None
        row = s.get(NodeRow, back)
        assert (row.state, row.attempts, row.tries, row.claim_owner) == (
            nodes.NodeState.PENDING, 0, 0, None,
        )  # fmt: skip
        assert s.get(ItemRow, row.item_id).status == ItemStatus.PENDING
    assert sandbox.stats()["jobs_created"] == 3
    wait_for(lambda: sweep(ctx, state) and back in {j.node_id for j in ctx.repo.in_flight_jobs()})
    stats = sandbox.stats()
    assert stats["jobs_created"] == 4 and stats["duplicate_submissions"] == 0
    assert sum(stats["responses_429"].values()) == 0


def test_a_refill_whose_list_sees_nothing_end_is_given_back_whole(
    ctx: Context, sandbox: Sandbox
) -> None:
    """If the list sees none of the group end (a duration learnt too short), nothing is
    POSTed and the whole refill written before it goes back to wait: no node is left
    claimed with an intent that would have to be reconciled."""
    state, _ = waiting_for_a_group_with_a_refill_read_ahead(ctx, sandbox, pending=2)
    for job in ctx.repo.in_flight_jobs():
        sandbox.store.jobs[job.scenario_job_id].duration = 2.5
    deadline = time.monotonic() + 10
    while not (report := sweep(ctx, state)).poll.list_calls:
        assert time.monotonic() < deadline, "no list was sent"
        time.sleep(0.01)
    assert report.submitted == 0 and not report.poll.finished and state.prepared is None
    with ctx.repo.session() as s:
        assert s.execute(select(JobRow.id).where(JobRow.scenario_job_id.is_(None))).first() is None
    assert sandbox.stats()["jobs_created"] == 2


def test_nothing_left_to_refill_is_read_ahead_too_and_the_last_list_goes_to_storing(
    ctx: Context, sandbox: Sandbox
) -> None:
    """A run's last group of jobs: the sweeper reads ahead that nothing waits for their
    slots, so the list that sees them end goes straight to storing their outputs, with no
    read of slots, caps or pending nodes in between, and that pass ends the run. A run
    recorded meanwhile rings the sweeper, whose next pass hands it out."""
    state, _ = waiting_for_a_group_with_a_refill_read_ahead(ctx, sandbox, pending=0)
    steps: list[str] = []
    names = ("slots_by_pool", "dispatch_pending", "read_ahead", "collect_works")
    log_calls(steps, ctx.repo, **{name: name for name in names})
    deadline = time.monotonic() + 10
    while not (steps.clear() or (report := sweep(ctx, state)).poll.finished):
        assert time.monotonic() < deadline, "no job was seen ending"
        time.sleep(0.02)
    assert steps[:1] == ["collect_works"], (steps, report)  # stored first, no hand-out read
    assert report.collected and len(report.finished_runs) == 1
    later = record(ctx, ["recorded after the read"])
    wait_for(lambda: sweep(ctx, state).submitted == 1)
    wait_for(lambda: report_of(ctx, later)["items"][0]["status"] == "running")


def test_a_node_that_changed_after_its_refill_was_read_ahead_is_left_out(
    ctx: Context, sandbox: Sandbox
) -> None:
    """What was read ahead is only handed out if it is as it was read: a node canceled
    since is not submitted, and one still pending but written since (an error noted) is
    left out of the hand-out written before the list; the list's pass then hands it out
    afresh, read again."""
    state, _ = waiting_for_a_group_with_a_refill_read_ahead(ctx, sandbox, pending=2)
    assert state.ahead is not None
    canceled, touched = (node_id for node_id, _ in state.ahead.nodes.found["custom"])
    time.sleep(0.002)  # a later updated_at than the read, on any clock resolution
    assert ctx.repo.transition(canceled, nodes.Cancel("canceled by a user"))
    ctx.repo.note_error(touched, "noted after the read")
    handed: list[list[int]] = []
    hand_out, dispatch_pending = ctx.repo.hand_out, ctx.repo.dispatch_pending
    ctx.repo.hand_out = lambda *a: handed.append(["read ahead"]) or hand_out(*a)  # type: ignore[method-assign]

    def afresh(*args: Any, **kw: Any) -> Any:
        out = dispatch_pending(*args, **kw)
        handed.append(out.nodes)
        return out

    ctx.repo.dispatch_pending = afresh  # type: ignore[method-assign]
    report = sweep_until_a_list_sees_jobs_end(ctx, state)
    assert report.submitted == 1
    handed = [h for h in handed if h]
    assert handed == [["read ahead"], [touched]]
    wait_for(lambda: touched in {j.node_id for j in ctx.repo.in_flight_jobs()})
    stats = sandbox.stats()
    assert stats["jobs_created"] == 3 and stats["duplicate_submissions"] == 0


def test_a_bigger_hand_out_than_a_batch_is_left_to_tasks_unclaimed(
    ctx: Context, sandbox: Sandbox
) -> None:
    """More slots freed than one batch: the nodes go to submit tasks, spread over the
    workers, which claim them themselves; the sweeper claims none of them."""
    ctx.tuning = dataclasses.replace(ctx.tuning, in_sweeper=True, submit_batch=2)
    record(ctx, [f"wide wave {n}" for n in range(3)])
    assert sweep(ctx, SweeperState(api_host="sandbox")).submitted == 3
    handed = list(ctx.dispatch.submits)  # type: ignore[attr-defined]
    assert len(handed) == 3
    with ctx.repo.session() as s:
        assert s.execute(select(JobRow.id)).first() is None  # no intent yet
    assert sorted(submit_nodes(ctx, handed).values()) == ["submitted"] * 3
    assert sandbox.stats()["jobs_created"] == 3


def test_the_last_jobs_are_stored_by_the_pass_that_sees_them_end_which_ends_their_run(
    ctx: Context, sandbox: Sandbox
) -> None:
    """With nothing else in flight, the sweeper stores the last outputs itself, and the
    same pass marks the run finished: no collect task, no pass in between."""
    ctx.tuning = dataclasses.replace(ctx.tuning, in_sweeper=True)
    run_id = record(ctx, ["the only item"], outputs=2)
    state = SweeperState(api_host="sandbox")
    sweep(ctx, state)
    wait_for(lambda: report_of(ctx, run_id)["items"][0]["status"] == "running")
    report = sweep_until_a_list_sees_jobs_end(ctx, state)
    assert report.collected == 1 and report.finished_runs == [run_id]
    assert ctx.dispatch.collects == []  # type: ignore[attr-defined]
    done = report_of(ctx, run_id)
    assert done["status"] == "succeeded"
    outputs = done["items"][0]["outputs"]
    assert len(outputs) == 2
    assert all(Path(o["uri"].removeprefix("file://")).exists() for o in outputs)


def test_a_warm_up_reads_the_plans_limits_so_the_first_wave_goes_out_at_the_plans_cap(
    ctx: Context, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a run is recorded, a worker's warm-up starts a batch's POST threads and reads
    the plan's limits once, first (two round trips against the real API, before its
    queries); the first pass then sends as many as the plan allows at once."""
    monkeypatch.setattr(stages, "_io_threads", {})  # this test's own POST threads
    sandbox.configure(parallel_jobs=5, limits_access=True)
    ctx.tuning = dataclasses.replace(ctx.tuning, parallel_jobs=None, in_sweeper=True)
    known_at_first_query: list[bool] = []
    overdue_runs = ctx.repo.overdue_runs

    def first_query() -> Any:
        known_at_first_query.append(ctx.caps.get("custom").known)
        return overdue_runs()

    monkeypatch.setattr(ctx.repo, "overdue_runs", first_query)
    warm(ctx)
    assert known_at_first_query == [True]
    assert len(stages.io_threads("post")._threads) >= ctx.tuning.submit_batch
    assert ctx.caps.get("custom").value == 5 and ctx.caps.get("custom").known
    asked = sandbox.stats()["requests"]
    assert asked["GET /teams"] == 1 and asked["GET /teams/{teamId}/limits"] == 1
    record(ctx, [f"capped {n}" for n in range(8)])
    assert sweep(ctx, SweeperState(api_host="sandbox")).submitted == 5
    wait_for(lambda: sandbox.stats()["jobs_created"] == 5)
    stats = sandbox.stats()
    assert stats["requests"]["GET /teams/{teamId}/limits"] == 1  # not asked again
    assert stats["responses_429"]["parallel"] == 0


@pytest.mark.parametrize("in_sweeper", [True, False], ids=["by-the-sweeper", "by-tasks"])
def test_slots_freed_by_jobs_seen_ending_are_refilled_before_the_endings_are_recorded(
    ctx: Context, sandbox: Sandbox, in_sweeper: bool
) -> None:
    """The list that sees jobs end hands out the pending nodes that take their slots first:
    the sweeper POSTs them itself (or hands them to submit tasks), and the ended jobs are
    recorded after. Not so for the first jobs of a model: the duration they teach is read
    from the database for the new jobs' first looks, so they are recorded first. The cap
    holds either way."""
    sandbox.configure(latency=0.2, latency_spread=0.0)
    ctx.tuning = dataclasses.replace(ctx.tuning, parallel_jobs=2, in_sweeper=in_sweeper)
    ctx.repo.policy = ctx.tuning.policy()
    record(ctx, [f"refill {n}" for n in range(6)])
    state = SweeperState(api_host="sandbox")
    sweep(ctx, state)
    dispatcher = ctx.dispatch
    assert isinstance(dispatcher, QueueDispatcher)
    first = list(dispatcher.submits)  # a run's first wave: submit tasks
    dispatcher.submits.clear()
    for node_id in first:
        submit_node(ctx, node_id)
    # What the database held in flight when each refill was sent (a POST, or a task).
    in_flight_at_refill: list[set[int]] = []
    generate, submit = ctx.client.generate, dispatcher.submit

    def spy_post(*args: Any, **kwargs: Any) -> Any:
        in_flight_at_refill.append({j.node_id for j in ctx.repo.in_flight_jobs()})
        return generate(*args, **kwargs)

    def spy_task(node_ids: Sequence[int]) -> None:
        in_flight_at_refill.append({j.node_id for j in ctx.repo.in_flight_jobs()})
        submit(node_ids)
        for node_id in node_ids:
            submit_node(ctx, node_id)

    if in_sweeper:
        ctx.client.generate = spy_post  # type: ignore[method-assign]
    dispatcher.submit = spy_task  # type: ignore[method-assign]

    def next_wave(wave: list[int]) -> list[int]:
        """Wait for the wave's jobs to end, sweep until its slots are refilled; the new wave."""
        in_flight_at_refill.clear()
        time.sleep(0.3)  # both jobs ended
        deadline = time.monotonic() + 5
        while len(in_flight_at_refill) < (2 if in_sweeper else 1):
            assert time.monotonic() < deadline, "the freed slots were not refilled"
            sweep(ctx, state)
            time.sleep(0.01)
        refill = [j.node_id for j in ctx.repo.in_flight_jobs()]
        while len(refill) < 2 and time.monotonic() < deadline:  # their acceptances recorded
            time.sleep(0.01)
            refill = [j.node_id for j in ctx.repo.in_flight_jobs()]
        assert len(refill) == 2 and not set(refill) & set(wave)  # the cap: two, both new
        assert (dispatcher.submits == refill) if not in_sweeper else not dispatcher.submits
        return refill

    second = next_wave(first)
    assert all(seen == set() for seen in in_flight_at_refill)  # a first duration: recorded first
    dispatcher.submits.clear()
    next_wave(second)
    # Handed out before the endings were written.
    assert all(seen == set(second) for seen in in_flight_at_refill)


def test_a_first_job_of_a_model_is_next_looked_at_when_its_progress_says_it_ends(
    ctx: Context, sandbox: Sandbox
) -> None:
    """While a model's duration is unknown, two lists that see a job's progress rise put
    its next look where that progress reaches 1 if that comes before a fifth of its age."""
    sandbox.configure(latency=2.0, latency_spread=0.0)  # in progress from 0.6 s to 1.8 s
    record(ctx, ["progress"])
    state = SweeperState(api_host="sandbox")
    sweep(ctx, state)
    dispatcher = ctx.dispatch
    assert isinstance(dispatcher, QueueDispatcher)
    submit_node(ctx, dispatcher.submits[0])
    (job,) = ctx.repo.in_flight_jobs()

    def look_at(age: float) -> float:
        """List the job at this age; the age at which its next look is due."""
        time.sleep(max(0.0, (job.accepted_at - ctx.now()).total_seconds() + age))
        ctx.repo.schedule_polls({(job.row_id, job.node_id): ctx.now()})
        state.last_list_at = float("-inf")
        assert poll_jobs(ctx, state).list_calls == 1
        (after,) = ctx.repo.in_flight_jobs()
        assert after.status == "in-progress" and after.due_at is not None
        return (after.due_at - job.accepted_at).total_seconds()

    look_at(1.5)
    next_look = look_at(1.7)  # progress 0.825, rising 0.75 a second: 1 at 1.93 s
    assert 1.85 <= next_look <= 2.0  # a fifth of its age later: 2.04 s


def test_a_collect_downloads_its_nodes_outputs_side_by_side(ctx: Context, sandbox: Sandbox) -> None:
    """Four finished items, every CDN download stalling 0.5 s: one collect task stores them
    in about one stall, not four one after another."""
    sandbox.configure(latency=0.1, latency_spread=0.0)
    # Claims that outlast the stalled collect on a loaded machine (the fixture's 1 s lease
    # ran out once in the quick suite, and the collect's records were refused).
    ctx.tuning = dataclasses.replace(ctx.tuning, parallel_jobs=4, lease_seconds=5.0)
    ctx.repo.policy = ctx.tuning.policy()
    run_id = record(ctx, [f"side by side {n}" for n in range(4)])
    state = SweeperState(api_host="sandbox")
    dispatcher = ctx.dispatch
    assert isinstance(dispatcher, QueueDispatcher)
    sweep(ctx, state)
    for node_id in list(dispatcher.submits):
        submit_node(ctx, node_id)
    dispatcher.submits.clear()
    deadline = time.monotonic() + 10
    collected: set[int] = set()
    while len(collected) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
        sweep(ctx, state)
        collected = {n for batch in dispatcher.collects for n in batch}
    assert len(collected) == 4
    sandbox.configure(fault_slow_rate=1.0, slow_seconds=0.5)
    started = time.monotonic()
    results = collect_nodes(ctx, sorted(collected))
    took = time.monotonic() - started
    assert set(results.values()) == {"succeeded"}
    assert took < 1.5, f"{took:.2f} s: the downloads ran one after another"
    assert sandbox.stats()["faults"]["slow"] == 4
    sweep(ctx, state)
    assert report_of(ctx, run_id)["status"] == "succeeded"


def test_finished_jobs_are_collected_in_full_batches_while_more_work_comes(
    ctx: Context, sandbox: Sandbox
) -> None:
    """One get-bulk per batch: a wave finishing together while more items wait is not
    collected on its own; only the run's last batch goes out short."""
    sandbox.configure(latency=0.3)
    ctx.tuning = dataclasses.replace(
        ctx.tuning, parallel_jobs=4, collect_batch=3, collect_delay=30.0
    )
    ctx.repo.policy = ctx.tuning.policy()
    dispatcher = ctx.dispatch
    assert isinstance(dispatcher, QueueDispatcher)
    batches: list[int] = []
    collect = dispatcher.collect
    dispatcher.collect = lambda ids: (batches.append(len(ids)), collect(ids))  # type: ignore[method-assign]
    run_id = record(ctx, [f"batched {n}" for n in range(8)])
    drain(ctx, SweeperState(api_host="sandbox"), timeout=30)
    assert report_of(ctx, run_id)["status"] == "succeeded"
    assert sum(batches) == 8
    assert batches[:-1] == [3] * (len(batches) - 1) and len(batches) == 3
    assert sandbox.stats()["requests"]["POST /assets/get-bulk"] == 3


def two_jobs_apart(
    ctx: Context, sandbox: Sandbox, latency: float, apart: float
) -> tuple[Sweeper, InFlightJob, InFlightJob]:
    """Two one-job items of `latency` s submitted `apart` s from each other, in flight."""
    sandbox.configure(latency=latency, latency_spread=0.0)
    record(ctx, ["first", "second"])
    sweeper = Sweeper(ctx, sandbox.url)
    sweeper.tick()
    first_node, second_node = ctx.dispatch.submits  # type: ignore[attr-defined]
    submit_node(ctx, first_node)
    time.sleep(apart)
    submit_node(ctx, second_node)
    first, second = sorted(ctx.repo.in_flight_jobs(), key=lambda j: j.row_id)
    return sweeper, first, second


def test_the_first_jobs_to_finish_teach_the_others_when_to_be_looked_at(
    ctx: Context, sandbox: Sandbox
) -> None:
    """A model's duration is unknown until its first jobs end. The poll that sees them end
    schedules the others of the same model at their own expected finish, not at the next
    step of the unknown-duration cadence (a fifth of their age later)."""
    sweeper, first, second = two_jobs_apart(ctx, sandbox, latency=1.0, apart=0.15)
    first_node, second_node = first.node_id, second.node_id
    assert sweeper.state.expected(ctx, MODEL) is None  # nothing of this model finished yet
    # The first job has just ended (1 s), the second ends about 0.15 s after it.
    time.sleep(max(0.0, 1.02 - (ctx.now() - first.accepted_at).total_seconds()))
    now = ctx.now()
    ctx.repo.schedule_polls({(j.row_id, j.node_id): now for j in (first, second)})
    report = poll_jobs(ctx, sweeper.state)
    assert report.list_calls == 1 and report.finished == [first_node]
    (left,) = ctx.repo.in_flight_jobs()
    assert left.node_id == second_node and left.due_at is not None
    ends_in = 1.0 - (now - second.accepted_at).total_seconds()
    assert ends_in > 0, "the machine was too slow to see the two jobs apart"
    looks_in = (left.due_at - now).total_seconds()
    # Without the learned duration: max(0.2 x its age of about 0.85 s, 0.25) = 0.25 s.
    assert ends_in <= looks_in <= ends_in + 0.05


def test_the_rest_of_a_first_group_is_looked_at_when_it_ends_not_a_list_gap_later(
    ctx: Context, sandbox: Sandbox
) -> None:
    """The look that first sees a model's jobs end taught their duration; the rest of
    that group, due a few tens of milliseconds later, is listed then, although two list
    calls are otherwise at least 300 ms apart (a twentieth of 6 s). Left to the gap, the
    group's two halves would be resubmitted apart and stay apart, at two list calls a
    round."""
    ctx.tuning = dataclasses.replace(ctx.tuning, list_interval=None)
    sweeper, first, second = two_jobs_apart(ctx, sandbox, latency=6.0, apart=0.07)
    first_node, second_node = first.node_id, second.node_id
    time.sleep(max(0.0, 6.005 - (ctx.now() - first.accepted_at).total_seconds()))
    now = ctx.now()
    ctx.repo.schedule_polls({(j.row_id, j.node_id): now for j in (first, second)})
    report = poll_jobs(ctx, sweeper.state)
    assert report.list_calls == 1 and report.finished == [first_node], "the machine was too slow"
    (left,) = ctx.repo.in_flight_jobs()
    assert left.due_at is not None
    time.sleep(max(0.0, (left.due_at - ctx.now()).total_seconds()))
    # Still within the gap (a wide one, so that a busy machine stays within it too).
    assert sweeper.state.list_gap >= 0.25
    assert time.monotonic() - sweeper.state.last_list_at < sweeper.state.list_gap, "too slow"
    report = poll_jobs(ctx, sweeper.state)
    assert report.list_calls == 1 and report.finished == [second_node]


def test_a_job_seen_finalizing_is_looked_at_again_soon_while_its_duration_is_unknown(
    ctx: Context, sandbox: Sandbox
) -> None:
    """A model's first job, seen `finalizing` (its outputs being saved), is about to end:
    it is looked at again after a fiftieth of its age, not a fifth (0.37 s here), and the
    least gap between two lists lets that look through."""
    ctx.tuning = dataclasses.replace(ctx.tuning, list_interval=None)  # the default gaps
    sandbox.configure(latency=2.0, latency_spread=0.0)  # finalizing from 1.8 s to 2 s
    record(ctx, ["first"])
    sweeper = Sweeper(ctx, sandbox.url)
    sweeper.tick()
    (node,) = ctx.dispatch.submits  # type: ignore[attr-defined]
    submit_node(ctx, node)
    (job,) = ctx.repo.in_flight_jobs()
    time.sleep(max(0.0, 1.85 - (ctx.now() - job.accepted_at).total_seconds()))
    now = ctx.now()
    ctx.repo.schedule_polls({(job.row_id, job.node_id): now})
    assert poll_jobs(ctx, sweeper.state).list_calls == 1
    (seen,) = ctx.repo.in_flight_jobs()
    assert seen.status == "finalizing", "the machine was too slow"
    assert seen.due_at is not None
    # 2% of its age: 37 ms, and what the poll itself took (a twentieth would be 92 ms)
    assert FINALIZING_MIN <= (seen.due_at - now).total_seconds() < 0.07
    assert sweeper.state.list_gap == FINALIZING_MIN


def test_finished_outputs_whose_wait_ran_out_wait_for_a_group_about_to_finish(
    ctx: Context, sandbox: Sandbox
) -> None:
    """A finished job's outputs wait for company at most the collect delay, unless a job
    in flight is due to finish within a list gap of that: then both share one get-bulk
    (when the delay equals the job length, every wave was otherwise collected alone)."""
    ctx.tuning = dataclasses.replace(ctx.tuning, list_interval=None, collect_delay=0.45)
    ctx.repo.policy = ctx.tuning.policy()
    sweeper, first, second = two_jobs_apart(ctx, sandbox, latency=1.0, apart=0.5)
    sweeper.state.samples_cache[MODEL] = (time.monotonic(), [1.0])  # a 100 ms list gap
    ctx.repo.schedule_polls(
        {
            (first.row_id, first.node_id): first.accepted_at + timedelta(seconds=1.005),
            (second.row_id, second.node_id): second.accepted_at + timedelta(seconds=1.005),
        }
    )
    # The first job's outputs are due for collection at about 1.47 s, the second job ends
    # at about 1.5 s.
    deadline = time.monotonic() + 5
    while ctx.dispatch.collects == [] and time.monotonic() < deadline:  # type: ignore[attr-defined]
        sweeper.tick()
        time.sleep(0.005)
    assert ctx.dispatch.collects == [[first.node_id, second.node_id]]  # type: ignore[attr-defined]


def test_warming_up_a_worker_moves_nothing_and_asks_scenario_nothing(
    ctx: Context, sandbox: Sandbox
) -> None:
    """The warm-up runs the hot path's queries while a run is being recorded: it must not
    act on anything, not even on nodes that are due (a lost submit, a finished job)."""
    record(ctx, [f"icon {n}" for n in range(4)])
    state = SweeperState(api_host="sandbox")
    sweep(ctx, state)
    dispatcher = ctx.dispatch
    assert isinstance(dispatcher, QueueDispatcher)
    submit_node(ctx, dispatcher.submits.pop(0))  # one job accepted; the other tasks are lost
    lost = list(dispatcher.submits)
    dispatcher.submits.clear()
    time.sleep(ctx.tuning.lease_seconds + 0.3)  # their claims lapse; the job finishes

    def snapshot() -> list[Any]:
        with ctx.repo.engine.connect() as conn:
            return [
                sorted(repr(tuple(row)) for row in conn.execute(table.select()))
                for table in Base.metadata.sorted_tables
            ]

    # The sweep above read the plan's limits (once per process): the warm-up asks nothing.
    before, requests = snapshot(), dict(sandbox.stats()["requests"])
    warm(ctx)
    assert snapshot() == before
    assert sandbox.stats()["requests"] == requests
    assert dispatcher.submits == [] and dispatcher.collects == []
    sweep(ctx, state)  # whereas a sweep acts on them
    assert lost and set(lost) <= set(dispatcher.submits) and snapshot() != before


def test_a_pass_that_refills_slots_hands_out_its_collects_one_pass_later(
    ctx: Context, sandbox: Sandbox
) -> None:
    """The POSTs of a refill are not slowed by a collect's downloads and records that
    start beside them: the collect goes out on the next pass, and never later than that,
    however many passes hand out submissions."""
    ctx.tuning = dataclasses.replace(ctx.tuning, collect_batch=3)
    dispatcher = ctx.dispatch
    assert isinstance(dispatcher, QueueDispatcher)
    record(ctx, [f"icon {n}" for n in range(5)])  # the cap is 3: 3 now, 2 when slots free
    state = SweeperState(api_host="sandbox")
    sweep(ctx, state)
    assert submit_nodes(ctx, dispatcher.submits) and len(dispatcher.submits) == 3
    dispatcher.submits.clear()
    refill = sweep_until_a_list_sees_jobs_end(ctx, state)
    # The three jobs finished together: a full collect batch, and two slots refilled.
    assert len(refill.poll.finished) == 3 and refill.submitted == 2
    assert dispatcher.collects == []
    record(ctx, ["one more"])  # the next pass hands out a submission again
    after = sweep(ctx, state)
    assert after.submitted == 1
    assert [sorted(batch) for batch in dispatcher.collects] == [sorted(refill.poll.finished)]
