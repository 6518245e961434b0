"""The models the sandbox knows: their inputs (as GET /models/{id} shows them), validation, cost."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from PIL import ImageColor

SLICER = "model_scenario-image-slicer"
BACKGROUND_REMOVAL = "model_photoroom-background-removal"
UPSCALE = "model_upscale-v3"
TOOL_MODELS = (SLICER, BACKGROUND_REMOVAL, UPSCALE)

# Flat costs in creative units; image models cost per output and per started megapixel,
# at a rate that depends on the model's family (custom models: 5).
CU_PER_IMAGE_MEGAPIXEL = 5
CU_PER_MEGAPIXEL_BY_FAMILY = {
    "custom": CU_PER_IMAGE_MEGAPIXEL,
    "sd-1_5": 2,
    "sd-xl": 3,
    "flux.1": 5,
    "flux.1-kontext": 6,
    "flux-pro": 8,
    "gpt-image": 10,
}
# Each image of controlnet, inpaint and ip-adapter inferences costs this much more.
CU_CONDITIONING_PER_IMAGE = 1
CU_SLICER = 1
CU_BACKGROUND_REMOVAL = 2
CU_UPSCALE_PER_FACTOR = 2
CU_CAPTION_PER_IMAGE = 1


_INFERENCE_ONLY_FAMILIES = ("sd-1_5", "sd-xl", "flux.1", "flux.1-kontext", "flux-pro")
_FULL = ["controlnet", "img2img", "img2img_ip_adapter", "inpaint", "txt2img", "txt2img_ip_adapter"]
_CAPABILITIES = {
    "sd-1_5": _FULL,
    "sd-xl": _FULL,
    "flux.1": _FULL,
    "flux.1-kontext": ["img2img"],
    "flux-pro": ["txt2img"],
    "gpt-image": ["txt2img", "img2img"],
}
SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "TCDScheduler",
)
MODALITIES = (
    "blur",
    "canny",
    "depth",
    "gray",
    "illusion",
    "lineart",
    "lines",
    "low-quality",
    "normal-map",
    "pose",
    "scribble",
    "seg",
    "sketch",
    "tile",
)


class ApiProblem(Exception):
    """An error answer: HTTP status plus the JSON body fields."""

    def __init__(self, status: int, message: str, name: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.name = name
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The JSON error document."""
        doc: dict[str, Any] = {"message": self.message}
        if self.name:
            doc["name"] = self.name
        doc.update(self.extra)
        return doc


def bad_request(message: str) -> ApiProblem:
    """A 400 with the given message."""
    return ApiProblem(400, message, "BadRequestError")


def _number(
    name: str,
    lo: float,
    hi: float,
    default: Any = None,
    step: float | None = None,
    description: str = "",
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "type": "number",
        "min": lo,
        "max": hi,
        "label": name,
        "description": description,
    }
    if default is not None:
        spec["default"] = default
    if step is not None:
        spec["step"] = step
    return spec


def _file(name: str, required: bool, description: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "type": "file",
        "kind": "image",
        "label": name,
        "description": description,
    }
    if required:
        spec["required"] = {"always": True}
    return spec


IMAGE_MODEL_INPUTS: list[dict[str, Any]] = [
    {
        "name": "prompt",
        "type": "string",
        "label": "Prompt",
        "prompt": True,
        "required": {"always": True},
        "description": "What to generate.",
    },
    {
        "name": "modelId",
        "type": "model",
        "label": "Trained model",
        "description": "A trained style/LoRA model to apply (e.g. model_eyVcnFJcR92BxBkz7N6g5w).",
    },
    _number("seed", 0, 2147483647, step=1, description="Fixed seed; random when absent."),
    _number("numOutputs", 1, 8, 1, 1, "Number of images to generate."),
    _number("width", 64, 2048, 1024, 8, "Output width in pixels, a multiple of 8."),
    _number("height", 64, 2048, 1024, 8, "Output height in pixels, a multiple of 8."),
    _number("guidance", 0, 20, 3.5, 0.1, "Prompt adherence."),
    _number("numInferenceSteps", 1, 150, 28, 1, "Denoising steps."),
    _file("image", False, "Input image for image-to-image (asset id or data URL)."),
    _number("strength", 0, 1, 0.75, 0.01, "How far the output may move from `image`."),
    {
        "name": "referenceImages",
        "type": "file_array",
        "kind": "image",
        "label": "References",
        "max": 10,
        "description": "Reference images (asset ids or data URLs).",
    },
    {
        "name": "negativePrompt",
        "type": "string",
        "label": "Negative prompt",
        "description": "What to avoid.",
    },
]

