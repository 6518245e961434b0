"""HTTP-level behaviour: auth, error answers, dry runs, payload limit, signed CDN links."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import httpx
import pytest
from PIL import Image

from pipeline.sandbox import Sandbox, SandboxConfig
from pipeline.sandbox.state import parse_iso

MODEL = "model_bfl-flux-2-dev"
VALID = {"prompt": "a lantern", "width": 64, "height": 64}


def data_url(size: tuple[int, int] = (16, 16)) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, "teal").save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize("auth", [None, ("sandbox", "wrong"), ("other", "sandbox")])
def test_wrong_or_missing_credentials_get_401_json(sandbox: Sandbox, auth: Any) -> None:
    resp = httpx.get(f"{sandbox.url}/models/{MODEL}", auth=auth)
    assert resp.status_code == 401
    assert resp.json()["message"] == "Unauthorized"


def test_credentials_come_from_the_config(make_sandbox: Any) -> None:
    sb = make_sandbox(api_key="k1", api_secret="s1")
    assert httpx.get(f"{sb.url}/models/{MODEL}", auth=("k1", "s1")).status_code == 200
    assert httpx.get(f"{sb.url}/models/{MODEL}", auth=("sandbox", "sandbox")).status_code == 401


def test_unknown_routes_and_ids_get_404_json(kit: Any, make_sandbox: Any) -> None:
    for method, path in [
        ("GET", "/nothing/here"),
        ("DELETE", "/jobs"),
        ("GET", "/jobs/job_x"),
        ("GET", "/assets/asset_x"),
        ("POST", "/jobs/job_x/action"),
    ]:
        resp = kit.http.request(method, path, json={"action": "cancel"})
        assert resp.status_code == 404, (method, path)
        assert "message" in resp.json()
    assert httpx.get(kit.sb.base_url + "/elsewhere").status_code == 404


def test_missing_models_answer_404(make_sandbox: Any, make_kit: Any) -> None:
    kit = make_kit(make_sandbox(missing_models=["model_gone", "model_oldLora"]))
    assert kit.http.get("/models/model_gone").status_code == 404
    assert kit.http.post("/generate/custom/model_gone", json=VALID).status_code == 404
    resp = kit.http.post(f"/generate/custom/{MODEL}", json={**VALID, "modelId": "model_oldLora"})
    assert resp.status_code == 404
    assert kit.stats()["jobs_created"] == 0


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"numOutputs": "2"}, "numOutputs must be a number"),
        ({"numOutputs": 0}, "numOutputs must be within"),
        ({"numOutputs": 9}, "numOutputs must be within"),
        ({"numOutputs": 1.5}, "numOutputs must be an integer"),
        ({"width": 32}, "width must be within"),
        ({"height": 4096}, "height must be within"),
        ({"width": 100}, "multiple of 8"),
        ({"prompt": None}, "prompt is required"),
        ({"prompt": 12}, "prompt must be a string"),
        ({"seed": -1}, "seed"),
        ({"guidance": 50}, "guidance must be within"),
    ],
)
def test_invalid_inputs_get_400_with_a_message(kit: Any, change: Any, fragment: str) -> None:
    body = {k: v for k, v in {**VALID, **change}.items() if v is not None}
    resp = kit.http.post(f"/generate/custom/{MODEL}", json=body)
    assert resp.status_code == 400
    assert fragment in resp.json()["message"]
    assert kit.stats()["jobs_created"] == 0


@pytest.mark.parametrize(
    ("model", "body", "fragment"),
    [
        ("model_scenario-image-slicer", {}, "image is required"),
        ("model_scenario-image-slicer", {"image": "x", "xSubdivisions": 7}, "xSubdivisions"),
        ("model_upscale-v3", {"image": "x", "upscaleFactor": 3}, "upscaleFactor"),
    ],
)
def test_tool_model_inputs_are_validated(kit: Any, model: str, body: Any, fragment: str) -> None:
    resp = kit.http.post(f"/generate/custom/{model}", json=body)
    assert resp.status_code == 400 and fragment in resp.json()["message"]


def test_malformed_bodies_and_list_parameters_get_400(kit: Any) -> None:
    bad_json = kit.http.post(
        f"/generate/custom/{MODEL}",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert bad_json.status_code == 400
    assert kit.http.post(f"/generate/custom/{MODEL}", json=["a list"]).status_code == 400
    too_many = {"assetIds": [f"asset_{i:022d}" for i in range(201)]}
    resp = kit.http.post("/assets/get-bulk", json=too_many)
    assert resp.status_code == 400 and "200" in resp.json()["message"]
    assert (
        kit.http.post("/assets/get-bulk", json={"assetIds": too_many["assetIds"][:200]}).status_code
        == 200
    )
    for params in (
        {"pageSize": 0},
        {"pageSize": 101},
        {"status": "succeeded"},
        {"paginationToken": "garbage!"},
        {"createdAfter": "yesterday"},
    ):
        assert kit.http.get("/jobs", params=params).status_code == 400, params
    job_id = kit.generate()
    assert kit.http.post(f"/jobs/{job_id}/action", json={"action": "pause"}).status_code == 400


def test_dry_run_answers_269_with_a_cost_and_runs_nothing(kit: Any) -> None:
    costs = []
    for num in (1, 3):
        resp = kit.http.post(
            f"/generate/custom/{MODEL}",
            params={"dryRun": "true"},
            json={**VALID, "numOutputs": num},
        )
        assert resp.status_code == 269
        costs.append(resp.json()["creativeUnitsCost"])
    assert costs[1] == 3 * costs[0] > 0
    big = kit.http.post(
        f"/generate/custom/{MODEL}",
        params={"dryRun": "true"},
        json={**VALID, "width": 2048, "height": 2048},
    ).json()
    assert big["creativeUnitsCost"] > costs[0]  # size counts too
    invalid = kit.http.post(
        f"/generate/custom/{MODEL}", params={"dryRun": "true"}, json={**VALID, "numOutputs": 20}
    )
    assert invalid.status_code == 400  # a dry run still validates
    asset_id = kit.wait(kit.generate())["metadata"]["assetIds"][0]
    caption = kit.http.post(
        "/generate/caption", params={"dryRun": "true"}, json={"images": [asset_id]}
    )
    assert caption.status_code == 269 and caption.json()["creativeUnitsCost"] == 1
    stats = kit.stats()
    assert stats["jobs_created"] == 1 and stats["creative_units"] == costs[0]


def test_generate_cost_and_billing_follow_num_outputs(kit: Any) -> None:
    docs = [
        kit.http.post(f"/generate/custom/{MODEL}", json={**VALID, "numOutputs": n}).json()
        for n in (1, 4)
    ]
    assert docs[1]["creativeUnitsCost"] == 4 * docs[0]["creativeUnitsCost"]
    assert [d["job"]["billing"]["cuCost"] for d in docs] == [d["creativeUnitsCost"] for d in docs]


def test_uploads_over_6_mb_are_rejected_with_413(kit: Any) -> None:
    payload = "data:image/png;base64," + "A" * (6 * 1024 * 1024 + 10)
    resp = kit.http.post("/assets", json={"image": payload, "name": "huge.png"})
    assert resp.status_code == 413 and "6 MB" in resp.json()["message"]
    ok = kit.http.post("/assets", json={"image": data_url(), "name": "small.png"})
    assert ok.status_code == 200  # the connection survived the refusal
    assert (
        kit.http.post(
            "/assets", json={"image": "data:image/png;base64,bm90IGFuIGltYWdl", "name": "x.png"}
        ).status_code
        == 400
    )
    assert kit.stats()["uploads"] == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_signed_urls_expire_and_refuse_tampering_with_cloudfront_style_403() -> None:
    clock = FakeClock()
    with (
        Sandbox(SandboxConfig(latency=0.0, url_ttl=60), clock=clock) as sb,
        httpx.Client(base_url=sb.url, auth=("sandbox", "sandbox")) as api,
    ):
        job_id = api.post(f"/generate/custom/{MODEL}", json=VALID).json()["job"]["jobId"]
        asset_id = api.get(f"/jobs/{job_id}").json()["job"]["metadata"]["assetIds"][0]
        url = api.get(f"/assets/{asset_id}").json()["asset"]["url"]
        assert "Expires=" in url and "Signature=" in url and "Key-Pair-Id=" in url
        assert httpx.get(url).status_code == 200  # no Basic auth needed on the CDN
        tampered = url.replace("Signature=", "Signature=0")
        denied = httpx.get(tampered)
        assert denied.status_code == 403 and b"AccessDenied" in denied.content
        assert denied.headers["content-type"].startswith("text/xml")
        other = url.replace(asset_id, asset_id[:-1] + ("a" if asset_id[-1] != "a" else "b"))
        assert httpx.get(other).status_code == 403
        clock.now += 61
        assert httpx.get(url).status_code == 403
        fresh = api.get(f"/assets/{asset_id}").json()["asset"]["url"]
        assert httpx.get(fresh).status_code == 200


def test_asset_urls_use_the_host_the_client_called(sandbox: Sandbox) -> None:
    url = sandbox.url.replace("127.0.0.1", "localhost")
    with httpx.Client(base_url=url, auth=("sandbox", "sandbox")) as api:
        upload = api.post("/assets", json={"image": data_url(), "name": "a.png"}).json()
        assert upload["asset"]["url"].startswith(f"http://localhost:{sandbox.port}/cdn/")


def test_runtime_config_changes_keep_issued_links_valid(kit: Any) -> None:
    asset_id = kit.wait(kit.generate())["metadata"]["assetIds"][0]
    url = kit.asset_url(asset_id)
    kit.sb.configure(api_secret="rotated", seed=5, url_ttl=10)
    assert kit.cdn.get(url).status_code == 200


def test_a_round_trip_delays_every_api_and_cdn_answer_half_each_way(
    make_sandbox: Any, make_kit: Any
) -> None:
    """With `rtt`, a job is created half a round trip after its POST left, and answered
    half a round trip after that; a CDN download takes the round trip too; the harness's
    control routes do not."""
    rtt = 0.4
    sb = make_sandbox(rtt=rtt, latency=0.0)
    kit = make_kit(sb)
    sent = time.time()
    answer = kit.http.post(f"/generate/custom/{MODEL}", json=VALID).raise_for_status()
    answered = time.time()
    created = parse_iso(answer.json()["job"]["createdAt"])
    assert created >= sent + rtt / 2 - 0.001  # createdAt keeps milliseconds only
    assert answered >= created + rtt / 2
    job = kit.wait(answer.json()["job"]["jobId"])
    url = kit.asset_url(job["metadata"]["assetIds"][0])
    began = time.monotonic()
    kit.cdn.get(url).raise_for_status()
    assert time.monotonic() - began >= rtt
    began = time.monotonic()
    httpx.get(sb.base_url + "/_sandbox/stats").raise_for_status()
    assert time.monotonic() - began < rtt / 2


def test_a_negative_round_trip_is_refused() -> None:
    with pytest.raises(ValueError, match="rtt must be >= 0"):
        SandboxConfig(rtt=-0.01)
