"""The assets a job produces: sizes, sources and the recipes that render their bytes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from pipeline.sandbox import images
from pipeline.sandbox.catalog import Plan
from pipeline.sandbox.state import Asset, Job, Store

_TOOL_SOURCE = {
    "slicer": "unknown",
    "remove-background": "background-removal",
    "upscale": "upscale",
}


@dataclass
class _Output:
    index: int
    source: str
    width: int
    height: int
    render: Callable[[], bytes]
    mime: str = "image/png"


def derived_seed(job_key: str) -> int:
    """The seed a generation without one uses (reported in the asset's metadata.seed)."""
    return int(job_key[:8], 16) % 2**31


def _img2img(
    store: Store, key: str, width: int, height: int, source: Asset, strength: float | None
) -> bytes:
    data = store.asset_bytes(source)
    return images.img2img_png(key, width, height, data, float(strength or 0.75))


def _inpaint(
    store: Store,
    key: str,
    width: int,
    height: int,
    source: Asset,
    mask: Asset,
    strength: float | None,
) -> bytes:
    data, area = store.asset_bytes(source), store.asset_bytes(mask)
    return images.inpaint_png(key, width, height, data, area, float(strength or 1.0))


def _tile(store: Store, source: Asset, x: int, y: int, index: int) -> bytes:
    return images.slice_png(store.asset_bytes(source), x, y)[index]


def _specs(store: Store, job: Job, plan: Plan) -> list[_Output]:
    source = store.assets.get(plan.input_asset_id or "")
    mask = store.assets.get(plan.mask_asset_id or "")
    specs: list[_Output] = []
    if plan.kind in ("image", "inpaint"):
        width, height = plan.params["width"], plan.params["height"]
        strength = plan.params.get("strength")
        kind = plan.source or ("img2img" if source else "txt2img")
        for index in range(plan.num_outputs):
            key = f"{job.key}:{index}"
            render: Callable[[], bytes]
            if source is None:
                render = partial(images.generated_png, key, width, height)
            elif plan.kind == "inpaint" and mask is not None:
                render = partial(_inpaint, store, key, width, height, source, mask, strength)
            else:
                render = partial(_img2img, store, key, width, height, source, strength)
            specs.append(_Output(index, kind, width, height, render))
    elif source is not None and plan.kind == "slicer":
        x, y = plan.params["xSubdivisions"], plan.params["ySubdivisions"]
        for index in range(x * y):
            row, col = divmod(index, x)
            w = (col + 1) * source.width // x - col * source.width // x
            h = (row + 1) * source.height // y - row * source.height // y
            specs.append(
                _Output(
                    index,
                    _TOOL_SOURCE["slicer"],
                    w,
                    h,
                    partial(_tile, store, source, x, y, index),
                )
            )
    elif source is not None and plan.kind == "remove-background":
        colour = plan.params.get("backgroundColor")
        if plan.params.get("format") == "jpeg":
            specs.append(
                _Output(
                    0,
                    _TOOL_SOURCE[plan.kind],
                    source.width,
                    source.height,
                    lambda: images.to_jpeg(
                        images.remove_background_png(store.asset_bytes(source), colour or "white")
                    ),
                    "image/jpeg",
                )
            )
        else:
            specs.append(
                _Output(
                    0,
                    _TOOL_SOURCE[plan.kind],
                    source.width,
                    source.height,
                    lambda: images.remove_background_png(store.asset_bytes(source), colour),
                )
            )
    elif source is not None and plan.kind == "upscale":
        width, height = plan.params["outWidth"], plan.params["outHeight"]
        specs.append(
            _Output(
                0,
                "upscale",
                width,
                height,
                lambda: images.resize_png(store.asset_bytes(source), width, height),
            )
        )
    return specs


def _asset(store: Store, job: Job, plan: Plan, spec: _Output, created: float) -> Asset:
    source = store.assets.get(plan.input_asset_id or "")
    asset = Asset(
        asset_id=store.new_id("asset_", 22),
        created=created,
        source=spec.source,
        width=spec.width,
        height=spec.height,
        render=spec.render,
        mime=spec.mime,
        job_id=job.job_id,
        # Tool endpoints (/generate/remove-background, ...) run no named model.
        model_id=job.body.get("modelId") or (job.model_id if job.job_type == "custom" else None),
        output_index=spec.index,
        prompt=job.body.get("prompt"),
        parent_id=source.asset_id if source else None,
        meta_type=plan.meta_type,
    )
    if plan.kind in ("image", "inpaint"):
        asset.seed = str(job.body.get("seed", derived_seed(job.key)))
    return asset


def reserve_outputs(store: Store, job: Job, plan: Plan) -> list[Asset]:
    """Announce a job's outputs at submission (status pending until the job succeeds)."""
    assets = [_asset(store, job, plan, spec, job.created) for spec in _specs(store, job, plan)]
    for asset in assets:
        store.add_asset(asset)
    job.reserved_asset_ids = [a.asset_id for a in assets]
    return assets


def make_outputs(store: Store, job: Job, plan: Plan) -> list[Asset]:
    """The assets a succeeded job produced (bytes render on first use); reserved ones are
    reused."""
    if job.reserved_asset_ids:
        return [store.assets[asset_id] for asset_id in job.reserved_asset_ids]
    created = job.history(store.clock())[-1][1]
    outputs = []
    for spec in _specs(store, job, plan):
        asset = _asset(store, job, plan, spec, created)
        store.add_asset(asset)
        outputs.append(asset)
    return outputs