TOOL_INPUTS: dict[str, list[dict[str, Any]]] = {
    SLICER: [
        _file("image", True, "The image to slice."),
        _number("xSubdivisions", 1, 6, 2, 1, "Columns."),
        _number("ySubdivisions", 1, 6, 2, 1, "Rows."),
    ],
    BACKGROUND_REMOVAL: [
        _file("image", True, "The image to cut out."),
        {
            "name": "backgroundColor",
            "type": "string",
            "color": True,
            "label": "Background",
            "description": "Fill the removed background with this colour (#rrggbb) instead of "
            "transparency.",
        },
    ],
    UPSCALE: [
        _file("image", True, "The image to upscale."),
        {
            "name": "upscaleFactor",
            "type": "number",
            "allowedValues": [2, 4, 8, 16],
            "default": 2,
            "label": "Factor",
            "description": "Scale factor.",
        },
    ],
}


def model_inputs(model_id: str) -> list[dict[str, Any]]:
    """The inputs[] a model declares."""
    return TOOL_INPUTS.get(model_id, IMAGE_MODEL_INPUTS)


@dataclass
class Plan:
    """A validated generation request: what to produce and what it costs."""

    model_id: str
    kind: str  # "image", "slicer", "remove-background" or "upscale"
    num_outputs: int
    cost: float
    params: dict[str, Any] = field(default_factory=dict)
    input_asset_id: str | None = None
    reference_asset_ids: list[str] = field(default_factory=list)
    job_type: str = "custom"
    # The outputs' asset `source` and `metadata.type` (None: derived from `kind`).
    source: str | None = None
    meta_type: str | None = None
    mask_asset_id: str | None = None
    cost_details: dict[str, float] = field(default_factory=dict)
    # The `inference` object of a /generate/{inferenceType} answer.
    inference: dict[str, Any] | None = None


def check_colour(body: dict[str, Any], name: str) -> str | None:
    """An optional colour input (#rrggbb or an HTML name; "transparent" = none)."""
    value = _check_string(body, name, required=False)
    if value is None or value == "transparent":
        return None
    try:
        ImageColor.getrgb(value)
    except ValueError:
        raise bad_request(f"{name} must be a hex code or an HTML colour, got {value!r}") from None
    return value


def check_seed(body: dict[str, Any]) -> None:
    """seed: an integer within [0, 2147483647] or a string of digits."""
    seed = body.get("seed")
    if seed is not None and not (
        (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= 2147483647)
        or (isinstance(seed, str) and seed.isdigit() and int(seed) <= 2147483647)
    ):
        raise bad_request(f"seed must be an integer within [0, 2147483647], got {seed!r}")


def check_number(body: dict[str, Any], spec: dict[str, Any], integer: bool) -> Any:
    """A number input per its spec (default, allowedValues, min/max); raise 400."""
    return _check_number(body, spec, integer)


def check_string(body: dict[str, Any], name: str, required: bool) -> str | None:
    """A string input; raise 400 when missing (if required) or not a string."""
    return _check_string(body, name, required)


def _check_number(body: dict[str, Any], spec: dict[str, Any], integer: bool) -> Any:
    name = spec["name"]
    value = body.get(name, spec.get("default"))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"{name} must be a number, got {type(value).__name__}")
    if integer and value != int(value):
        raise bad_request(f"{name} must be an integer, got {value}")
    if "allowedValues" in spec and value not in spec["allowedValues"]:
        raise bad_request(f"{name} must be one of {spec['allowedValues']}, got {value}")
    if "min" in spec and not spec["min"] <= value <= spec["max"]:
        raise bad_request(f"{name} must be within [{spec['min']}, {spec['max']}], got {value}")
    return int(value) if integer else value


