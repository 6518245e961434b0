"""Assets as chain inputs, deleted assets, and large files through the /uploads flow."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import time
from typing import Any

import pytest
from PIL import Image

from pipeline.sandbox.server import MAX_BODY

MODEL = "model_bfl-flux-2-dev"
REMOVE = "model_photoroom-background-removal"
UPSCALE = "model_upscale-v3"
SLICER = "model_scenario-image-slicer"


def png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def encode(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=0)
    return out.getvalue()


def only_output(kit: Any, job_id: str) -> str:
    job = kit.wait(job_id)
    assert job["status"] == "success", job
    (asset_id,) = job["metadata"]["assetIds"]
    return str(asset_id)


def test_tool_models_chain_on_job_outputs_by_asset_id_only(kit: Any) -> None:
    generated = only_output(kit, kit.generate(width=96, height=64, seed=5))
    cut = only_output(kit, kit.generate(REMOVE, image=generated))
    big = only_output(kit, kit.generate(UPSCALE, image=cut, upscaleFactor=4))
    result = png(kit.cdn.get(kit.asset_url(big)).raise_for_status().content)
    assert result.size == (384, 256) and result.mode == "RGBA"
    alpha = result.getchannel("A").getextrema()
    assert alpha == (0, 255)  # the background became transparent, the subject stayed
    meta = kit.http.get(f"/assets/{big}").json()["asset"]["metadata"]
    assert meta["parentId"] == cut and meta["type"] == "upscale"
    tiles = kit.wait(kit.generate(SLICER, image=big, xSubdivisions=3, ySubdivisions=1))
    assert len(tiles["metadata"]["assetIds"]) == 3
    assert kit.stats()["jobs_by_model"] == {MODEL: 1, REMOVE: 1, UPSCALE: 1, SLICER: 1}


def test_deleted_assets_vanish_everywhere(kit: Any) -> None:
    uploaded = kit.http.post(
        "/assets", json={"image": data_url(encode(Image.new("RGB", (8, 8)))), "name": "a.png"}
    )
    asset_id = uploaded.json()["asset"]["id"]
    url = kit.asset_url(asset_id)
    output = only_output(kit, kit.generate(REMOVE, image=asset_id))
    resp = kit.http.request("DELETE", "/assets", json={"assetIds": [asset_id]})
    assert resp.status_code == 200 and resp.json() == {}
    gone = kit.http.get(f"/assets/{asset_id}")
    assert gone.status_code == 404 and gone.json()["name"] == "NotFoundError"
    bulk = kit.http.post("/assets/get-bulk", json={"assetIds": [asset_id, output]}).json()
    assert [a["id"] for a in bulk["assets"]] == [output]
    assert kit.cdn.get(url).status_code == 404
    for path, body in (
        (f"/generate/custom/{REMOVE}", {"image": asset_id}),
        (f"/generate/custom/{MODEL}", {"prompt": "x", "image": asset_id}),
        (
            "/generate/img2img",
            {"modelId": "model_sandbox-sdxl-lora", "prompt": "x", "image": asset_id},
        ),
        ("/generate/remove-background", {"image": asset_id}),
        (
            "/assets",
            {
                "image": data_url(encode(Image.new("RGB", (8, 8)))),
                "name": "c",
                "parentId": asset_id,
            },
        ),
    ):
        for params in ({}, {"dryRun": "true"}):
            refused = kit.http.post(path, params=params, json=body)
            assert refused.status_code == 404, (path, refused.text)
            assert refused.json() == {
                "message": f"Asset {asset_id} not found",
                "name": "NotFoundError",
            }
    # A retried delete succeeds; the output of a job that used it is untouched.
    assert kit.http.request("DELETE", "/assets", json={"assetIds": [asset_id]}).status_code == 200
    assert kit.cdn.get(kit.asset_url(output)).status_code == 200
    assert kit.stats()["assets_deleted"] == 1


def test_unknown_asset_ids_answer_404_naming_the_asset(kit: Any) -> None:
    resp = kit.http.post(f"/generate/custom/{UPSCALE}", json={"image": "asset_doesNotExist0000000"})
    assert resp.status_code == 404
    assert resp.json()["message"] == "Asset asset_doesNotExist0000000 not found"


def test_delete_validates_its_body(kit: Any) -> None:
    for body in ({}, {"assetIds": []}, {"assetIds": "asset_x"}, {"assetIds": ["a"] * 101}):
        assert kit.http.request("DELETE", "/assets", json=body).status_code == 400, body


@pytest.fixture
def big_png() -> bytes:
    """A PNG over the 6 MB request limit (noise does not compress)."""
    side = 1500
    data = encode(Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)))
    assert len(data) > MAX_BODY
    return data


def start_upload(kit: Any, data: bytes, parts: int, **extra: Any) -> dict[str, Any]:
    body = {
        "fileName": "big.png",
        "fileSize": len(data),
        "contentType": "image/png",
        "kind": "image",
        "parts": parts,
        **extra,
    }
    resp = kit.http.post("/uploads", json=body)
    assert resp.status_code == 200, resp.text
    upload: dict[str, Any] = resp.json()["upload"]
    return upload


def put_parts(kit: Any, upload: dict[str, Any], data: bytes) -> None:
    count = len(upload["parts"])
    size = -(-len(data) // count)
    for part in upload["parts"]:
        start = (int(part["number"]) - 1) * size
        resp = kit.cdn.put(part["url"], content=data[start : start + size])
        assert resp.status_code == 200 and resp.headers["ETag"], resp.text


def test_large_files_are_refused_by_post_assets_and_go_through_uploads(
    make_sandbox: Any, make_kit: Any, big_png: bytes
) -> None:
    kit = make_kit(make_sandbox(model_latency={"upload": 0.3}))
    too_big = kit.http.post("/assets", json={"image": data_url(big_png), "name": "big.png"})
    assert too_big.status_code == 413
    upload = start_upload(kit, big_png, parts=3)
    assert upload["status"] == "pending" and upload["source"] == "multipart"
    assert [p["number"] for p in upload["parts"]] == [1, 2, 3]
    assert all(p["url"].startswith(kit.sb.base_url + "/") for p in upload["parts"])
    put_parts(kit, upload, big_png)
    done = kit.http.post(f"/uploads/{upload['id']}/action", json={"action": "complete"}).json()
    assert done["upload"]["status"] == "validating" and "entityId" not in done["upload"]
    deadline = time.monotonic() + 5
    while True:
        doc = kit.http.get(f"/uploads/{upload['id']}").json()["upload"]
        if doc["status"] == "imported":
            break
        assert doc["status"] == "validating" and time.monotonic() < deadline
        time.sleep(0.05)
    asset = kit.http.get(f"/assets/{doc['entityId']}").json()["asset"]
    assert asset["source"] == "uploaded" and asset["properties"]["size"] == len(big_png)
    served = kit.cdn.get(asset["url"]).content
    assert hashlib.sha256(served).digest() == hashlib.sha256(big_png).digest()
    # The uploaded asset is an ordinary input.
    tiles = kit.outputs(kit.generate(SLICER, image=doc["entityId"], ySubdivisions=1))
    assert [png(t).size for t in tiles] == [(750, 1500)] * 2
    stats = kit.stats()
    assert stats["uploads"] == 1 and stats["upload_parts"] == 3
    assert stats["requests"]["PUT /upload-parts/{uploadId}/{partNumber}"] == 3


def test_upload_mistakes(make_sandbox: Any, make_kit: Any) -> None:
    kit = make_kit(make_sandbox(model_latency={"upload": 0.0}))
    data = encode(Image.new("RGB", (20, 20), "red"))
    upload = start_upload(kit, data, parts=2)
    first = upload["parts"][0]["url"]
    assert kit.cdn.put(first.replace("Signature=", "Signature=0"), content=b"x").status_code == 403
    assert kit.cdn.put(first, content=data[:10]).status_code == 200
    action = f"/uploads/{upload['id']}/action"
    missing = kit.http.post(action, json={"action": "complete"})
    assert missing.status_code == 400 and "part 2" in missing.json()["message"]
    assert kit.http.post(action, json={"action": "cancel"}).status_code == 400
    kit.cdn.put(upload["parts"][1]["url"], content=data[10:]).raise_for_status()
    done = kit.http.post(action, json={"action": "complete"}).json()["upload"]
    assert done["status"] == "imported" and done["entityId"].startswith("asset_")
    assert kit.cdn.put(first, content=b"late").status_code == 404  # the upload is closed
    again = kit.http.post(action, json={"action": "complete"}).json()["upload"]
    assert again["entityId"] == done["entityId"]  # completing twice creates nothing more

    short = start_upload(kit, data + b"extra", parts=1)
    put_parts(kit, short, data)
    failed = kit.http.post(f"/uploads/{short['id']}/action", json={"action": "complete"})
    assert failed.json()["upload"]["status"] == "failed"
    assert "fileSize" in failed.json()["upload"]["errorMessage"]
    garbage = start_upload(kit, b"not an image", parts=1)
    put_parts(kit, garbage, b"not an image")
    bad = kit.http.post(f"/uploads/{garbage['id']}/action", json={"action": "complete"})
    assert bad.json()["upload"]["errorMessage"] == "the file is not a valid image"

    assert kit.http.get("/uploads/upload_nope").status_code == 404
    for body in (
        {"fileSize": 10, "contentType": "image/png", "kind": "image", "parts": 1},
        {"fileName": "a", "fileSize": 10, "contentType": "image/png", "kind": "model", "parts": 1},
        {"fileName": "a", "fileSize": 10, "contentType": "text/plain", "kind": "image", "parts": 1},
        {"fileName": "a", "fileSize": 10, "contentType": "image/png", "kind": "image", "parts": 0},
        {"url": "http://example.invalid/x.png", "kind": "image"},
    ):
        assert kit.http.post("/uploads", json=body).status_code == 400, body
