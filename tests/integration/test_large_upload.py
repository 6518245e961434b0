"""A large input image goes through Scenario's /uploads flow, not a refused POST /assets."""

from __future__ import annotations

import io
import random

from PIL import Image

from pipeline.sandbox import Sandbox, SandboxConfig
from pipeline.scenario import ScenarioClient


def noisy_png(side: int) -> bytes:
    rng = random.Random(4)
    image = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_an_image_over_the_assets_limit_is_uploaded_in_parts() -> None:
    data = noisy_png(1600)
    assert len(data) > 6 * 1024 * 1024  # POST /assets would answer 413
    with Sandbox(SandboxConfig(latency=0.1)) as sandbox:
        client = ScenarioClient(sandbox.url, "sandbox", "sandbox", timeout=10)
        try:
            asset_id = client.upload_image(data, "big.png", "image/png")
            asset = client.get_asset(asset_id)
            assert asset.mime_type == "image/png"
            with client.download(asset.url or "") as chunks:
                assert b"".join(chunks) == data
        finally:
            client.close()
        requests = sandbox.stats()["requests"]
    assert requests.get("POST /assets", 0) == 0
    assert requests["POST /uploads"] == 1 and requests["POST /uploads/{uploadId}/action"] == 1
