"""The official scenario-sdk drives the sandbox; every raw response validates strictly."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import httpx
import pytest
import scenario_sdk
from PIL import Image
from scenario_sdk import Scenario
from scenario_sdk.types import (
    AssetGetBulkResponse,
    AssetRetrieveResponse,
    AssetUploadResponse,
    GenerateCaptionResponse,
    GenerateRunModelResponse,
    JobRetrieveResponse,
    JobTriggerActionResponse,
    ModelRetrieveResponse,
    TeamListResponse,
    TeamRetrieveLimitsResponse,
    UploadCreateResponse,
    UploadRetrieveResponse,
    UploadTriggerActionResponse,
)
from scenario_sdk.types.job_list_response import JobListResponse

from pipeline.sandbox import Sandbox

MODEL = "model_bfl-flux-2-dev"


def png_data_url(size: tuple[int, int] = (32, 24), colour: str = "navy") -> str:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def raw(response: Any) -> Any:
    """The raw JSON of a `client.with_raw_response...` call, before any SDK parsing."""
    http_response = response.http_response
    assert http_response.status_code in (200, 269), http_response.text
    return http_response.json()


def wait(client: Scenario, job_id: str) -> Any:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        job = client.jobs.retrieve(job_id).job
        if job.status in ("success", "failure", "canceled"):
            return job
        time.sleep(0.03)
    raise AssertionError("job did not finish")


def test_generate_poll_and_fetch_assets_through_the_sdk(client: Scenario) -> None:
    resp = client.generate.run_model(
        MODEL,
        body={"prompt": "iron sword icon", "numOutputs": 2, "width": 64, "height": 128, "seed": 42},
    )
    assert resp.job.status == "pending" and resp.creative_units_cost == 10
    assert resp.job.metadata.input == {
        "prompt": "iron sword icon",
        "numOutputs": 2,
        "width": 64,
        "height": 128,
        "seed": 42,
    }
    job = wait(client, resp.job.job_id)
    assert job.status == "success" and job.progress == 1
    assert job.billing is not None and job.billing.cu_cost == 10
    asset_ids = job.metadata.asset_ids
    assert asset_ids is not None and len(asset_ids) == 2
    asset = client.assets.retrieve(asset_ids[0]).asset
    assert (asset.kind, asset.status, asset.mime_type) == ("image", "success", "image/png")
    assert asset.metadata.seed == "42" and asset.metadata.prompt == "iron sword icon"
    body = httpx.get(asset.url).raise_for_status().content
    assert Image.open(io.BytesIO(body)).size == (64, 128)
    assert len(body) == asset.properties.size
    bulk = client.assets.get_bulk(asset_ids=[*asset_ids, "asset_doesNotExist0000000"])
    assert sorted(a.id for a in bulk.assets) == sorted(asset_ids)


def test_raw_responses_validate_strictly_against_the_sdk_models(client: Scenario) -> None:
    r = client.with_raw_response
    upload = raw(r.assets.upload(image=png_data_url(), name="ref.png"))
    AssetUploadResponse.model_validate(upload, strict=True)
    image_id = upload["asset"]["id"]
    created = raw(
        r.generate.run_model(
            MODEL, body={"prompt": "p", "width": 64, "height": 64, "image": image_id}
        )
    )
    GenerateRunModelResponse.model_validate(created, strict=True)
    job_id = created["job"]["jobId"]
    wait(client, job_id)
    done = raw(r.jobs.retrieve(job_id))
    JobRetrieveResponse.model_validate(done, strict=True)
    asset_id = done["job"]["metadata"]["assetIds"][0]
    AssetRetrieveResponse.model_validate(raw(r.assets.retrieve(asset_id)), strict=True)
    bulk = raw(r.assets.get_bulk(asset_ids=[asset_id, image_id]))
    AssetGetBulkResponse.model_validate(bulk, strict=True)
    assert len(bulk["assets"]) == 2
    for model in (
        MODEL,
        "model_scenario-image-slicer",
        "model_photoroom-background-removal",
        "model_upscale-v3",
    ):
        doc = raw(r.models.retrieve(model))
        ModelRetrieveResponse.model_validate(doc, strict=True)
        assert doc["model"]["inputs"]
    listing = raw(r.jobs.list())
    assert listing["jobs"]
    for item in listing["jobs"]:
        JobListResponse.model_validate(item, strict=True)
    caption = raw(r.generate.caption(images=[asset_id]))
    GenerateCaptionResponse.model_validate(caption, strict=True)
    running = raw(r.generate.run_model(MODEL, body={"prompt": "q", "width": 64, "height": 64}))
    canceled = raw(r.jobs.trigger_action(running["job"]["jobId"], action="cancel"))
    JobTriggerActionResponse.model_validate(canceled, strict=True)
    assert canceled["job"]["status"] == "canceled"


def test_model_inputs_describe_defaults_and_bounds(client: Scenario) -> None:
    inputs = {i.name: i for i in client.models.retrieve(MODEL).model.inputs or []}
    assert inputs["prompt"].required is not None and inputs["prompt"].required.always
    assert (inputs["numOutputs"].min, inputs["numOutputs"].max) == (1, 8)
    assert inputs["width"].step == 8
    slicer = {
        i.name: i for i in client.models.retrieve("model_scenario-image-slicer").model.inputs or []
    }
    assert (
        slicer["xSubdivisions"].min,
        slicer["xSubdivisions"].max,
        slicer["xSubdivisions"].default,
    ) == (1, 6, 2)


def test_upload_caption_and_cancel(client: Scenario) -> None:
    asset = client.assets.upload(image=png_data_url((40, 30), "green"), name="green.png").asset
    assert asset.source == "uploaded" and (asset.properties.width, asset.properties.height) == (
        40,
        30,
    )
    caption = client.generate.caption(images=[asset.id])
    assert caption.captions == ["a sandbox image of 40x30 pixels, mostly #008000"]
    job = client.generate.run_model(MODEL, body={"prompt": "slow", "width": 64, "height": 64}).job
    canceled = client.jobs.trigger_action(job.job_id, action="cancel").job
    assert canceled.status == "canceled"
    assert client.jobs.retrieve(job.job_id).job.status == "canceled"


def test_failed_job_then_config_change_lets_the_retry_succeed(
    client: Scenario, sandbox: Sandbox
) -> None:
    sandbox.configure(fail_prompts=["poison"])
    body = {"prompt": "poison potion", "width": 64, "height": 64, "seed": 1}
    failed = wait(client, client.generate.run_model(MODEL, body=body).job.job_id)
    assert failed.status == "failure"
    assert "poison" in (failed.metadata.error or "") and failed.metadata.hint
    httpx.post(sandbox.base_url + "/_sandbox/config", json={"fail_prompts": []}).raise_for_status()
    retried = wait(client, client.generate.run_model(MODEL, body=body).job.job_id)
    assert retried.status == "success"
    assert sandbox.stats()["duplicate_submissions"] == 0


def test_list_jobs_paginates_to_the_last_page_with_short_pages(
    make_sandbox: Any, make_client: Any
) -> None:
    sb = make_sandbox(latency=0.0, page_cut_every=7)
    client = make_client(sb)
    ids = {
        client.generate.run_model(
            MODEL, body={"prompt": f"item {i}", "width": 64, "height": 64}
        ).job.job_id
        for i in range(45)
    }
    pages: list[int] = []
    seen: list[str] = []
    page = client.jobs.list(page_size=10)
    while True:
        pages.append(len(page.jobs))
        seen.extend(j.job_id for j in page.jobs)
        if not page.has_next_page():
            break
        page = page.get_next_page()
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    assert any(0 < n < 10 for n in pages[:-1]), pages  # a short page that is not the last
    # The SDK's auto-pagination reaches the same set.
    assert {j.job_id for j in client.jobs.list(page_size=100)} == ids


def _asset(client: Scenario) -> str:
    return client.assets.upload(image=png_data_url(), name="c.png").asset.id


def test_list_jobs_filters(make_sandbox: Any, make_client: Any, make_kit: Any) -> None:
    sb = make_sandbox(latency=0.0, fail_prompts=["bad"])
    client = make_client(sb)
    first = client.generate.run_model(MODEL, body={"prompt": "good", "width": 64, "height": 64})
    time.sleep(0.01)
    mark = first.job.created_at
    client.generate.run_model(MODEL, body={"prompt": "bad", "width": 64, "height": 64})
    client.generate.run_model(MODEL, body={"prompt": "good 2", "width": 64, "height": 64})
    failed = list(client.jobs.list(status="failure"))
    assert [j.metadata.input["prompt"] for j in failed if j.metadata.input] == ["bad"]
    newer = list(client.jobs.list(created_after=mark))
    assert {j.metadata.input["prompt"] for j in newer if j.metadata.input} == {"bad", "good 2"}
    changed = list(client.jobs.list(status="success", updated_after=mark))
    assert all(j.updated_at > mark for j in changed)
    client.generate.caption(images=[_asset(client)])
    captions = list(client.jobs.list(types=["caption"]))
    assert [j.job_type for j in captions] == ["caption"]
    assert len(list(client.jobs.list(types=["custom", "caption"]))) == 4
    with pytest.raises(scenario_sdk.BadRequestError, match="updatedAfter"):
        client.jobs.list(updated_after=mark)
    with pytest.raises(scenario_sdk.BadRequestError, match="pageSize"):
        client.jobs.list(page_size=101)


LORA = "model_sandbox-sdxl-lora"


def test_team_limits_through_the_sdk(make_sandbox: Any, make_client: Any) -> None:
    sb = make_sandbox(parallel_jobs=6)
    client = make_client(sb)
    teams = raw(client.with_raw_response.teams.list())
    TeamListResponse.model_validate(teams, strict=True)
    team_id = teams["teams"][0]["id"]
    # Jobs carry the same id as their ownerId, so a client can learn it from any job too.
    job = client.generate.run_model(MODEL, body={"prompt": "x", "width": 64, "height": 64}).job
    assert job.owner_id == team_id
    with pytest.raises(scenario_sdk.PermissionDeniedError):
        client.teams.retrieve_limits(team_id)  # the default: the key may not read it
    sb.configure(limits_access=True)
    doc = raw(client.with_raw_response.teams.retrieve_limits(team_id))
    TeamRetrieveLimitsResponse.model_validate(doc, strict=True)
    limits = client.teams.retrieve_limits(team_id).limits
    assert (limits.parallel_custom_jobs, limits.parallel_inferences) == (6, 6)
    sb.configure(parallel_jobs=2)
    assert client.teams.retrieve_limits(team_id).limits.parallel_custom_jobs == 2
    with pytest.raises(scenario_sdk.NotFoundError):
        client.teams.retrieve_limits("team_someoneElse")


def test_model_types_inference_jobs_and_uploads_validate_strictly(
    client: Scenario, sandbox: Sandbox
) -> None:
    r = client.with_raw_response
    flux = raw(r.models.retrieve("model_sandbox-flux1-lora"))
    ModelRetrieveResponse.model_validate(flux, strict=True)
    assert flux["model"]["type"] == "flux.1-lora"
    # scenario-sdk 2.4.0's model `type` enum no longer lists the SD1.5/SDXL types that the
    # Swagger export does (test_swagger checks those against the Swagger); the SDK's default,
    # non-strict client reads them as they are.
    with Scenario(api_key="sandbox", api_secret="sandbox", base_url=sandbox.url) as lenient:
        assert lenient.models.retrieve(LORA).model.type == "sd-xl-lora"
    # The SDK has no method for /generate/txt2img; its job models read the jobs it creates.
    kit_http = httpx.Client(base_url=sandbox.url, auth=("sandbox", "sandbox"))
    created = kit_http.post(
        "/generate/txt2img",
        json={"modelId": LORA, "prompt": "a gem", "numSamples": 2, "width": 64, "height": 64},
    ).json()
    kit_http.close()
    job_id = created["job"]["jobId"]
    wait(client, job_id)
    JobRetrieveResponse.model_validate(raw(r.jobs.retrieve(job_id)), strict=True)
    listed = list(client.jobs.list(types=["inference"]))
    assert [j.job_id for j in listed] == [job_id] and listed[0].job_type == "inference"
    assert list(client.jobs.list(types=["custom"])) == []
    out = client.jobs.retrieve(job_id).job.metadata.asset_ids or []
    AssetRetrieveResponse.model_validate(raw(r.assets.retrieve(out[0])), strict=True)
    # A large file's way in: /uploads, then the asset id it produced.
    data = base64.b64decode(png_data_url((64, 48)).partition(",")[2])
    created_upload = raw(
        r.uploads.create(
            file_name="big.png",
            file_size=len(data),
            content_type="image/png",
            kind="image",
            parts=1,
        )
    )
    UploadCreateResponse.model_validate(created_upload, strict=True)
    upload_id = created_upload["upload"]["id"]
    httpx.put(created_upload["upload"]["parts"][0]["url"], content=data).raise_for_status()
    completed = raw(r.uploads.trigger_action(upload_id, action="complete"))
    UploadTriggerActionResponse.model_validate(completed, strict=True)
    deadline = time.monotonic() + 5
    while (upload := client.uploads.retrieve(upload_id).upload).status != "imported":
        assert upload.status == "validating" and time.monotonic() < deadline
        time.sleep(0.03)
    UploadRetrieveResponse.model_validate(raw(r.uploads.retrieve(upload_id)), strict=True)
    assert upload.entity_id is not None
    asset = client.assets.retrieve(upload.entity_id).asset
    assert (asset.properties.width, asset.properties.height) == (64, 48)
    client.assets.delete_multiple(asset_ids=[upload.entity_id])
    with pytest.raises(scenario_sdk.NotFoundError):
        client.assets.retrieve(upload.entity_id)
    with pytest.raises(scenario_sdk.NotFoundError, match=upload.entity_id):
        client.generate.run_model("model_upscale-v3", body={"image": upload.entity_id})
    with pytest.raises(scenario_sdk.BadRequestError, match="not available yet"):
        client.generate.run_model(LORA, body={"prompt": "x"})


def test_a_chain_of_tools_through_the_sdk(client: Scenario) -> None:
    first = client.generate.run_model(
        MODEL, body={"prompt": "a shield", "width": 64, "height": 64, "seed": 3}
    ).job
    (generated,) = wait(client, first.job_id).metadata.asset_ids
    cut = client.generate.run_model(
        "model_photoroom-background-removal", body={"image": generated}
    ).job
    (cut_id,) = wait(client, cut.job_id).metadata.asset_ids
    up = client.generate.run_model("model_upscale-v3", body={"image": cut_id, "upscaleFactor": 2})
    (big,) = wait(client, up.job.job_id).metadata.asset_ids
    image = Image.open(io.BytesIO(httpx.get(client.assets.retrieve(big).asset.url).content))
    assert image.size == (128, 128) and image.mode == "RGBA"
    assert up.job.billing is not None and up.creative_units_cost == 4
