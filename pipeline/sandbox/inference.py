"""POST /generate/{inferenceType}: the endpoints for SD1.5/SDXL/Flux.1 models and the tools.

Bodies follow the Swagger's Post<Type>InferencesRequest definitions: the trained model is
`modelId` in the body, the count is `numSamples` (default 4), the input image is `image`
(asset id or data URL) or the deprecated `imageId`. Fields the sandbox does not know are
accepted and ignored, as the API does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.sandbox import catalog
from pipeline.sandbox.catalog import Plan, bad_request

MAX_IP_ADAPTER_IMAGES = 10
# How much of a controlnet output comes from the generated grid (the rest from `image`).
CONTROLNET_BLEND = 0.6


@dataclass(frozen=True)
class Endpoint:
    """One /generate/{inferenceType} endpoint: what it requires and what it produces."""

    name: str
    job_type: str
    source: str  # the outputs' asset `source`
    meta_type: str  # the outputs' asset `metadata.type`
    capability: str | None = None  # None: a tool endpoint that takes no modelId
    image: bool = False
    strength: bool = False
    mask: bool = False
    modality: bool = False
    ip_adapter: bool = False

    @property
    def inference_type(self) -> str:
        """The `inference.type` of the answer (txt2img_ip_adapter, ...)."""
        return self.name.replace("-", "_")


ENDPOINTS: dict[str, Endpoint] = {
    e.name: e
    for e in (
        Endpoint("txt2img", "inference", "inference-txt", "inference-txt2img", "txt2img"),
        Endpoint(
            "img2img",
            "inference",
            "inference-img",
            "inference-img2img",
            "img2img",
            image=True,
            strength=True,
        ),
        Endpoint(
            "controlnet",
            "inference",
            "inference-control-net",
            "inference-controlnet",
            "controlnet",
            image=True,
            modality=True,
        ),
        Endpoint(
            "inpaint",
            "inference",
            "inference-in-paint",
            "inference-inpaint",
            "inpaint",
            image=True,
            strength=True,
            mask=True,
        ),
        Endpoint(
            "txt2img-ip-adapter",
            "inference",
            "inference-txt-ip-adapter",
            "inference-txt2img-ip-adapter",
            "txt2img_ip_adapter",
            ip_adapter=True,
        ),
        Endpoint(
            "img2img-ip-adapter",
            "inference",
            "inference-img-ip-adapter",
            "inference-img2img-ip-adapter",
            "img2img_ip_adapter",
            image=True,
            strength=True,
            ip_adapter=True,
        ),
        Endpoint(
            "remove-background", "remove-background", "background-removal", "background-removal"
        ),
        Endpoint("upscale", "upscale", "upscale", "upscale"),
    )
}

# Body fields echoed into the answer's `inference` object when present.
_ECHOED = (
    "negativePrompt",
    "scheduler",
    "concepts",
    "negativePromptStrength",
    "baseModelId",
    "modelEpoch",
    "hideResults",
    "intermediateImages",
)
_UPSCALE_RANGES = {
    "creativity": (0, 100),
    "creativityDecay": (0, 100),
    "detailsLevel": (-50, 50),
    "fractality": (0, 100),
    "imageFidelity": (0, 100),
    "promptFidelity": (0, 100),
    "refinementSteps": (0, 4),
    "styleImagesFidelity": (0, 100),
}
_UPSCALE_CHOICES = {
    "preset": ("balanced", "creative", "precise"),
    "style": ("3d-rendered", "anime", "cartoon", "comic", "minimalist", "photography", "standard"),
    "imageType": ("seamfull", "skybox", "texture"),
}


def _spec(specs: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    return specs[name]


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...], required: bool) -> Any:
    value = catalog.check_string(body, name, required)
    if value is not None and value not in allowed:
        raise bad_request(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _image_ref(body: dict[str, Any], name: str, required: bool) -> str | None:
    """`name` (asset id or data URL) or the deprecated `<name>Id` (asset id)."""
    value = catalog.check_string(body, name, required=False)
    legacy = catalog.check_string(body, f"{name}Id", required=False)
    ref = value or legacy
    if ref is None and required:
        raise bad_request(f"{name} is required (an asset id or a data URL)")
    return ref


def _ip_adapter_refs(body: dict[str, Any]) -> list[str]:
    refs: list[str] = []
    for name in ("ipAdapterImages", "ipAdapterImageIds"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad_request(f"{name} must be an array of strings")
        refs += value
    for name in ("ipAdapterImage", "ipAdapterImageId"):
        single = catalog.check_string(body, name, required=False)
        if single is not None:
            refs.append(single)
    if not refs:
        raise bad_request("ipAdapterImages or ipAdapterImageIds is required")
    if len(refs) > MAX_IP_ADAPTER_IMAGES:
        raise bad_request(f"at most {MAX_IP_ADAPTER_IMAGES} IP-Adapter images are accepted")
    scales = body.get("ipAdapterScales")
    if scales is not None and (
        not isinstance(scales, list)
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1 for v in scales
        )
    ):
        raise bad_request("ipAdapterScales must be an array of numbers within [0, 1]")
    return refs


def concept_model_ids(body: dict[str, Any]) -> list[str]:
    """The model ids of `concepts[]` ({modelId, scale} objects); raise 400 if malformed."""
    concepts = body.get("concepts")
    if concepts is None:
        return []
    ok = isinstance(concepts, list) and all(
        isinstance(c, dict)
        and isinstance(c.get("modelId"), str)
        and isinstance(c.get("scale"), int | float)
        and not isinstance(c.get("scale"), bool)
        and -2 <= c["scale"] <= 2
        for c in concepts
    )
    if not ok:
        raise bad_request("concepts must be an array of {modelId, scale} with scale in [-2, 2]")
    return [c["modelId"] for c in concepts]


def plan_inference(endpoint: Endpoint, body: dict[str, Any], model_type: str) -> Plan:
    """Validate an image inference body (txt2img, img2img, ...) like the API; raise 400."""
    specs = {spec["name"]: spec for spec in catalog.inference_inputs(model_type)}
    model_id = str(body.get("modelId"))
    prompt = catalog.check_string(body, "prompt", required=True)
    catalog.check_string(body, "negativePrompt", required=False)
    catalog.check_seed(body)
    num = catalog.check_number(body, _spec(specs, "numSamples"), integer=True)
    width = catalog.check_number(body, _spec(specs, "width"), integer=True)
    height = catalog.check_number(body, _spec(specs, "height"), integer=True)
    for name, value in (("width", width), ("height", height)):
        if value % 8:
            raise bad_request(f"{name} must be a multiple of 8, got {value}")
    guidance = catalog.check_number(body, _spec(specs, "guidance"), integer=False)
    steps = catalog.check_number(body, _spec(specs, "numInferenceSteps"), integer=True)
    _choice(body, "scheduler", catalog.SCHEDULERS, required=False)
    concept_model_ids(body)
    image = _image_ref(body, "image", required=endpoint.image) if endpoint.image else None
    mask = _image_ref(body, "mask", required=True) if endpoint.mask else None
    strength = None
    if endpoint.strength:
        strength = catalog.check_number(body, _spec(specs, "strength"), integer=False)
    elif endpoint.modality:
        strength = CONTROLNET_BLEND
    modality = None
    if endpoint.modality:
        modality = _choice(body, "modality", catalog.MODALITIES, required=True)
    references: list[str] = []
    ip_params: dict[str, Any] = {}
    if endpoint.ip_adapter:
        references = _ip_adapter_refs(body)
        ip_params = {
            "ipAdapterType": _choice(body, "ipAdapterType", ("character", "style"), False)
            or "style",
            "ipAdapterScale": catalog.check_number(
                body, _spec(specs, "ipAdapterScale"), integer=False
            ),
        }
    conditioned = endpoint.mask or endpoint.modality or endpoint.ip_adapter
    extra = catalog.CU_CONDITIONING_PER_IMAGE if conditioned else 0
    cost = catalog.image_cost(model_type, num, width, height, extra)
    inference: dict[str, Any] = {
        "type": endpoint.inference_type,
        "prompt": prompt,
        "numSamples": num,
        "width": width,
        "height": height,
        "guidance": guidance,
        "numInferenceSteps": steps,
        **{key: body[key] for key in _ECHOED if key in body},
        **({"modality": modality} if modality else {}),
        **({"strength": strength} if endpoint.strength else {}),
        **ip_params,
    }
    return Plan(
        model_id,
        "inpaint" if endpoint.mask else "image",
        num,
        cost,
        {"prompt": prompt, "width": width, "height": height, "strength": strength},
        image,
        references,
        job_type=endpoint.job_type,
        source=endpoint.source,
        meta_type=endpoint.meta_type,
        mask_asset_id=mask,
        cost_details={endpoint.name: cost},
        inference=inference,
    )


def plan_tool(endpoint: Endpoint, body: dict[str, Any]) -> Plan:
    """Validate a /generate/remove-background or /generate/upscale body; raise 400."""
    image = _image_ref(body, "image", required=True)
    if endpoint.name == "remove-background":
        colour = catalog.check_colour(body, "backgroundColor")
        fmt = _choice(body, "format", ("jpeg", "png"), required=False) or "png"
        cost = float(catalog.CU_BACKGROUND_REMOVAL)
        return Plan(
            "remove-background",
            "remove-background",
            1,
            cost,
            {"backgroundColor": colour, "format": fmt},
            image,
            job_type=endpoint.job_type,
            source=endpoint.source,
            meta_type=endpoint.meta_type,
            cost_details={endpoint.name: cost},
        )
    factor = catalog.check_number(
        body, {"name": "scalingFactor", "min": 1, "max": 16, "default": 2}, integer=False
    )
    target = catalog.check_number(
        body, {"name": "targetWidth", "min": 1024, "max": 16000}, integer=True
    )
    for name, (lo, hi) in _UPSCALE_RANGES.items():
        catalog.check_number(body, {"name": name, "min": lo, "max": hi}, integer=False)
    for name, allowed in _UPSCALE_CHOICES.items():
        _choice(body, name, allowed, required=False)
    styles = body.get("styleImages")
    if styles is not None and (
        not isinstance(styles, list) or not all(isinstance(s, str) for s in styles)
    ):
        raise bad_request("styleImages must be an array of asset ids")
    return Plan(
        "upscale",
        "upscale",
        1,
        0.0,  # priced once the input's size is known (upscale_target)
        {"scalingFactor": factor, "targetWidth": target},
        image,
        list(styles or []),
        job_type=endpoint.job_type,
        source=endpoint.source,
        meta_type=endpoint.meta_type,
    )


def upscale_target(plan: Plan, width: int, height: int) -> tuple[int, int, float]:
    """Output size and CU cost of an upscale of a width x height image."""
    target = plan.params.get("targetWidth")
    if target:
        factor = target / width
        out = (int(target), max(1, round(height * factor)))
    elif "upscaleFactor" in plan.params:
        factor = plan.params["upscaleFactor"]
        out = (width * int(factor), height * int(factor))
    else:
        factor = float(plan.params["scalingFactor"])
        out = (max(1, round(width * factor)), max(1, round(height * factor)))
    cost = float(catalog.CU_UPSCALE_PER_FACTOR * max(1, -(-factor // 1)))
    return out[0], out[1], cost
