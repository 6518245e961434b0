"""The sandbox's routes exist in Scenario's Swagger file and its answers fit the schemas there."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import pytest
from PIL import Image
from scenario_sdk.types.job_retrieve_response import JobMetadata

from pipeline.sandbox.server import ROUTES

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


def test_every_implemented_route_exists_in_the_swagger(swagger: dict[str, Any]) -> None:
    assert swagger["basePath"] == "/v1"
    missing = [
        f"{method} {template}"
        for method, _, template, _ in ROUTES
        if method.lower() not in swagger["paths"].get(template, {})
    ]
    assert missing == []


def _png_data_url() -> str:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), "orange").save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


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
    return out


def test_every_answer_fits_its_swagger_schema(swagger: dict[str, Any], answers: Any) -> None:
    problems = []
    for method, _, template, _ in ROUTES:
        schema = response_schema(swagger, template, method)
        problems += conform(
            swagger, schema, answers[f"{method} {template}"], f"{method} {template}"
        )
    failed = response_schema(swagger, "/jobs/{jobId}", "GET")
    problems += conform(swagger, failed, answers["GET /jobs/{jobId} (failed)"], "failed job")
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
