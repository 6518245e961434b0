"""Outputs are real, deterministic PNGs; the tool models really slice, cut out and upscale."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageStat


def image(data: bytes) -> Image.Image:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(data))


def visibly_different(a: bytes, b: bytes) -> bool:
    diff = ImageChops.difference(image(a).convert("RGB"), image(b).convert("RGB"))
    # Share of pixels that changed noticeably.
    changed = sum(count for value, count in enumerate(diff.convert("L").histogram()) if value > 16)
    return changed > 0.2 * diff.width * diff.height


def test_outputs_are_pngs_of_the_requested_size_and_differ_from_each_other(kit: Any) -> None:
    outs = kit.outputs(kit.generate(numOutputs=3, width=96, height=64, seed=1))
    assert [image(o).size for o in outs] == [(96, 64)] * 3
    assert visibly_different(outs[0], outs[1]) and visibly_different(outs[1], outs[2])


def test_same_model_body_and_index_give_the_same_bytes(kit: Any) -> None:
    first = kit.outputs(kit.generate(numOutputs=2, seed=9))
    again = kit.outputs(kit.generate(numOutputs=2, seed=9))
    assert first == again
    stats = kit.stats()
    assert stats["duplicate_submissions"] == 1
    assert len(set(stats["images"].values())) == 2  # four assets, two distinct images


@pytest.mark.parametrize(
    "change",
    [{"seed": 10}, {"prompt": "a blue shield"}, {"modelId": "model_trainedStyleXYZ"}],
    ids=["seed", "prompt", "trained-model"],
)
def test_seed_prompt_or_trained_model_changes_the_image(kit: Any, change: dict[str, Any]) -> None:
    base = kit.outputs(kit.generate(seed=9))[0]
    changed = kit.outputs(kit.generate(**{"seed": 9, **change}))[0]
    assert visibly_different(base, changed)


def test_stats_record_the_sha256_of_every_image(kit: Any) -> None:
    import hashlib

    job_id = kit.generate(numOutputs=2)
    outs = kit.outputs(job_id)
    images = kit.stats()["images"]
    assert sorted(images.values()) == sorted(hashlib.sha256(o).hexdigest() for o in outs)


def test_slicer_cuts_tiles_in_reading_order(kit: Any) -> None:
    source_job = kit.generate(width=120, height=64, seed=3)
    source_id = kit.wait(source_job)["metadata"]["assetIds"][0]
    source = image(kit.outputs(source_job)[0]).convert("RGB")
    tiles = kit.outputs(
        kit.generate(
            "model_scenario-image-slicer", image=source_id, xSubdivisions=3, ySubdivisions=2
        )
    )
    assert [image(t).size for t in tiles] == [(40, 32)] * 6
    for index, tile in enumerate(tiles):
        row, col = divmod(index, 3)
        expected = source.crop((col * 40, row * 32, col * 40 + 40, row * 32 + 32))
        assert ImageChops.difference(image(tile).convert("RGB"), expected).getbbox() is None


def test_slicer_defaults_to_two_by_two(kit: Any) -> None:
    source_id = kit.wait(kit.generate(width=64, height=64))["metadata"]["assetIds"][0]
    tiles = kit.outputs(kit.generate("model_scenario-image-slicer", image=source_id))
    assert [image(t).size for t in tiles] == [(32, 32)] * 4


def test_background_removal_gives_a_transparent_background(kit: Any) -> None:
    source_id = kit.wait(kit.generate(width=64, height=64))["metadata"]["assetIds"][0]
    [cut] = kit.outputs(kit.generate("model_photoroom-background-removal", image=source_id))
    result = image(cut)
    assert result.mode == "RGBA" and result.size == (64, 64)
    alpha = result.getchannel("A")
    assert alpha.getpixel((0, 0)) == 0  # the border is background
    assert alpha.getpixel((32, 32)) == 255 or alpha.getextrema() == (0, 255)


def test_upscale_multiplies_the_size(kit: Any) -> None:
    source_id = kit.wait(kit.generate(width=96, height=64))["metadata"]["assetIds"][0]
    [big] = kit.outputs(kit.generate("model_upscale-v3", image=source_id, upscaleFactor=4))
    assert image(big).size == (384, 256)


def test_tool_models_accept_a_data_url(kit: Any) -> None:
    out = io.BytesIO()
    Image.new("RGB", (20, 10), "purple").save(out, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    [big] = kit.outputs(kit.generate("model_upscale-v3", image=data_url))
    assert image(big).size == (40, 20)


def test_image_to_image_starts_from_the_input(kit: Any) -> None:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 255, 255)).save(out, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    asset_id = kit.http.post("/assets", json={"image": data_url, "name": "w.png"}).json()["asset"][
        "id"
    ]
    [light] = kit.outputs(kit.generate(image=asset_id, strength=0.1, seed=1))
    [strong] = kit.outputs(kit.generate(image=asset_id, strength=0.9, seed=1))
    mean = lambda data: ImageStat.Stat(image(data).convert("L")).mean[0]  # noqa: E731
    assert mean(light) > 200 > mean(light) - 60  # mostly the white input
    assert mean(strong) < mean(light)
