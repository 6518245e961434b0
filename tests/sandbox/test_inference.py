"""POST /generate/{inferenceType}, model types, and /generate/custom refusing SD/Flux.1 models."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image, ImageStat

SDXL = "model_sandbox-sdxl-lora"
FLUX1 = "model_sandbox-flux1-lora"
SD15 = "model_sandbox-sd15-lora"
CUSTOM = "model_bfl-flux-2-dev"
TOOLS = ("model_scenario-image-slicer", "model_photoroom-background-removal", "model_upscale-v3")


def data_url(size: tuple[int, int] = (32, 32), colour: str = "navy") -> str:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def png(data: bytes) -> Image.Image:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(data))


def brightness(data: bytes) -> float:
    return float(ImageStat.Stat(png(data).convert("L")).mean[0])


def upload(kit: Any, size: tuple[int, int] = (32, 32), colour: str = "navy") -> str:
    resp = kit.http.post("/assets", json={"image": data_url(size, colour), "name": "in.png"})
    return str(resp.raise_for_status().json()["asset"]["id"])


def infer(kit: Any, name: str, **body: Any) -> dict[str, Any]:
    resp = kit.http.post(f"/generate/{name}", json=body)
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


def test_txt2img_counts_with_num_samples_and_echoes_the_body(kit: Any) -> None:
    body = {"modelId": SDXL, "prompt": "a red potion", "numSamples": 3, "width": 64, "height": 96}
    doc = infer(kit, "txt2img", **body, seed=7)
    assert doc["job"]["jobType"] == "inference"
    assert doc["job"]["metadata"]["input"] == {**body, "seed": 7}
    assert doc["inference"]["type"] == "txt2img" and doc["inference"]["seed"] == "7"
    outs = kit.outputs(doc["job"]["jobId"])
    assert [png(o).size for o in outs] == [(64, 96)] * 3
    asset = kit.http.get(f"/assets/{kit.wait(doc['job']['jobId'])['metadata']['assetIds'][0]}")
    meta = asset.json()["asset"]
    assert meta["source"] == "inference-txt" and meta["metadata"]["type"] == "inference-txt2img"
    assert meta["metadata"]["modelId"] == SDXL and meta["metadata"]["seed"] == "7"


def test_num_samples_defaults_to_four_and_num_outputs_is_not_the_count(kit: Any) -> None:
    doc = infer(kit, "txt2img", modelId=FLUX1, prompt="x", numOutputs=1, width=64, height=64)
    assert doc["inference"]["numSamples"] == 4
    assert len(kit.wait(doc["job"]["jobId"])["metadata"]["assetIds"]) == 4


def test_seed_may_be_a_string_or_an_integer_and_fixes_the_image(kit: Any) -> None:
    base = {"modelId": SD15, "prompt": "a key", "numSamples": 1, "width": 64, "height": 64}
    as_text = kit.outputs(infer(kit, "txt2img", **base, seed="12")["job"]["jobId"])
    again = kit.outputs(infer(kit, "txt2img", **base, seed="12")["job"]["jobId"])
    other = kit.outputs(infer(kit, "txt2img", **base, seed=13)["job"]["jobId"])
    assert as_text == again and as_text != other
    assert kit.stats()["duplicate_submissions"] == 1  # the same paid request, twice


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("img2img", {"strength": 0.4}),
        ("controlnet", {"modality": "canny"}),
        ("img2img-ip-adapter", {"ipAdapterScale": 0.5}),
    ],
)
def test_image_inferences_start_from_the_input(kit: Any, name: str, extra: Any) -> None:
    source = upload(kit, (64, 64), "white")
    body = {"modelId": SDXL, "prompt": "p", "numSamples": 1, "width": 64, "height": 64, **extra}
    if name.endswith("ip-adapter"):
        body["ipAdapterImageIds"] = [upload(kit)]
    doc = infer(kit, name, **body, image=source)
    assert doc["inference"]["image"] == doc["inference"]["imageId"] == source
    (out,) = kit.outputs(doc["job"]["jobId"])
    plain_body = {k: body[k] for k in ("modelId", "prompt", "numSamples", "width", "height")}
    plain = kit.outputs(infer(kit, "txt2img", **plain_body)["job"]["jobId"])[0]
    # The white input lightens the output compared with a pure generation.
    assert brightness(out) > brightness(plain)


def test_inpaint_repaints_only_the_white_part_of_the_mask(kit: Any) -> None:
    source = upload(kit, (64, 64), "black")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    mask_url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    body = {"modelId": FLUX1, "prompt": "p", "numSamples": 1, "width": 64, "height": 64}
    doc = infer(kit, "inpaint", **body, image=source, mask=mask_url, strength=1.0, seed=3)
    assert doc["inference"]["maskId"].startswith("asset_")
    result = png(kit.outputs(doc["job"]["jobId"])[0]).convert("L")
    left = result.crop((0, 0, 32, 64)).getextrema()
    assert left == (0, 0)  # untouched black
    assert result.crop((32, 0, 64, 64)).getextrema()[1] > 0


def test_tool_endpoints_have_their_own_job_types(kit: Any) -> None:
    source = upload(kit, (40, 30), "teal")
    removed = infer(kit, "remove-background", image=source)
    assert removed["job"]["jobType"] == "remove-background"
    # The answer carries the output asset, pending until the job is done.
    assert removed["asset"]["status"] == "pending"
    job = kit.wait(removed["job"]["jobId"])
    assert job["metadata"]["assetIds"] == [removed["asset"]["id"]]
    assert kit.http.get(f"/assets/{removed['asset']['id']}").json()["asset"]["status"] == "success"
    upscaled = infer(kit, "upscale", image=source, scalingFactor=3)
    assert upscaled["job"]["jobType"] == "upscale"
    (big,) = kit.outputs(upscaled["job"]["jobId"])
    assert png(big).size == (120, 90)
    wide = infer(kit, "upscale", image=source, targetWidth=1200)
    assert png(kit.outputs(wide["job"]["jobId"])[0]).size == (1200, 900)
    assert wide["creativeUnitsCost"] > upscaled["creativeUnitsCost"]


def test_jobs_listed_by_type(kit: Any) -> None:
    kit.generate(prompt="custom one")
    infer(kit, "txt2img", modelId=SDXL, prompt="x", numSamples=1, width=64, height=64)
    infer(kit, "remove-background", image=upload(kit))
    listed = {
        query: sorted(j["jobType"] for j in kit.http.get("/jobs", params=params).json()["jobs"])
        for query, params in {
            "custom": {"type": "custom"},
            "custom,inference": {"types": "custom,inference"},
            "all": {},
        }.items()
    }
    assert listed["custom"] == ["custom"]
    assert listed["custom,inference"] == ["custom", "inference"]
    assert listed["all"] == ["custom", "inference", "remove-background"]
    stats = kit.stats()
    assert stats["jobs_by_type"] == {"custom": 1, "inference": 1, "remove-background": 1}
    assert stats["requests"]["POST /generate/txt2img"] == 1


def test_models_report_their_type_capabilities_and_inputs(kit: Any) -> None:
    expected = {SDXL: "sd-xl-lora", FLUX1: "flux.1-lora", SD15: "sd-1_5-lora", CUSTOM: "custom"}
    for model_id, kind in expected.items():
        assert kit.http.get(f"/models/{model_id}").json()["model"]["type"] == kind
    sdxl = kit.http.get(f"/models/{SDXL}").json()["model"]
    assert {"txt2img", "img2img", "controlnet", "inpaint"} <= set(sdxl["capabilities"])
    inputs = {i["name"]: i for i in sdxl["inputs"]}
    assert inputs["numSamples"]["default"] == 4 and "numOutputs" not in inputs
    assert inputs["modality"]["allowedValues"][:2] == ["blur", "canny"]
    assert inputs["prompt"]["required"] == {"always": True}
    sd15 = {i["name"]: i for i in kit.http.get(f"/models/{SD15}").json()["model"]["inputs"]}
    assert sd15["width"]["default"] == 512
    custom = kit.http.get(f"/models/{CUSTOM}").json()["model"]
    assert custom["capabilities"] == ["txt2img", "img2img"]
    assert "numOutputs" in {i["name"] for i in custom["inputs"]}


def test_model_types_are_configurable_at_runtime(kit: Any) -> None:
    kit.sb.configure(model_types={"model_mine": "flux.1-kontext-dev"})
    assert kit.http.get("/models/model_mine").json()["model"]["type"] == "flux.1-kontext-dev"
    assert kit.http.get(f"/models/{SDXL}").json()["model"]["type"] == "custom"  # replaced
    with pytest.raises(ValueError, match="model_types"):
        kit.sb.configure(model_types={"model_mine": "sd-3"})


@pytest.mark.parametrize("where", ["url", "body"])
@pytest.mark.parametrize("model", [SDXL, FLUX1, SD15])
def test_custom_endpoint_refuses_sd_and_flux1_models(kit: Any, where: str, model: str) -> None:
    body: dict[str, Any] = {"prompt": "x", "width": 64, "height": 64}
    url_model = model if where == "url" else CUSTOM
    if where == "body":
        body["modelId"] = model
    for params in ({}, {"dryRun": "true"}):
        resp = kit.http.post(f"/generate/custom/{url_model}", params=params, json=body)
        assert resp.status_code == 400
        message = resp.json()["message"]
        assert model in message
        assert "not available yet for SD1.5, SDXL, Flux.1 and Flux.1-Kontext" in message
        assert "/generate/{inferenceType}" in message
    assert kit.stats()["jobs_created"] == 0


def test_kontext_models_are_refused_too_and_custom_trained_models_still_run(kit: Any) -> None:
    kit.sb.configure(model_types={"model_kontext": "flux.1-kontext-lora"})
    refused = kit.http.post(
        f"/generate/custom/{CUSTOM}", json={"prompt": "x", "modelId": "model_kontext"}
    )
    assert refused.status_code == 400
    kit.generate(modelId="model_my-custom-style")  # type custom: accepted


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"modelId": CUSTOM, "prompt": "x"}, 400, "POST /generate/custom/model_bfl-flux-2-dev"),
        ({"modelId": "model_scenario-image-slicer", "prompt": "x"}, 400, "custom model"),
        ({"prompt": "x"}, 400, "modelId is required"),
        ({"modelId": SDXL}, 400, "prompt is required"),
        ({"modelId": SDXL, "prompt": "x", "numSamples": 129}, 400, "numSamples"),
        ({"modelId": SDXL, "prompt": "x", "width": 100}, 400, "multiple of 8"),
        ({"modelId": SDXL, "prompt": "x", "seed": "abc"}, 400, "seed"),
        ({"modelId": SDXL, "prompt": "x", "scheduler": "Fast"}, 400, "scheduler"),
        ({"modelId": "model_gone", "prompt": "x"}, 404, "model_gone"),
    ],
)
def test_txt2img_validates_like_the_api(
    kit: Any, body: dict[str, Any], status: int, fragment: str
) -> None:
    kit.sb.configure(missing_models=["model_gone"])
    resp = kit.http.post("/generate/txt2img", json=body)
    assert resp.status_code == status and fragment in resp.json()["message"], resp.text
    assert kit.stats()["jobs_created"] == 0


def test_required_inputs_of_the_other_endpoints(kit: Any) -> None:
    base = {"modelId": SDXL, "prompt": "x", "numSamples": 1}
    source = upload(kit)
    cases = {
        "img2img": (base, "image is required"),
        "controlnet": ({**base, "image": source}, "modality is required"),
        "inpaint": ({**base, "image": source}, "mask is required"),
        "txt2img-ip-adapter": (base, "ipAdapterImages"),
        "remove-background": ({}, "image is required"),
        "upscale": ({"image": source, "scalingFactor": 32}, "scalingFactor"),
    }
    for name, (body, fragment) in cases.items():
        resp = kit.http.post(f"/generate/{name}", json=body)
        assert resp.status_code == 400 and fragment in resp.json()["message"], (name, resp.text)
    assert kit.http.post("/generate/no-such-type", json=base).status_code == 404
    kontext = kit.http.post("/generate/txt2img", json={**base, "modelId": "model_k"})
    assert kontext.status_code == 400  # model_k is custom here
    kit.sb.configure(model_types={"model_k": "flux.1-kontext-dev"})
    unsupported = kit.http.post("/generate/txt2img", json={**base, "modelId": "model_k"})
    assert unsupported.status_code == 400 and "txt2img" in unsupported.json()["message"]


def test_dry_run_prices_per_model_family_and_parameters(kit: Any) -> None:
    def price(name: str, **body: Any) -> float:
        resp = kit.http.post(f"/generate/{name}", params={"dryRun": "true"}, json=body)
        assert resp.status_code == 269, resp.text
        return float(resp.json()["creativeUnitsCost"])

    base = {"prompt": "x", "width": 1024, "height": 1024}
    sd15, sdxl, flux = (
        price("txt2img", modelId=m, numSamples=1, **base) for m in (SD15, SDXL, FLUX1)
    )
    assert sd15 < sdxl < flux
    assert price("txt2img", modelId=SDXL, numSamples=4, **base) == 4 * sdxl
    bigger = price("txt2img", modelId=SDXL, numSamples=1, prompt="x", width=2048, height=2048)
    assert bigger == 4 * sdxl
    source = upload(kit)
    assert (
        price("controlnet", modelId=SDXL, numSamples=1, image=source, modality="depth", **base)
        > sdxl
    )
    assert price("remove-background", image=source) > 0
    assert price("upscale", image=source, scalingFactor=4) > price("upscale", image=source)
    assert kit.stats()["jobs_created"] == 0


def test_parallel_caps_apply_per_pool(make_sandbox: Any, make_kit: Any) -> None:
    kit = make_kit(make_sandbox(parallel_jobs=1, latency=30))
    kit.generate(prompt="custom holds the custom slot")
    body = {"modelId": SDXL, "prompt": "x", "numSamples": 1, "width": 64, "height": 64}
    infer(kit, "txt2img", **body)  # inferences have their own slot
    refused = kit.http.post("/generate/txt2img", json={**body, "prompt": "y"})
    assert refused.status_code == 429 and refused.json()["name"] == "ParallelJobsLimitError"
    assert "parallel inferences limit (1)" in refused.json()["message"]
    assert (
        kit.http.post("/generate/remove-background", json={"image": upload(kit)}).status_code == 429
    )
    assert kit.stats()["responses_429"]["parallel"] == 2


def test_model_latency_overrides_by_model_then_job_type(make_sandbox: Any, make_kit: Any) -> None:
    sb = make_sandbox(
        latency=30, model_latency={"model_photoroom-background-removal": 0.0, "upscale": 0.0}
    )
    kit = make_kit(sb)
    source = upload(kit)
    quick = kit.generate("model_photoroom-background-removal", image=source)
    assert kit.wait(quick, timeout=2)["status"] == "success"
    assert (
        kit.wait(infer(kit, "upscale", image=source)["job"]["jobId"], timeout=2)["status"]
        == "success"
    )
    slow = kit.http.get(f"/jobs/{kit.generate(prompt='long')}").json()["job"]
    assert slow["status"] == "pending"
    with pytest.raises(ValueError, match="model_latency"):
        sb.configure(model_latency={"upscale": -1})


def test_every_paid_endpoint_bills_what_it_quoted(kit: Any) -> None:
    source = upload(kit)
    base = {"modelId": SDXL, "prompt": "x", "numSamples": 2, "width": 64, "height": 64}
    calls = [
        ("custom/" + CUSTOM, {"prompt": "x", "numOutputs": 2, "width": 64, "height": 64}),
        ("custom/model_upscale-v3", {"image": source, "upscaleFactor": 4}),
        ("txt2img", base),
        ("inpaint", {**base, "image": source, "mask": source}),
        ("remove-background", {"image": source}),
        ("upscale", {"image": source, "scalingFactor": 2}),
    ]
    total = 0.0
    for path, body in calls:
        quoted = kit.http.post(f"/generate/{path}", params={"dryRun": "true"}, json=body).json()
        answer = kit.http.post(f"/generate/{path}", json=body).json()
        cost = answer["creativeUnitsCost"]
        assert cost == quoted["creativeUnitsCost"] > 0, path
        job = kit.wait(answer["job"]["jobId"])
        assert job["billing"] == {"cuCost": cost, "cuDiscount": 0}, path
        total += cost
    assert kit.stats()["creative_units"] == total


def test_every_model_describes_its_inputs_bounds(kit: Any) -> None:
    for model_id in (CUSTOM, SDXL, SD15, *TOOLS):
        inputs = kit.http.get(f"/models/{model_id}").json()["model"]["inputs"]
        assert inputs, model_id
        for spec in inputs:
            assert spec["name"] and spec["type"], (model_id, spec)
            if spec["type"] == "number":
                assert "allowedValues" in spec or {"min", "max"} <= set(spec), (model_id, spec)
        assert any(s.get("required", {}).get("always") for s in inputs), model_id
