"""The run gallery: every output is shown from where the page can load it."""

from __future__ import annotations

from pathlib import Path

from pipeline import gallery


def report(tmp_path: Path) -> dict:
    image = tmp_path / "assets" / "icons" / "sword" / "0.png"
    return {
        "run_id": "run_1",
        "status": "failed",
        "manifest": {"name": "icons", "path": "/m.yaml", "sha256": "0" * 64},
        "counts": {"total": 2, "succeeded": 1, "failed": 1, "skipped": 0, "canceled": 0},
        "creative_units": 3.0,
        "items": [
            {
                "id": "sword",
                "status": "succeeded",
                "attempts": 1,
                "jobs": ["job_a"],
                "error": None,
                "hint": None,
                "seed": 4,
                "prompt": "a <sword>",
                "outputs": [
                    {
                        "index": 0,
                        "uri": image.as_uri(),
                        "sha256": "ab" * 32,
                        "bytes": 9,
                        "asset_id": "asset_1",
                        "public_url": None,
                    },
                    {
                        "index": 1,
                        "uri": "s3://b/icons/sword/1.png",
                        "sha256": "cd" * 32,
                        "bytes": 9,
                        "asset_id": "asset_2",
                        "public_url": "https://cdn.test/icons/sword/1.png",
                    },
                ],
            },
            {
                "id": "shield",
                "status": "failed",
                "attempts": 2,
                "jobs": ["job_b", "job_c"],
                "error": "NSFW content detected",
                "hint": "rephrase the prompt",
                "seed": 4,
                "prompt": "shield",
                "outputs": [],
            },
        ],
    }


def test_gallery_links_local_files_relatively_and_public_urls_as_is(tmp_path: Path) -> None:
    page = gallery.write(report(tmp_path), tmp_path / "runs" / "run_1.html")
    text = page.read_text()
    assert 'src="../assets/icons/sword/0.png"' in text
    assert 'src="https://cdn.test/icons/sword/1.png"' in text
    assert (page.parent / "../assets/icons/sword/0.png").resolve() == (
        tmp_path / "assets/icons/sword/0.png"
    )


def test_gallery_escapes_prompts_and_shows_errors_with_hints(tmp_path: Path) -> None:
    text = gallery.render(report(tmp_path), tmp_path / "g.html")
    assert "a &lt;sword&gt;" in text and "<sword>" not in text
    assert "NSFW content detected" in text and "rephrase the prompt" in text
    assert "1 succeeded" in text and "1 failed" in text


def test_each_recipe_output_shows_the_chain_that_made_it(tmp_path: Path) -> None:
    doc = report(tmp_path)
    doc["items"][0]["outputs"][0]["chain"] = [
        {"step": 0, "model": "model_flux<x>", "job_id": "job_g", "reused": True},
        {"step": 1, "model": "model_photoroom-background-removal", "job_id": "job_b"},
        {"step": 2, "model": "model_upscale-v3", "job_id": "job_u", "reused": False},
    ]
    page = gallery.render(doc, tmp_path / "runs" / "run_1.html")
    caption = page.split("<figcaption>")[1].split("</figcaption>")[0]
    assert caption.count("→") == 2
    assert "flux&lt;x&gt;" in caption and 'class="step reused" title="job job_g"' in caption
    assert "photoroom-background-removal" in caption and "upscale-v3" in caption
    assert page.count("<figcaption>") == 1  # a one-step output needs no chain
