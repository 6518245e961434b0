"""Acceptance: the `pipeline` command in a subprocess, end to end against the sandbox."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import shutil
import socket
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from pipeline.capacity import INITIAL
from pipeline.sandbox import Sandbox
from tests.acceptance.conftest import ROOT, Cli, write_manifest

GENERATE = "POST /generate/custom/{modelId}"

ICONS = """\
name: acceptance-icons
model: model_bfl-flux-2-dev
trained_model: model_style_acceptance
seed: 42
params: {numOutputs: 2, width: 128, height: 128}
output: "{manifest}/{item}/{index}.{ext}"
items:
  - id: iron-sword
    prompt: "iron sword icon, game item"
  - id: healing-potion
    prompt: "healing potion icon, red liquid"
    seed: 7
    params: {numOutputs: 1}
  - id: oak-shield
    prompt: "oak shield icon"
"""


def generate_calls(sandbox: Sandbox) -> int:
    return int(sandbox.stats()["requests"].get(GENERATE, 0))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_stores_every_output_with_the_sha256_the_sandbox_served(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, ICONS)
    result = cli("run", str(manifest), "--wait", "--json")
    assert result.code == 0, result.stderr
    doc = result.json()
    assert doc["status"] == "succeeded"
    assert doc["manifest"]["name"] == "acceptance-icons"
    assert doc["manifest"]["sha256"] == sha256_file(manifest)
    assert doc["counts"] == {
        "total": 3,
        "succeeded": 3,
        "failed": 0,
        "skipped": 0,
        "canceled": 0,
        "pending": 0,
    }
    assert doc["creative_units"] > 0
    served = sandbox.stats()["images"]
    outputs = [o for item in doc["items"] for o in item["outputs"]]
    assert len(outputs) == 5  # 2 + 1 + 2
    for item in doc["items"]:
        assert item["status"] == "succeeded"
        assert item["attempts"] == 1 and len(item["jobs"]) == 1
        assert item["jobs"][0].startswith("job_")
        for output in item["outputs"]:
            path = Path(output["uri"].removeprefix("file://"))
            assert path.is_file()
            assert path.relative_to(tmp_path / "assets").as_posix() == (
                f"acceptance-icons/{item['id']}/{output['index']}.png"
            )
            assert sha256_file(path) == output["sha256"] == served[output["asset_id"]]
            assert output["bytes"] == path.stat().st_size
    assert generate_calls(sandbox) == 3
    assert sandbox.stats()["duplicate_submissions"] == 0


# `pipeline` with its run's recording held 0.5 s, as a large manifest's is: the sweeper
# started beside it has made its first pass, found nothing, and gone to sleep by then.
SLOW_RECORDING = """
import sys, time
from pipeline.cli import main
from pipeline.repository import Repository
record_run = Repository.record_run
def slow(self, **fields):
    time.sleep(0.5)
    return record_run(self, **fields)