def _check_string(body: dict[str, Any], name: str, required: bool) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise bad_request(f"{name} must not be empty")
    return value


def plan_generation(model_id: str, body: dict[str, Any]) -> Plan:
    """Validate a POST /generate/custom body like the API does; raise ApiProblem(400)."""
    specs = {spec["name"]: spec for spec in model_inputs(model_id)}
    if model_id in TOOL_INPUTS:
        image = _check_string(body, "image", required=True)
        if model_id == SLICER:
            x = _check_number(body, specs["xSubdivisions"], integer=True)
            y = _check_number(body, specs["ySubdivisions"], integer=True)
            return Plan(
                model_id,
                "slicer",
                x * y,
                CU_SLICER,
                {"xSubdivisions": x, "ySubdivisions": y},
                image,
            )
        if model_id == BACKGROUND_REMOVAL:
            colour = check_colour(body, "backgroundColor")
            return Plan(
                model_id,
                "remove-background",
                1,
                CU_BACKGROUND_REMOVAL,
                {"backgroundColor": colour},
                image,
            )
        factor = _check_number(body, specs["upscaleFactor"], integer=True)
        return Plan(
            model_id, "upscale", 1, CU_UPSCALE_PER_FACTOR * factor, {"upscaleFactor": factor}, image
        )

    prompt = _check_string(body, "prompt", required=True)
    _check_string(body, "modelId", required=False)
    _check_string(body, "negativePrompt", required=False)
    image = _check_string(body, "image", required=False)
    check_seed(body)
    num = _check_number(body, specs["numOutputs"], integer=True)
    width = _check_number(body, specs["width"], integer=True)
    height = _check_number(body, specs["height"], integer=True)
    for name, value in (("width", width), ("height", height)):
        if value % 8:
            raise bad_request(f"{name} must be a multiple of 8, got {value}")
    _check_number(body, specs["guidance"], integer=False)
    _check_number(body, specs["numInferenceSteps"], integer=True)
    strength = _check_number(body, specs["strength"], integer=False)
    references = body.get("referenceImages") or []
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise bad_request("referenceImages must be an array of strings")
    if len(references) > specs["referenceImages"]["max"]:
        raise bad_request("referenceImages accepts at most 10 images")
    cost = image_cost("custom", num, width, height)
    return Plan(
        model_id,
        "image",
        num,
        cost,
        {"prompt": prompt, "width": width, "height": height, "strength": strength},
        image,
        list(references),
        cost_details={"custom-generation": cost},
    )


def image_cost(model_type: str, count: int, width: int, height: int, extra: int = 0) -> float:
    """CU for `count` images: the type's rate per started megapixel, plus `extra` each."""
    megapixels = math.ceil(width * height / (1024 * 1024))
    return float(count * (megapixels * CU_PER_MEGAPIXEL_BY_FAMILY[family(model_type)] + extra))


def family(model_type: str) -> str:
    """The base-model family of a model type: "sd-1_5", "sd-xl", "flux.1", "flux.1-kontext",
    "flux-pro", "gpt-image" or "custom"."""
    if model_type.startswith("flux.1-kontext"):
        return "flux.1-kontext"
    if model_type in ("flux.1-pro", "flux.1.1-pro-ultra", "flux1.1-pro"):
        return "flux-pro"
    for prefix in ("sd-1_5", "sd-xl", "flux.1"):
        if model_type.startswith(prefix):
            return prefix
    return "gpt-image" if model_type == "gpt-image-1" else "custom"


def custom_refusal(model_id: str, model_type: str) -> ApiProblem | None:
    """The 400 POST /generate/custom answers for SD1.5/SDXL/Flux.1/Kontext models, else None."""
    if family(model_type) not in _INFERENCE_ONLY_FAMILIES:
        return None
    return bad_request(
        f"Model {model_id} (type {model_type}): this endpoint is not available yet for "
        "SD1.5, SDXL, Flux.1 and Flux.1-Kontext based models. For these models, use the "
        "POST /generate/{inferenceType} endpoint. Ex: POST /generate/txt2img"
    )


