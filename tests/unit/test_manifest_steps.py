"""Recipes and endpoints in manifests: `steps`, `endpoint`, `overwrite`, keys across fan-out."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.errors import ManifestError
from pipeline.manifest import load_manifest

RECIPE = """
name: icons
model: model_bfl-flux-2-dev
seed: 1
params: {numOutputs: 2}
steps:
  - model: model_photoroom-background-removal
    output: "{manifest}/cut/{item}/{index}.{ext}"
  - model: model_upscale-v3
    params: {upscaleFactor: 2}
output: "{manifest}/{item}/{index}.{ext}"
items:
  - id: potion
    prompt: "potion"
  - id: sheet
    prompt: "sprite sheet"
    params: {numOutputs: 1}
    steps:
      - model: model_scenario-image-slicer
        params: {xSubdivisions: 3, ySubdivisions: 2}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, text))
    return info.value.problems


def test_steps_expand_with_fan_out_and_item_overrides(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, RECIPE))
    potion, sheet = manifest.items
    assert [s.model for s in potion.steps] == [
        "model_photoroom-background-removal",
        "model_upscale-v3",
    ]
    assert potion.num_outputs == 2 and potion.generation_outputs == 2
    assert [s.model for s in sheet.steps] == ["model_scenario-image-slicer"]
    assert sheet.num_outputs == 6  # one sheet, 3x2 tiles
    keys = manifest.planned_keys(potion)
    assert keys == [
        (1, 0, "icons/cut/potion/0.png"),
        (1, 1, "icons/cut/potion/1.png"),
        (2, 0, "icons/potion/0.png"),
        (2, 1, "icons/potion/1.png"),
    ]
    assert [k for _, _, k in manifest.planned_keys(sheet)][-1] == "icons/sheet/5.png"
    # A step's input is Scenario's asset id; the pipeline sets `image` itself.
    body = potion.steps[1].request_body("asset_abc")
    assert body == {"upscaleFactor": 2, "image": "asset_abc"}


def test_the_item_key_covers_the_recipe_and_the_generation_key_does_not(
    tmp_path: Path,
) -> None:
    first = load_manifest(write(tmp_path, RECIPE)).items[0]
    changed = load_manifest(write(tmp_path, RECIPE.replace("upscaleFactor: 2", "upscaleFactor: 4")))
    second = changed.items[0]
    assert first.generation_key == second.generation_key  # the generation can be reused
    assert first.item_key != second.item_key
    plain = (
        RECIPE.split("steps:")[0]
        + 'output: "{manifest}/{item}/{index}.{ext}"\n'
        + (RECIPE.split('output: "{manifest}/{item}/{index}.{ext}"')[1])
    )
    no_steps = load_manifest(write(tmp_path, plain)).items[0]
    assert no_steps.item_key == no_steps.generation_key  # as before recipes existed


def test_an_inference_endpoint_sends_the_model_as_model_id(tmp_path: Path) -> None:
    manifest = load_manifest(
        write(
            tmp_path,
            """
            name: knights
            model: model_my-sdxl-lora
            endpoint: txt2img
            seed: 3
            params: {numSamples: 2}
            items:
              - id: captain
                prompt: "knight captain"
            """,
        )
    )
    (item,) = manifest.items
    assert item.endpoint == "txt2img" and item.num_outputs == 2
    body = item.request_body(manifest, {})
    assert body["modelId"] == "model_my-sdxl-lora" and body["numSamples"] == 2


def test_recipe_mistakes_are_reported_at_their_line(tmp_path: Path) -> None:
    text = """
    name: icons
    model: model_bfl-flux-2-dev
    endpoint: txt2im
    trained_model: model_style
    seed: 1
    params: {numOutputs: 2}
    steps:
      - model: model_photoroom-background-removal
        params: {image: asset_x}
        modle: typo
      - model: model_upscale-v3
        output: "{manifest}/{item}/{index}.{ext}"
    output: "{manifest}/{item}.{ext}"
    overwrite: sometimes
    items:
      - id: potion
        prompt: "potion"
    """
    found = problems(tmp_path, text)
    path = tmp_path / "m.yaml"
    assert f"{path}:3: endpoint: unknown endpoint 'txt2im' (did you mean 'txt2img'?)" in found
    assert any(p.startswith(f"{path}:4: trained_model: with endpoint") for p in found)
    assert any(p.startswith(f"{path}:10: steps[0].modle: unknown field") for p in found)
    assert any(p.startswith(f"{path}:9: steps[0].params.image: 'image' is set by") for p in found)
    assert any(p.startswith(f"{path}:12: steps[1].output: the last step's outputs") for p in found)
    assert any(p.startswith(f"{path}:14: overwrite: must be one of") for p in found)


def test_templates_must_tell_fanned_out_outputs_apart(tmp_path: Path) -> None:
    text = RECIPE.replace(
        'output: "{manifest}/{item}/{index}.{ext}"', 'output: "{manifest}/{item}.{ext}"'
    )
    found = problems(tmp_path, text)
    assert any(": output: must contain {index}: an item makes up to 6 outputs" in p for p in found)


def test_an_intermediate_output_may_not_collide_with_the_final_one(tmp_path: Path) -> None:
    text = RECIPE.replace("{manifest}/cut/{item}/{index}.{ext}", "{manifest}/{item}/{index}.{ext}")
    found = problems(tmp_path, text)
    assert any("item 'potion' writes twice to 'icons/potion/0.png'" in p for p in found)


def test_a_fan_out_over_the_cap_is_refused_before_any_key_is_rendered(tmp_path: Path) -> None:
    slicer = (
        "  - model: model_scenario-image-slicer\n    params: {xSubdivisions: 6, ySubdivisions: 6}\n"
    )
    text = RECIPE.replace("numOutputs: 2}", "numOutputs: 8}").replace(
        "  - model: model_upscale-v3\n    params: {upscaleFactor: 2}\n",
        slicer + '    output: "{manifest}/t/{item}/{index}.{ext}"\n' + slicer,
    )
    found = problems(tmp_path, text)
    assert any("the recipe makes 10368 outputs for this item; at most 1024" in p for p in found)
