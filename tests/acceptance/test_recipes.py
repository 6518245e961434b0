"""Acceptance: recipes (multi-step chains), every generation endpoint, lineage as a chain.

The real `pipeline` command in a subprocess against one sandbox, whose stats prove what was
(and was not) paid for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
from PIL import Image

from pipeline.sandbox import Sandbox
from tests.acceptance.conftest import ROOT, Cli, write_manifest

BACKGROUND_REMOVAL = "model_photoroom-background-removal"
UPSCALE = "model_upscale-v3"


def jobs_by_model(sandbox: Sandbox) -> dict[str, int]:
    return dict(sandbox.stats()["jobs_by_model"])


def test_transparent_icons_recipe_then_a_rerun_pays_only_for_the_changed_upscale(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = tmp_path / "transparent-icons.yaml"
    shutil.copy(ROOT / "manifests" / "transparent-icons.yaml", manifest)
    first = cli("run", str(manifest), "--wait", "--json", timeout=240)
    assert first.code == 0, first.stderr
    doc = first.json()
    assert doc["counts"]["succeeded"] == 3
    generation = "model_bfl-flux-2-dev"
    assert jobs_by_model(sandbox) == {generation: 3, BACKGROUND_REMOVAL: 6, UPSCALE: 6}

    # Every final icon is the upscaled (256 -> 512) cut-out, with a transparent background.
    finals = [o for item in doc["items"] for o in item["outputs"]]
    assert len(finals) == 6
    for out in finals:
        path = Path(out["uri"].removeprefix("file://"))
        with Image.open(path) as image:
            assert image.size == (512, 512) and image.mode == "RGBA"
            assert image.getextrema()[3][0] == 0  # some pixels are fully transparent
        assert [step["model"] for step in out["chain"]] == [generation, BACKGROUND_REMOVAL, UPSCALE]
    cutouts = sorted((tmp_path / "assets" / "transparent-icons" / "cutouts").rglob("*.png"))
    assert len(cutouts) == 6  # the intermediate step with an `output` is stored too

    # A renamed copy anywhere is traced by its bytes through the whole chain.
    copy = tmp_path / "elsewhere" / "my-favourite.png"
    copy.parent.mkdir()
    shutil.copy(Path(finals[0]["uri"].removeprefix("file://")), copy)
    traced = cli("lineage", str(copy))
    assert traced.code == 0, traced.stderr
    for expected in (UPSCALE, BACKGROUND_REMOVAL, generation, "healing-potion", doc["run_id"]):
        assert expected in traced.stdout
    for step in finals[0]["chain"]:
        assert step["job_id"] in traced.stdout
    as_json = cli("lineage", str(copy), "--json").json()["matches"][0]
    chain = as_json["chain"]
    assert chain[1]["input_asset"] == chain[0]["output_asset"]  # parent -> child by asset id
    assert chain[2]["input_asset"] == chain[1]["output_asset"]
    assert as_json["asset"]["parent"] == chain[1]["output_asset"]
    # The file explains itself too: its sidecar names the asset it was made from.
    key = as_json["object"]["key"]
    sidecar = json.loads((tmp_path / "assets" / ".meta" / f"{key}.json").read_text())
    assert sidecar["metadata"]["parent-asset-id"] == chain[1]["output_asset"]
    assert sidecar["metadata"]["step"] == "2"

    # Change only the upscale factor: only upscale jobs are submitted, and the new files
    # replace the old ones at the same keys.
    manifest.write_text(manifest.read_text().replace("upscaleFactor: 2", "upscaleFactor: 4"))
    second = cli("run", str(manifest), "--wait", "--json", timeout=240)
    assert second.code == 0, second.stderr
    assert jobs_by_model(sandbox) == {generation: 3, BACKGROUND_REMOVAL: 6, UPSCALE: 12}
    assert sandbox.stats()["duplicate_submissions"] == 0
    for item in second.json()["items"]:
        assert item["reused_nodes"] == 3  # the generation and its two background removals
        for out in item["outputs"]:
            with Image.open(Path(out["uri"].removeprefix("file://"))) as image:
                assert image.size == (1024, 1024)

    # Nothing changed: nothing is paid for at all.
    third = cli("run", str(manifest), "--wait", "--json", timeout=240)
    assert third.code == 0, third.stderr
    assert third.json()["counts"]["skipped"] == 3
    assert jobs_by_model(sandbox)[UPSCALE] == 12


def test_sprite_sheet_recipe_slices_every_sheet_into_numbered_frames(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = tmp_path / "sprite-sheet.yaml"
    shutil.copy(ROOT / "manifests" / "sprite-sheet.yaml", manifest)
    result = cli("run", str(manifest), "--wait", "--json", timeout=240)
    assert result.code == 0, result.stderr
    frames = sorted(
        p.name for p in (tmp_path / "assets" / "slime-walk-cycle" / "green-slime-walk").iterdir()
    )
    assert frames == [f"frame-{n:02d}.png" for n in range(4)]
    with Image.open(tmp_path / "assets/slime-walk-cycle/green-slime-walk/frame-00.png") as im:
        assert im.size == (256, 256)


def test_a_trained_sdxl_lora_runs_on_its_inference_endpoint_and_is_polled_in_the_list(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = tmp_path / "knights.yaml"
    shutil.copy(ROOT / "manifests" / "sdxl-lora-characters.yaml", manifest)
    priced = cli("run", str(manifest), "--dry-run", "--json")
    assert priced.code == 0, priced.stderr
    assert priced.json()["creative_units"] > 0
    assert sandbox.stats()["jobs_created"] == 0

    result = cli("run", str(manifest), "--wait", "--json", timeout=240)
    assert result.code == 0, result.stderr
    stats = sandbox.stats()
    assert stats["requests"].get("POST /generate/txt2img") == 4  # 2 dry runs, 2 jobs
    assert stats["jobs_by_type"] == {"inference": 2, "custom": 2}
    # The list poll asked for both job types: no job needed polls of its own.
    assert stats["requests"].get("GET /jobs/{jobId}", 0) == 0
    doc = result.json()
    assert all(len(item["outputs"]) == 1 for item in doc["items"])

    # The same model on /generate/custom would be refused by the API: the run's online
    # check says so at the manifest's line, before anything is paid.
    write_manifest(
        tmp_path,
        manifest.read_text()
        .replace("endpoint: txt2img", "endpoint: custom")
        .replace("numSamples", "numOutputs"),
        name="custom.yaml",
    )
    jobs_before = sandbox.stats()["jobs_created"]
    refused = cli("run", str(tmp_path / "custom.yaml"), "--wait")
    assert refused.code == 2
    assert "custom.yaml:10: endpoint:" in refused.stderr and "txt2img" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sandbox.stats()["jobs_created"] == jobs_before
    # Skipping the check, the API itself refuses it, and the item carries its error.
    paid = cli("run", str(tmp_path / "custom.yaml"), "--wait", "--json", "--no-online-check")
    assert paid.code == 1
    errors = [item["error"] for item in paid.json()["items"]]
    assert all("/generate/{inferenceType}" in (e or "") for e in errors)


def test_an_input_asset_that_vanished_is_uploaded_again(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    refs = tmp_path / "refs"
    refs.mkdir()
    shutil.copy(ROOT / "manifests" / "refs" / "shield.png", refs / "shield.png")
    text = """\