def capabilities(model_id: str, model_type: str) -> list[str]:
    """What the model can do (GET /models/{id} `capabilities`)."""
    if model_id in TOOL_INPUTS:
        return ["img2img"]
    return list(_CAPABILITIES.get(family(model_type), ["txt2img", "img2img"]))


def inference_inputs(model_type: str) -> list[dict[str, Any]]:
    """The inputs a model run through /generate/{inferenceType} declares."""
    side = 512 if family(model_type) == "sd-1_5" else 1024
    guidance = 7.5 if family(model_type) in ("sd-1_5", "sd-xl") else 3.5
    return [
        {**IMAGE_MODEL_INPUTS[0], "description": "What to generate."},
        {
            "name": "negativePrompt",
            "type": "string",
            "label": "Negative prompt",
            "description": "What to avoid.",
        },
        _number(
            "seed",
            0,
            2147483647,
            step=1,
            description="Fixed seed (an integer or a string of digits); random when absent.",
        ),
        {
            **_number("numSamples", 1, 128, 4, 1, "Number of images to generate."),
            "costImpact": True,
        },
        {
            **_number("width", 64, 2048, side, 8, "Output width in pixels, a multiple of 8."),
            "costImpact": True,
        },
        {
            **_number("height", 64, 2048, side, 8, "Output height in pixels, a multiple of 8."),
            "costImpact": True,
        },
        _number("guidance", 0, 20, guidance, 0.1, "Prompt adherence."),
        _number("numInferenceSteps", 1, 150, 30, 1, "Denoising steps."),
        {
            "name": "scheduler",
            "type": "string",
            "label": "Scheduler",
            "allowedValues": list(SCHEDULERS),
            "description": "Overrides the model's scheduler.",
        },
        _file(
            "image",
            False,
            "Input image (asset id or data URL): img2img, inpaint, controlnet, img2img-ip-adapter.",
        ),
        _number("strength", 0.01, 1, 0.75, 0.01, "How far the output may move from `image`."),
        _file("mask", False, "Inpaint mask (asset id or data URL); white is repainted."),
        {
            "name": "modality",
            "type": "string",
            "label": "Modality",
            "allowedValues": list(MODALITIES),
            "description": "ControlNet modality of `image` (controlnet only, required there).",
        },
        {
            "name": "ipAdapterImages",
            "type": "file_array",
            "kind": "image",
            "label": "IP-Adapter images",
            "max": 10,
            "description": "Reference images (data URLs) for the ip-adapter endpoints.",
        },
        {
            "name": "ipAdapterImageIds",
            "type": "string_array",
            "label": "IP-Adapter image ids",
            "max": 10,
            "description": "Reference images as asset ids for the ip-adapter endpoints.",
        },
        _number("ipAdapterScale", 0, 1, 0.9, 0.01, "IP-Adapter influence."),
        {
            "name": "ipAdapterType",
            "type": "string",
            "label": "IP-Adapter type",
            "allowedValues": ["style", "character"],
            "default": "style",
            "description": "What the IP-Adapter images convey.",
        },
    ]


def model_inputs_for(model_id: str, model_type: str) -> list[dict[str, Any]]:
    """The inputs[] a model declares, given its type."""
    if model_type != "custom" and model_id not in TOOL_INPUTS:
        return inference_inputs(model_type)
    return model_inputs(model_id)


def model_document(model_id: str, created_at: str, model_type: str = "custom") -> dict[str, Any]:
    """The `model` object of GET /models/{modelId}."""
    trained = model_type != "custom"
    return {
        "id": model_id,
        "name": model_id.removeprefix("model_"),
        "capabilities": capabilities(model_id, model_type),
        "collectionIds": [],
        "createdAt": created_at,
        "updatedAt": created_at,
        "custom": trained,
        "exampleAssetIds": [],
        "privacy": "private" if trained else "public",
        "source": "scenario",
        "status": "trained",
        "tags": ["sandbox"],
        "trainingImagesNumber": 12 if trained else 0,
        "type": model_type,
        "inputs": model_inputs_for(model_id, model_type),
    }