Repository.record_run = slow
sys.exit(main())
"""


def test_a_runs_first_jobs_go_out_once_it_is_recorded_not_at_the_sweepers_next_tick(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    """The sweeper takes its lease and makes its first pass while the runs are recorded,
    and is rung once they are: their first jobs do not wait out its tick (5 s here)."""
    manifest = write_manifest(tmp_path, ICONS)
    slow = dataclasses.replace(cli, command=[sys.executable, "-c", SLOW_RECORDING])
    result = slow("run", str(manifest), "--wait", "--json", PIPELINE_SWEEP_TICK="5")
    assert result.code == 0, result.stderr
    recorded = datetime.fromisoformat(result.json()["created_at"]).timestamp()
    first_job = min(job.created for job in sandbox.store.jobs.values())
    assert 0 < first_job - recorded < 2.0


def test_second_run_skips_stored_items_and_submits_nothing(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, ICONS)
    first = cli("run", str(manifest), "--wait", "--json")
    assert first.code == 0, first.stderr
    submitted = generate_calls(sandbox)

    second = cli("run", str(manifest), "--wait", "--json")
    assert second.code == 0, second.stderr
    doc = second.json()
    assert doc["run_id"] != first.json()["run_id"]
    assert doc["counts"]["skipped"] == 3 and doc["counts"]["succeeded"] == 0
    assert all(item["status"] == "skipped" for item in doc["items"])
    # The skipped items still say where their files are.
    assert [o["sha256"] for i in doc["items"] for o in i["outputs"]] == [
        o["sha256"] for i in first.json()["items"] for o in i["outputs"]
    ]
    assert generate_calls(sandbox) == submitted

    # A changed seed is a changed item: a nightly exists to turn such edits into new files.
    # Only that item is generated again, and its new image replaces the old one at the same
    # key; lineage keeps both versions.
    key = tmp_path / "assets" / "acceptance-icons" / "healing-potion" / "0.png"
    old_sha = sha256_file(key)
    write_manifest(tmp_path, ICONS.replace("seed: 7", "seed: 8"))
    third = cli("run", str(manifest), "--wait", "--json")
    assert third.code == 0, third.stderr
    statuses = {i["id"]: i["status"] for i in third.json()["items"]}
    assert statuses == {
        "iron-sword": "skipped",
        "healing-potion": "succeeded",
        "oak-shield": "skipped",
    }
    assert generate_calls(sandbox) == submitted + 1
    new_sha = sha256_file(key)
    assert new_sha != old_sha
    traced = cli("lineage", str(key), "--json")
    assert traced.code == 0, traced.stderr
    match = traced.json()["matches"][0]
    assert match["object"]["sha256"] == new_sha and match["object"]["current"]
    assert [v["sha256"] for v in match["versions"]] == [old_sha, new_sha]

    # A team that wants the old refusal says `overwrite: never`: refused before paying.
    write_manifest(
        tmp_path, ICONS.replace("seed: 7", "seed: 9").replace("items:", "overwrite: never\nitems:")
    )
    refused = cli("run", str(manifest), "--wait", "--json")
    assert refused.code == 2
    assert f"{manifest.resolve()}:11: items[1].output:" in refused.stderr
    assert "acceptance-icons/healing-potion/0.png already holds" in refused.stderr
    assert "overwrite: never" in refused.stderr
    assert generate_calls(sandbox) == submitted + 1


def test_force_regenerates_and_deleted_outputs_are_not_trusted(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, ICONS)
    assert cli("run", str(manifest), "--wait").code == 0
    base = generate_calls(sandbox)
    assert cli("run", str(manifest), "--wait", "--force").code == 0
    assert generate_calls(sandbox) == base + 3
    # A stored file that vanished from the bucket is not "verified": it is made again.
    (tmp_path / "assets" / "acceptance-icons" / "oak-shield" / "1.png").unlink()
    result = cli("run", str(manifest), "--wait", "--json")
    assert result.code == 0, result.stderr
    statuses = {i["id"]: i["status"] for i in result.json()["items"]}
    assert statuses["oak-shield"] == "succeeded"
    assert (tmp_path / "assets" / "acceptance-icons" / "oak-shield" / "1.png").is_file()


def test_failed_item_is_reported_then_retry_reruns_only_it(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox.configure(fail_prompts=["oak shield"])
    manifest = write_manifest(tmp_path, ICONS)
    result = cli("run", str(manifest), "--wait", "--json")
    assert result.code == 1, result.stderr
    doc = result.json()
    assert doc["status"] == "failed"
    items = {i["id"]: i for i in doc["items"]}
    failed = items["oak-shield"]
    assert failed["status"] == "failed"
    assert failed["attempts"] == 2  # resubmitted once, as configured by default
    assert failed["error"] and failed["hint"]
    assert items["iron-sword"]["status"] == "succeeded"

    status = cli("status", "--json")
    assert status.code == 0
    assert status.json()["run_id"] == doc["run_id"]
    assert status.json()["items"] == doc["items"]

    before = generate_calls(sandbox)
    sandbox.configure(fail_prompts=[])
    retried = cli("retry", doc["run_id"], "--wait", "--json")
    assert retried.code == 0, retried.stderr
    rdoc = retried.json()
    assert rdoc["run_id"] == doc["run_id"] and rdoc["status"] == "succeeded"
    ritems = {i["id"]: i for i in rdoc["items"]}
    assert ritems["oak-shield"]["status"] == "succeeded"
    assert ritems["oak-shield"]["attempts"] == 3
    assert ritems["iron-sword"]["jobs"] == items["iron-sword"]["jobs"]  # untouched
    assert generate_calls(sandbox) == before + 1


def test_lineage_traces_a_stored_file_to_its_job_asset_and_seed(cli: Cli, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, ICONS)
    doc = cli("run", str(manifest), "--wait", "--json").json()
    potion = next(i for i in doc["items"] if i["id"] == "healing-potion")
    output = potion["outputs"][0]
    file_path = output["uri"].removeprefix("file://")

    for ref in (file_path, output["uri"], output["sha256"], output["asset_id"], potion["jobs"][0]):
        result = cli("lineage", ref, "--json")
        assert result.code == 0, (ref, result.stderr)
        match = result.json()["matches"][0]
        assert match["item"]["id"] == "healing-potion"
        assert match["item"]["seed"] == 7
        assert match["item"]["prompt"] == "healing potion icon, red liquid"
        assert match["item"]["trained_model"] == "model_style_acceptance"
        assert match["job"]["id"] == potion["jobs"][0]
        assert match["asset"]["id"] == output["asset_id"]
        assert match["run"]["id"] == doc["run_id"]
        assert match["manifest"]["path"] == str(manifest.resolve())

    text = cli("lineage", file_path)
    assert text.code == 0
    assert potion["jobs"][0] in text.stdout and "seed" in text.stdout

    missing = cli("lineage", "asset_doesnotexist")
    assert missing.code == 1
    assert "not found" in missing.stderr


def test_invalid_manifest_exits_2_with_file_line_and_calls_nothing(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    bad = write_manifest(tmp_path, ICONS.replace("    seed: 7", "    seed: seven"), "bad.yaml")
    for command in (["validate", str(bad)], ["run", str(bad), "--wait"]):
        result = cli(*command)
        assert result.code == 2
        assert f"{bad}:12: items[1].seed:" in result.stderr
        assert "Traceback" not in result.stderr
    assert sum(sandbox.stats()["requests"].values()) == 0
    assert not (tmp_path / "lineage.db").exists()  # nothing recorded


def test_missing_credentials_exit_2_before_anything_is_submitted(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, ICONS)
    result = cli("run", str(manifest), "--wait", SCENARIO_API_KEY="", SCENARIO_API_SECRET="")
    assert result.code == 2
    assert "SCENARIO_API_KEY" in result.stderr and "Traceback" not in result.stderr
    assert sum(sandbox.stats()["requests"].values()) == 0


def test_wrong_credentials_exit_2_at_the_preflight_before_anything_is_recorded(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, ICONS)
    result = cli("run", str(manifest), "--wait", "--json", SCENARIO_API_SECRET="wrong-secret")
    assert result.code == 2, result.stderr
    assert "credentials" in result.stderr and "Traceback" not in result.stderr
    assert "wrong-secret" not in result.stdout + result.stderr
    assert generate_calls(sandbox) == 0
    assert "no runs recorded" in cli("status").stderr


def test_credentials_revoked_mid_run_stop_the_run_instead_of_retrying_every_item(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    secret = "secret-before-rotation-4711"
    sandbox.configure(api_secret=secret)
    many = ICONS + "".join(f"  - id: extra-{n}\n    prompt: extra icon {n}\n" for n in range(20))
    manifest = write_manifest(tmp_path, many)
    rotated = threading.Event()

    def rotate_after_the_first_generation() -> None:
        deadline = time.monotonic() + 60
        while generate_calls(sandbox) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        sandbox.configure(api_secret="rotated-secret")
        rotated.set()

    rotator = threading.Thread(target=rotate_after_the_first_generation, daemon=True)
    rotator.start()
    result = cli("run", str(manifest), "--wait", "--json", SCENARIO_API_SECRET=secret)
    rotator.join(5)
    assert rotated.is_set()
    assert result.code == 1, result.stderr
    doc = result.json()
    assert doc["status"] == "failed"
    unfinished = [i for i in doc["items"] if i["status"] != "succeeded"]
    assert len(unfinished) >= len(doc["items"]) - 4
    assert all("credentials" in (i["error"] or "") for i in unfinished)
    assert secret not in result.stdout + result.stderr
    lineage_db = b"".join(p.read_bytes() for p in tmp_path.glob("lineage.db*"))  # + WAL
    assert secret.encode() not in lineage_db
    assert base64.b64encode(f"sandbox:{secret}".encode()) not in lineage_db
    # At most one wave was tried before the run stopped: the first (a key nothing is known
    # about starts at capacity.INITIAL jobs in flight), of 23 items.
    assert generate_calls(sandbox) <= INITIAL < len(doc["items"])


def test_unreachable_database_or_bucket_exits_4_with_one_line(cli: Cli, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, ICONS)
    closed = _closed_port()
    cases = [
        {"PIPELINE_DATABASE_URL": f"postgresql://nobody:hunter2@127.0.0.1:{closed}/x"},
        {
            "PIPELINE_STORAGE_URL": "s3://missing-bucket/x",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}",
            "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "super-secret-key",
        },
        {"PIPELINE_BROKER_URL": f"redis://127.0.0.1:{closed}/0"},
    ]
    for env in cases:
        result = cli("run", str(manifest), "--wait", timeout=60, **env)
        assert result.code == 4, (env, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot reach"), lines
        assert "hunter2" not in result.stderr and "super-secret-key" not in result.stderr


def test_readme_example_runs_on_the_embedded_sandbox(tmp_path: Path) -> None:
    """The README's first command, in a fresh folder: `pipeline run ... --sandbox --wait`."""
    shutil.copytree(ROOT / "manifests", tmp_path / "manifests")
    cli = Cli(cwd=tmp_path, env={"PIPELINE_POLL_INTERVAL": "0.2"})
    result = cli("run", "manifests/example.yaml", "--sandbox", "--wait", "--json", timeout=180)
    assert result.code == 0, result.stderr
    doc = result.json()
    assert doc["status"] == "succeeded"
    for item in doc["items"]:
        for output in item["outputs"]:
            path = Path(output["uri"].removeprefix("file://"))
            assert path.is_file() and path.is_relative_to(tmp_path / "assets")
            assert sha256_file(path) == output["sha256"]
    assert (tmp_path / "pipeline.db").is_file()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_input_images_are_uploaded_once_and_sent_as_asset_ids(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    shutil.copytree(ROOT / "manifests" / "refs", tmp_path / "refs")
    text = ICONS + (
        "  - id: winter-shield\n"
        "    prompt: wooden shield, winter theme\n"
        "    image: refs/shield.png\n"
        "    params: {strength: 0.6}\n"
        "  - id: summer-shield\n"
        "    prompt: wooden shield, summer theme\n"
        "    image: refs/shield.png\n"
        "    params: {strength: 0.6}\n"
    )
    manifest = write_manifest(tmp_path, text)
    first = cli("run", str(manifest), "--wait", "--json")
    assert first.code == 0, first.stderr
    assert sandbox.stats()["uploads"] == 1  # two items, one file: one upload
    again = cli("run", str(manifest), "--wait", "--json", "--force")
    assert again.code == 0, again.stderr
    assert sandbox.stats()["uploads"] == 1  # the asset id recorded earlier is reused

    shield = next(i for i in first.json()["items"] if i["id"] == "winter-shield")
    match = cli("lineage", shield["outputs"][0]["sha256"], "--json").json()["matches"][0]
    (source,) = match["inputs"]
    assert source["role"] == "image" and source["asset_id"].startswith("asset_")
    assert source["sha256"] == sha256_file(tmp_path / "refs" / "shield.png")
