"""The sandbox's routes exist in Scenario's Swagger file and its answers fit the schemas there."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import pytest
from PIL import Image
from scenario_sdk.types.job_retrieve_response import JobMetadata

from pipeline.sandbox.server import ROUTES, SDK_ONLY_ROUTES

# Fields the SDK (generated from a newer spec than this Swagger export) declares and the
# sandbox sends: job billing, the cost breakdown, a failed job's error and hint.
NEWER_THAN_SWAGGER = {"billing", "costDetails", "error", "hint"}

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def resolve(swagger: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = swagger["definitions"][schema["$ref"].split("/")[-1]]
    return schema


def conform(swagger: dict[str, Any], schema: dict[str, Any], value: Any, where: str) -> list[str]:
    """Every way `value` breaks `schema`: missing required keys, unknown keys, types, enums."""
    schema = resolve(swagger, schema)
    problems: list[str] = []
    kind = schema.get("type")
    if kind in _JSON_TYPES:
        ok = isinstance(value, _JSON_TYPES[kind]) and not (
            kind in ("number", "integer") and isinstance(value, bool)
        )
        if not ok:
            return [f"{where}: expected {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not in enum")
    # `properties: {}` marks a free-form object (metadata.input, metadata.output).
    if isinstance(value, dict) and schema.get("properties"):
        props = schema["properties"]
        problems += [
            f"{where}.{key}: required but missing"
            for key in schema.get("required", [])
            if key not in value
        ]
        for key, item in value.items():
            if key not in props:
                if not schema.get("additionalProperties") and key not in NEWER_THAN_SWAGGER:
                    problems.append(f"{where}.{key}: not in the schema")
                continue
            problems += conform(swagger, props[key], item, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value[:3]):
            problems += conform(swagger, schema["items"], item, f"{where}[{index}]")
    return problems


def response_schema(swagger: dict[str, Any], template: str, method: str) -> dict[str, Any]:
    return dict(swagger["paths"][template][method.lower()]["responses"]["200"]["schema"])


SWAGGER_ROUTES = [route for route in ROUTES if route[2] not in SDK_ONLY_ROUTES]


def test_every_implemented_route_exists_in_the_swagger(swagger: dict[str, Any]) -> None:
    assert swagger["basePath"] == "/v1"
    missing = [
        f"{method} {template}"
        for method, _, template, _ in SWAGGER_ROUTES
        if method.lower() not in swagger["paths"].get(template, {})
    ]
    assert missing == []
    # The others are the SDK's (checked against its models in test_sdk.py), not invented.
    assert all(template not in swagger["paths"] for template in SDK_ONLY_ROUTES)


def _png(size: tuple[int, int] = (16, 16), colour: str = "orange") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def _png_data_url(size: tuple[int, int] = (16, 16), colour: str = "orange") -> str:
    return "data:image/png;base64," + base64.b64encode(_png(size, colour)).decode()


LORA = "model_sandbox-sdxl-lora"


def _inference_bodies(image_id: str, mask_id: str) -> dict[str, dict[str, Any]]:
    """One valid body per /generate/{inferenceType} the sandbox implements."""
    base = {"modelId": LORA, "prompt": "a lamp", "width": 64, "height": 64, "numSamples": 1}
    return {
        "txt2img": {**base, "seed": "42"},
        "img2img": {**base, "image": image_id, "strength": 0.5},
        "controlnet": {**base, "image": image_id, "modality": "canny"},
        "inpaint": {**base, "image": image_id, "mask": mask_id},
        "txt2img-ip-adapter": {**base, "ipAdapterImageIds": [image_id]},
        "img2img-ip-adapter": {**base, "image": image_id, "ipAdapterImages": [_png_data_url()]},
        "remove-background": {"image": image_id},
        "upscale": {"image": image_id, "scalingFactor": 2},
    }


@pytest.fixture
def answers(kit: Any) -> dict[str, Any]:
    """One real answer of every implemented route, keyed by "METHOD template"."""
    http: httpx.Client = kit.http
    model = "model_bfl-flux-2-dev"
    out: dict[str, Any] = {}
    upload = http.post("/assets", json={"image": _png_data_url(), "name": "o.png"}).json()
    out["POST /assets"] = upload
    body = {"prompt": "a lamp", "width": 64, "height": 64, "numOutputs": 2}
    out["POST /generate/custom/{modelId}"] = http.post(
        f"/generate/custom/{model}", json=body
    ).json()
    job_id = out["POST /generate/custom/{modelId}"]["job"]["jobId"]
    kit.wait(job_id)
    out["GET /jobs/{jobId}"] = http.get(f"/jobs/{job_id}").json()
    out["GET /jobs"] = http.get("/jobs", params={"pageSize": 1}).json()
    asset_id = out["GET /jobs/{jobId}"]["job"]["metadata"]["assetIds"][0]
    out["GET /assets/{assetId}"] = http.get(f"/assets/{asset_id}").json()
    out["POST /assets/get-bulk"] = http.post(
        "/assets/get-bulk", json={"assetIds": [asset_id, upload["asset"]["id"]]}
    ).json()
    out["GET /models/{modelId}"] = http.get(f"/models/{model}").json()
    out["typed models"] = {
        m: http.get(f"/models/{m}").json()
        for m in (LORA, "model_sandbox-flux1-lora", "model_sandbox-sd15-lora")
    }
    out["POST /generate/caption"] = http.post(
        "/generate/caption", json={"images": [asset_id]}
    ).json()
    kit.sb.configure(fail_prompts=["doomed"])
    failed = kit.wait(kit.generate(prompt="a doomed lamp"))
    assert failed["status"] == "failure"
    out["GET /jobs/{jobId} (failed)"] = {"job": failed}
    running = kit.generate(prompt="to cancel")
    out["POST /jobs/{jobId}/action"] = http.post(
        f"/jobs/{running}/action", json={"action": "cancel"}
    ).json()
    image_id = upload["asset"]["id"]
    mask_id = http.post("/assets", json={"image": _png_data_url(colour="white"), "name": "m.png"})
    for name, body in _inference_bodies(image_id, mask_id.json()["asset"]["id"]).items():
        resp = http.post(f"/generate/{name}", json=body)
        assert resp.status_code == 200, (name, resp.text)
        out[f"POST /generate/{name}"] = resp.json()
    out["DELETE /assets"] = http.request(
        "DELETE", "/assets", json={"assetIds": [mask_id.json()["asset"]["id"]]}
    ).json()
    data = _png((40, 40))
    created = http.post(
        "/uploads",
        json={
            "fileName": "big.png",
            "fileSize": len(data),
            "contentType": "image/png",
            "kind": "image",
            "parts": 2,
        },
    ).json()
    out["POST /uploads"] = created
    upload_id = created["upload"]["id"]
    half = len(data) // 2
    for part, chunk in zip(created["upload"]["parts"], (data[:half], data[half:]), strict=True):
        kit.cdn.put(part["url"], content=chunk).raise_for_status()
    out["POST /uploads/{uploadId}/action"] = http.post(
        f"/uploads/{upload_id}/action", json={"action": "complete"}
    ).json()
    out["GET /uploads/{uploadId}"] = http.get(f"/uploads/{upload_id}").json()
    return out


def test_every_answer_fits_its_swagger_schema(swagger: dict[str, Any], answers: Any) -> None:
    problems = []
    for method, _, template, _ in SWAGGER_ROUTES:
        schema = response_schema(swagger, template, method)
        problems += conform(
            swagger, schema, answers[f"{method} {template}"], f"{method} {template}"
        )
    failed = response_schema(swagger, "/jobs/{jobId}", "GET")
    problems += conform(swagger, failed, answers["GET /jobs/{jobId} (failed)"], "failed job")
    model_schema = response_schema(swagger, "/models/{modelId}", "GET")
    for model_id, doc in answers["typed models"].items():
        problems += conform(swagger, model_schema, doc, model_id)
    assert problems == []


def test_key_fields_are_declared_in_the_swagger(swagger: dict[str, Any], answers: Any) -> None:
    job = resolve(swagger, response_schema(swagger, "/jobs/{jobId}", "GET"))["properties"]["job"]
    for key in (
        "jobId",
        "status",
        "progress",
        "statusHistory",
        "metadata",
        "createdAt",
        "updatedAt",
    ):
        assert key in job["properties"], key
    assert {"assetIds", "input"} <= set(job["properties"]["metadata"]["properties"])
    sdk_metadata = {f.alias or name for name, f in JobMetadata.model_fields.items()}
    assert {"error", "hint"} <= sdk_metadata
    asset = resolve(swagger, response_schema(swagger, "/assets/{assetId}", "GET"))
    assert {"id", "url", "mimeType", "metadata"} <= set(asset["properties"]["asset"]["properties"])
    jobs = resolve(swagger, response_schema(swagger, "/jobs", "GET"))
    assert "nextPaginationToken" in jobs["properties"]
    assert "nextPaginationToken" in answers["GET /jobs"]


def test_dry_run_answer_fits_the_dry_run_schema(swagger: dict[str, Any], kit: Any) -> None:
    resp = kit.http.post(
        "/generate/custom/model_bfl-flux-2-dev",
        params={"dryRun": "true"},
        json={"prompt": "a lamp", "width": 64, "height": 64},
    )
    assert resp.status_code == 269
    assert conform(swagger, {"$ref": "#/definitions/DryRunResponse"}, resp.json(), "269") == []
    caption = swagger["paths"]["/generate/caption"]["post"]["responses"]
    assert "269" in caption  # the Swagger documents 269 for dry runs


def test_inference_bodies_use_the_swagger_request_fields(swagger: dict[str, Any]) -> None:
    """The bodies the tests send (and the sandbox reads) are the Swagger's request shapes."""
    for name, body in _inference_bodies("asset_x", "asset_y").items():
        request = swagger["paths"][f"/generate/{name}"]["post"]["parameters"]
        schema = resolve(swagger, next(p for p in request if p["in"] == "body")["schema"])
        assert set(schema.get("required", [])) <= set(body), name
        assert set(body) <= set(schema["properties"]), (name, set(body) - set(schema["properties"]))
        assert "numOutputs" not in schema["properties"], name


def test_inference_dry_runs_answer_269_per_the_swagger(swagger: dict[str, Any], kit: Any) -> None:
    image_id = kit.http.post("/assets", json={"image": _png_data_url(), "name": "i.png"})
    image = image_id.json()["asset"]["id"]
    for name, body in _inference_bodies(image, image).items():
        resp = kit.http.post(f"/generate/{name}", params={"dryRun": "true"}, json=body)
        assert resp.status_code == 269, (name, resp.text)
        assert "269" in swagger["paths"][f"/generate/{name}"]["post"]["responses"]
        schema = {"$ref": "#/definitions/DryRunResponse"}
        assert conform(swagger, schema, resp.json(), name) == []
        assert resp.json()["creativeUnitsCost"] > 0
    assert kit.stats()["jobs_created"] == 0
