"""Acceptance: `pipeline plan`, `validate --online` and budgets, against the sandbox.

The sandbox describes its models' inputs (GET /models/{id}), prices dry runs (HTTP 269)
and counts the jobs it created and the CU it billed: its stats prove what was paid.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.sandbox import Sandbox
from tests.acceptance.conftest import ROOT, Cli, write_manifest

EXAMPLE_CU = 40.0  # forest-icons: 8 images of 256x256 at 5 CU each on the sandbox


def _copy_manifests(tmp_path: Path) -> Path:
    folder = tmp_path / "manifests"
    shutil.copytree(ROOT / "manifests", folder)
    return folder


def _plan(doc: dict, name: str) -> dict:
    return next(p for p in doc["manifests"] if p["manifest"] == name)


def test_plan_of_a_folder_prices_what_would_run_then_unchanged_items_at_zero(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    folder = _copy_manifests(tmp_path)
    first = cli("plan", str(folder), "--json")
    assert first.code == 0, first.stderr
    doc = first.json()
    example = _plan(doc, "forest-icons")
    assert example["counts"]["new"] == 3
    assert example["creative_units"] == EXAMPLE_CU
    assert len(doc["manifests"]) == len(list(folder.glob("*.yaml")))
    assert doc["creative_units"] >= EXAMPLE_CU
    assert sandbox.stats()["jobs_created"] == 0  # planning pays nothing

    table = cli("plan", str(folder / "example.yaml"))
    assert table.code == 0, table.stderr
    assert "iron-sword" in table.stdout and "40 CU" in table.stdout

    ran = cli("run", str(folder / "example.yaml"), "--wait", "--json", timeout=240)
    assert ran.code == 0, ran.stderr

    # Edit the manifest: one item changed, one removed, one added; the rest unchanged.
    text = (folder / "example.yaml").read_text()
    text = text.replace('"iron sword icon, game item, top-down view"', '"steel sword icon"')
    head, _, _ = text.partition("  - id: shield-winter")
    text = head + '  - id: bronze-axe\n    prompt: "bronze axe icon"\n'
    (folder / "example.yaml").write_text(text)
    after = cli("plan", str(folder / "example.yaml"), "--json")
    assert after.code == 0, after.stderr
    plan = _plan(after.json(), "forest-icons")
    status = {item["id"]: item["status"] for item in plan["items"]}
    assert status == {
        "iron-sword": "changed",
        "healing-potion": "unchanged",
        "bronze-axe": "new",
        "shield-winter": "removed",
    }
    cost = {item["id"]: item["creative_units"] for item in plan["items"]}
    assert cost["healing-potion"] == 0 and cost["shield-winter"] == 0
    assert plan["creative_units"] == cost["iron-sword"] + cost["bronze-axe"] == 20.0

    markdown = cli("plan", str(folder / "example.yaml"), "--markdown")
    assert markdown.code == 0, markdown.stderr
    assert "| `healing-potion` | unchanged | skipped | 0 |" in markdown.stdout
    assert "**Total: 20 CU**" in markdown.stdout


def test_plan_of_a_recipe_rerun_reuses_the_generation_and_prices_only_the_changed_step(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = tmp_path / "transparent-icons.yaml"
    shutil.copy(ROOT / "manifests" / "transparent-icons.yaml", manifest)
    before = cli("plan", str(manifest), "--json")
    assert before.code == 0, before.stderr
    item = _plan(before.json(), "transparent-icons")["items"][0]
    later_steps = [s for s in item["steps"] if s["step"] > 0]
    # Steps run on outputs that do not exist yet: estimated or left for run time, and said so.
    assert all(s["run"] and set(s["priced"]) <= {"estimated", "at run time"} for s in later_steps)
    assert cli("run", str(manifest), "--wait", timeout=240).code == 0

    text = manifest.read_text()
    assert "upscaleFactor: 2" in text
    manifest.write_text(text.replace("upscaleFactor: 2", "upscaleFactor: 4"))
    after = cli("plan", str(manifest), "--json")
    assert after.code == 0, after.stderr
    plan = _plan(after.json(), "transparent-icons")
    assert {i["status"] for i in plan["items"]} == {"changed"}
    for item in plan["items"]:
        generation, cutout, upscale = item["steps"]
        assert generation["reused"] == 1 and generation["run"] == 0
        assert cutout["run"] == 0 and cutout["reused"] > 0
        assert upscale["reused"] == 0 and upscale["priced"] == {"exact": upscale["run"]}
    jobs = sandbox.stats()["jobs_created"]
    ran = cli("run", str(manifest), "--wait", "--json", timeout=240)
    assert ran.code == 0, ran.stderr
    assert ran.json()["creative_units"] == plan["creative_units"]
    assert sandbox.stats()["jobs_created"] - jobs == sum(
        s["run"] for i in plan["items"] for s in i["steps"]
    )


def test_plan_refuses_the_manifests_run_would_refuse_with_the_same_lines(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    """`plan` is asked before `run`: it reads the arguments as `run` does, so a plan that
    passes is not followed by a run that refuses the same files."""
    twin = 'name: twins\nmodel: model_test-image\nseed: 1\nitems:\n  - id: a\n    prompt: "a"\n'
    write_manifest(tmp_path, twin, "a.yaml")
    write_manifest(tmp_path, twin, "b.yaml")  # the same `name:` twice
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in ([str(tmp_path)], [str(empty)]):
        planned, ran = cli("plan", *args), cli("run", *args)
        assert planned.code == ran.code == 2, planned.stderr
        assert planned.stderr == ran.stderr and "Traceback" not in planned.stderr
    assert "is also used by" in cli("plan", str(tmp_path)).stderr
    assert "no *.yaml or *.yml manifest in this folder" in cli("plan", str(empty)).stderr
    assert sandbox.stats()["jobs_created"] == 0


def test_validate_online_names_a_misspelt_input_at_its_line_with_a_did_you_mean(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    path = write_manifest(
        tmp_path,
        "name: typo\n"
        "model: model_bfl-flux-2-dev\n"
        "seed: 1\n"
        "items:\n"
        "  - id: a\n"
        "    prompt: a red apple\n"
        "    params:\n"
        "      widht: 512\n"
        "      guidance: 99\n",
    )
    assert cli("validate", str(path)).code == 0  # offline, the typo passes
    done = cli("validate", "--online", str(path))
    assert done.code == 2
    lines = done.stderr.strip().splitlines()
    assert (
        f"{path}:8: items[0].params.widht: model model_bfl-flux-2-dev has no input "
        "'widht' (did you mean 'width'?)" in lines
    )
    assert any(
        line.startswith(f"{path}:9: items[0].params.guidance: must be within") for line in lines
    )
    ran = cli("run", str(path), "--wait")
    assert ran.code == 2 and "widht" in ran.stderr
    assert sandbox.stats()["jobs_created"] == 0


def test_validate_online_names_the_endpoint_for_a_model_custom_cannot_run(
    cli: Cli, tmp_path: Path
) -> None:
    path = write_manifest(
        tmp_path,
        "name: lora\nmodel: model_sandbox-sdxl-lora\nseed: 1\n"
        "items:\n  - id: a\n    prompt: a knight\n",
    )
    done = cli("validate", "--online", str(path))
    assert done.code == 2
    assert (
        f"{path}:2: model: model model_sandbox-sdxl-lora (type sd-xl-lora) cannot run on "
        "/generate/custom; set `endpoint: txt2img`" in done.stderr
    )


def test_a_manifest_over_budget_exits_3_before_any_job_is_created(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = tmp_path / "example.yaml"
    shutil.copy(ROOT / "manifests" / "example.yaml", manifest)
    shutil.copytree(ROOT / "manifests" / "refs", tmp_path / "refs")
    manifest.write_text(manifest.read_text().replace("seed: 42", "seed: 42\nbudget: 25"))
    done = cli("run", str(manifest), "--wait")
    assert done.code == 3, done.stderr
    assert "40 CU, over the budget of 25 CU" in done.stderr
    assert "healing-potion" in done.stderr  # the table of what it would cost
    as_json = cli("run", str(manifest), "--wait", "--json", "--budget", "30")
    assert as_json.code == 3
    doc = as_json.json()
    assert doc["exit_code"] == 3 and doc["error"]["code"] == "over_budget"
    assert doc["plan"]["creative_units"] == EXAMPLE_CU
    assert sandbox.stats()["jobs_created"] == 0
    assert cli("status").code == 1  # no run was recorded


def test_a_run_stops_within_its_budget_and_cancels_the_rest_with_the_reason(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    items = "".join(f"  - id: item-{n}\n    prompt: icon number {n}\n" for n in range(8))
    path = write_manifest(
        tmp_path,
        "name: capped\nmodel: model_bfl-flux-2-dev\nseed: 3\n"
        "params: {width: 256, height: 256}\n" + "items:\n" + items,
    )
    # The plan of a forced re-run is not checked up front (it would skip nothing): the
    # budget is enforced while running, submission by submission.
    assert cli("run", str(path), "--wait").code == 0
    paid = sandbox.stats()["creative_units"]
    done = cli("run", str(path), "--wait", "--json", "--force", "--budget", "17", timeout=240)
    assert done.code == 1, done.stderr
    doc = done.json()
    spent = sandbox.stats()["creative_units"] - paid
    assert spent <= 17  # each item costs 5 CU: 3 run, the 4th would pass the budget
    assert spent == doc["creative_units"] == 15
    canceled = [i for i in doc["items"] if i["status"] == "canceled"]
    assert len(canceled) == 5
    assert all(
        i["error"] == "budget of 17 CU reached: 15 CU billed"
        or i["error"].startswith("budget of 17 CU reached")
        for i in canceled
    )
