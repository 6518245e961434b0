"""Each injected fault fires at about its configured rate, only where it belongs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

MODEL = "model_bfl-flux-2-dev"
N = 300
LOW, HIGH = 0.2 * N, 0.4 * N  # rate 0.3: wide bounds so the test never flakes


def test_5xx_fault_rate(make_sandbox: Any, make_kit: Any) -> None:
    kit = make_kit(make_sandbox(fault_5xx_rate=0.3))
    codes = [kit.http.get(f"/models/{MODEL}").status_code for _ in range(N)]
    errors = sum(code in (500, 502, 503) for code in codes)
    assert LOW <= errors <= HIGH
    assert set(codes) <= {200, 500, 502, 503}
    assert kit.stats()["faults"]["5xx"] == errors


def test_dropped_connections_happen_after_the_request_was_processed(
    make_sandbox: Any, make_kit: Any
) -> None:
    kit = make_kit(make_sandbox(fault_drop_rate=0.3, latency=0.0))
    dropped = 0
    for i in range(N):
        try:
            kit.http.post(
                f"/generate/custom/{MODEL}", json={"prompt": f"item {i}", "width": 64, "height": 64}
            )
        except httpx.RemoteProtocolError:
            dropped += 1
    assert LOW <= dropped <= HIGH
    stats = kit.stats()
    assert stats["faults"]["drop"] == dropped
    assert stats["jobs_created"] == N  # every job exists, answered or not


def _downloads(kit: Any, count: int) -> list[str]:
    job = kit.wait(kit.generate(numOutputs=1))
    url = kit.asset_url(job["metadata"]["assetIds"][0])
    return [url] * count


@pytest.mark.parametrize("kind", ["expired", "truncate"])
def test_download_fault_rates(make_sandbox: Any, make_kit: Any, kind: str) -> None:
    kit = make_kit(make_sandbox(**{f"fault_{kind}_rate": 0.3}))
    faulted = 0
    expected = None
    for url in _downloads(kit, N):
        try:
            resp = kit.cdn.get(url)
        except httpx.RemoteProtocolError:
            assert kind == "truncate"
            faulted += 1
            continue
        if resp.status_code == 403:
            assert kind == "expired" and b"AccessDenied" in resp.content
            faulted += 1
            continue
        assert resp.status_code == 200
        expected = expected or resp.content
        assert resp.content == expected  # an answered download is always whole
    assert LOW <= faulted <= HIGH
    assert kit.stats()["faults"][kind] == faulted


def test_slow_download_rate(make_sandbox: Any, make_kit: Any) -> None:
    kit = make_kit(make_sandbox(fault_slow_rate=0.3, slow_seconds=0.02))
    took_long = 0
    for url in _downloads(kit, N):
        start = time.perf_counter()
        resp = kit.cdn.get(url)
        assert resp.status_code == 200 and resp.content.startswith(b"\x89PNG")  # whole, late
        took_long += time.perf_counter() - start >= 0.02
    stalled = kit.stats()["faults"]["slow"]
    assert LOW <= stalled <= HIGH
    assert took_long >= stalled  # every stall was felt (a loaded machine may add more)


def test_faults_never_touch_the_control_routes(make_sandbox: Any) -> None:
    sb = make_sandbox(fault_5xx_rate=1.0, fault_drop_rate=1.0, rate_limit=1, rate_burst=1)
    with httpx.Client(base_url=sb.base_url) as control:
        for _ in range(30):
            assert control.get("/_sandbox/stats").status_code == 200
        assert control.post("/_sandbox/config", json={"fault_5xx_rate": 0.0}).status_code == 200


def test_api_faults_spare_the_cdn_and_cdn_faults_spare_the_api(
    make_sandbox: Any, make_kit: Any
) -> None:
    sb = make_sandbox(fault_expired_rate=1.0, fault_truncate_rate=1.0)
    kit = make_kit(sb)
    urls = _downloads(kit, 1)  # every API call answered despite CDN faults at 100%
    sb.configure(fault_expired_rate=0.0, fault_truncate_rate=0.0, fault_5xx_rate=1.0)
    assert kit.cdn.get(urls[0]).status_code == 200
    assert kit.http.get(f"/models/{MODEL}").status_code >= 500


def test_the_same_seed_replays_the_same_faults(make_sandbox: Any, make_kit: Any) -> None:
    patterns = []
    for _ in range(2):
        kit = make_kit(make_sandbox(fault_5xx_rate=0.5, seed=99))
        patterns.append([kit.http.get(f"/models/{MODEL}").status_code for _ in range(40)])
    assert patterns[0] == patterns[1]


def test_even_spacing_fires_each_kind_on_exactly_its_share_whatever_the_order(
    make_sandbox: Any, make_kit: Any
) -> None:
    """A test that needs every fault to fire cannot rely on chance: with `fault_spacing`
    "even", 8% of 40 downloads is 3 refusals, every time, even from 8 threads at once."""
    sb = make_sandbox(fault_expired_rate=0.08, fault_5xx_rate=0.25, fault_spacing="even")
    kit = make_kit(sb)
    codes = [kit.http.get(f"/models/{MODEL}").status_code for _ in range(20)]
    assert [n for n, code in enumerate(codes, 1) if code >= 500] == [4, 8, 12, 16, 20]
    sb.configure(fault_5xx_rate=0.0)
    urls = _downloads(kit, 40)
    refused = [kit.cdn.get(url).status_code == 403 for url in urls]
    assert [n for n, no in enumerate(refused, 1) if no] == [13, 25, 38]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda url: httpx.get(url).status_code, urls))
    assert codes.count(403) == 3
    assert kit.stats()["faults"]["expired"] == 6


def test_fault_spacing_must_be_random_or_even(make_sandbox: Any) -> None:
    with pytest.raises(ValueError, match="fault_spacing must be one of random, even"):
        make_sandbox(fault_spacing="sometimes")
