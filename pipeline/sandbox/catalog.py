"""The models the sandbox knows: their inputs (as GET /models/{id} shows them), validation, cost."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SLICER = "model_scenario-image-slicer"
BACKGROUND_REMOVAL = "model_photoroom-background-removal"
UPSCALE = "model_upscale-v3"
TOOL_MODELS = (SLICER, BACKGROUND_REMOVAL, UPSCALE)

# Flat costs in creative units; image models cost per output and per started megapixel.
CU_PER_IMAGE_MEGAPIXEL = 5
CU_SLICER = 1
CU_BACKGROUND_REMOVAL = 2
CU_UPSCALE_PER_FACTOR = 2
CU_CAPTION_PER_IMAGE = 1


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
            colour = _check_string(body, "backgroundColor", required=False)
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
    seed = body.get("seed")
    if seed is not None and not (
        (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= 2147483647)
        or (isinstance(seed, str) and seed.isdigit())
    ):
        raise bad_request(f"seed must be an integer within [0, 2147483647], got {seed!r}")
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
    megapixels = math.ceil(width * height / (1024 * 1024))
    return Plan(
        model_id,
        "image",
        num,
        float(num * megapixels * CU_PER_IMAGE_MEGAPIXEL),
        {"prompt": prompt, "width": width, "height": height, "strength": strength},
        image,
        list(references),
    )


def model_document(model_id: str, created_at: str) -> dict[str, Any]:
    """The `model` object of GET /models/{modelId}."""
    tool = model_id in TOOL_INPUTS
    capabilities = ["img2img"] if tool else ["txt2img", "img2img"]
    return {
        "id": model_id,
        "name": model_id.removeprefix("model_"),
        "capabilities": capabilities,
        "collectionIds": [],
        "createdAt": created_at,
        "updatedAt": created_at,
        "custom": False,
        "exampleAssetIds": [],
        "privacy": "public",
        "source": "scenario",
        "status": "trained",
        "tags": ["sandbox"],
        "trainingImagesNumber": 0,
        "type": "custom",
        "inputs": model_inputs(model_id),
    }