name: vanishing
model: model_bfl-flux-2-dev
seed: 5
params: {width: 128, height: 128}
items:
  - id: shield
    prompt: "wooden shield, PROMPT"
    image: refs/shield.png
"""
    manifest = write_manifest(tmp_path, text.replace("PROMPT", "winter"))
    first = cli("run", str(manifest), "--wait", "--json")
    assert first.code == 0, first.stderr
    assert sandbox.stats()["requests"]["POST /assets"] == 1
    (uploaded,) = {
        job["metadata"]["input"]["image"]
        for job in httpx.get(f"{sandbox.url}/jobs", auth=("sandbox", "sandbox")).json()["jobs"]
    }
    deleted = httpx.request(
        "DELETE",
        f"{sandbox.url}/assets",
        json={"assetIds": [uploaded]},
        auth=("sandbox", "sandbox"),
    )
    assert deleted.status_code == 200

    write_manifest(tmp_path, text.replace("PROMPT", "summer"))
    second = cli("run", str(manifest), "--wait", "--json")
    assert second.code == 0, second.stderr
    assert sandbox.stats()["requests"]["POST /assets"] == 2


def test_another_manifests_item_never_takes_a_stored_key(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Replacing is for an item's own files; a key holding another item's is refused."""
    text = """\
name: NAME
model: model_bfl-flux-2-dev
seed: 5
params: {width: 64, height: 64}
output: "library/{item}/{index}.{ext}"
items:
  - id: sword
    prompt: "PROMPT"
"""
    alpha = write_manifest(
        tmp_path, text.replace("NAME", "alpha").replace("PROMPT", "a"), name="a.yaml"
    )
    assert cli("run", str(alpha), "--wait").code == 0
    key = tmp_path / "assets" / "library" / "sword" / "0.png"
    stored = key.read_bytes()
    jobs = sandbox.stats()["jobs_created"]
    beta = write_manifest(
        tmp_path, text.replace("NAME", "beta").replace("PROMPT", "b"), name="b.yaml"
    )
    refused = cli("run", str(beta), "--wait")
    assert refused.code == 2
    assert f"{beta.resolve()}:7: items[0].output: library/sword/0.png already holds" in (
        refused.stderr
    )
    assert "item 'sword' of manifest 'alpha'" in refused.stderr
    assert sandbox.stats()["jobs_created"] == jobs and key.read_bytes() == stored
