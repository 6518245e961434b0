"""Online checks of a manifest's params against each model's declared inputs.

Scenario describes every model (`GET /models/{modelId}` -> `model.inputs[]`: name, type,
min, max, allowedValues, required). `check_manifest` compares what each request would send
with that description: unknown names (with a did-you-mean), types, min/max, allowed values
and missing required inputs, taking into account what the pipeline sets itself (prompt,
seed, image, modelId, ...). It also names the endpoint to use for models that cannot run on
/generate/custom (SD 1.5, SDXL, Flux.1 and Flux.1 Kontext based models).

Problems are `file:line: field: message`, the line found in `Manifest.lines`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ApiPermanentError
from pipeline.manifest import Manifest, StepSpec

# Model types whose models POST /generate/custom refuses (prefixes, as Scenario names them).
INFERENCE_ONLY_PREFIXES = ("sd-1_5", "sd-xl", "flux.1")
# Inputs the pipeline fills in itself, per kind of request.
GENERATION_SET = {"prompt", "seed", "modelId", "image", "referenceImages"}
STEP_SET = {"image", "modelId"}

Describe = Callable[[str], dict[str, Any] | None]


class ModelCache:
    """Model descriptions fetched once per process (None: the model does not exist)."""

    def __init__(self, fetch: Callable[[str], dict[str, Any]]) -> None:
        self._fetch = fetch
        self._known: dict[str, dict[str, Any] | None] = {}

    def __call__(self, model_id: str) -> dict[str, Any] | None:
        if model_id not in self._known:
            try:
                self._known[model_id] = self._fetch(model_id)
            except ApiPermanentError as exc:
                if exc.status_code != 404:
                    raise
                self._known[model_id] = None
        return self._known[model_id]


@dataclass
class _Request:
    """One kind of request a manifest makes, with where its params come from."""

    model: str
    endpoint: str
    params: dict[str, Any]
    sets: set[str]  # inputs the pipeline sends itself
    where: Callable[[str], str]  # param name -> field path for the report
    model_field: str
    endpoint_field: str
    has_image: bool = False
    problems: list[tuple[str, str]] = field(default_factory=list)


def inference_only(model_type: str | None) -> bool:
    """Whether POST /generate/custom refuses models of this type."""
    if not model_type:
        return False
    if model_type in ("flux.1-pro", "flux.1.1-pro-ultra", "flux1.1-pro"):
        return False
    return model_type.startswith(INFERENCE_ONLY_PREFIXES)


def suggested_endpoint(model_type: str, has_image: bool) -> str:
    """The /generate/{inferenceType} a custom-endpoint request should use instead."""
    if model_type.startswith("flux.1-kontext"):
        return "img2img"
    return "img2img" if has_image else "txt2img"


def check_manifest(manifest: Manifest, describe: Describe, shown: str | None = None) -> list[str]:
    """Every problem of the manifest's params against its models' inputs (sorted by line)."""
    path = shown or str(manifest.path)
    problems: dict[tuple[int, str, str], None] = {}
    for request in _requests(manifest):
        for fld, message in check_request(request, describe):
            line = _line(manifest, fld)
            problems[(line, fld, message)] = None
    return [f"{path}:{line}: {fld}: {msg}" for line, fld, msg in sorted(problems)]


def check_request(request: _Request, describe: Describe) -> list[tuple[str, str]]:
    """(field, message) problems of one request."""
    model = describe(request.model)
    if model is None:
        return [(request.model_field, f"model {request.model} not found (GET /models -> 404)")]
    found: list[tuple[str, str]] = []
    model_type = str(model.get("type") or "")
    if request.endpoint == "custom" and inference_only(model_type):
        use = suggested_endpoint(model_type, request.has_image)
        found.append(
            (
                request.endpoint_field,
                f"model {request.model} (type {model_type}) cannot run on /generate/custom; "
                f"set `endpoint: {use}` (POST /generate/{use} with the model as modelId)",
            )
        )
    inputs = {spec["name"]: spec for spec in model.get("inputs") or [] if "name" in spec}
    if not inputs:
        return found
    for name, value in request.params.items():
        spec = inputs.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, sorted(inputs), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            found.append(
                (request.where(name), f"model {request.model} has no input {name!r}{hint}")
            )
            continue
        problem = value_problem(spec, value)
        if problem:
            found.append((request.where(name), problem))
    for name, spec in inputs.items():
        if _required(spec) and name not in request.params and name not in request.sets:
            found.append(
                (
                    request.where(name).rpartition(".")[0] or "params",
                    f"model {request.model} requires the input {name!r}",
                )
            )
    return found


def value_problem(spec: dict[str, Any], value: Any) -> str | None:
    """Why `value` does not fit an input spec, or None."""
    kind = spec.get("type")
    if value is None:
        return None
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number, got {_describe(value)}"
        if spec.get("step") == 1 and value != int(value):
            return f"expected an integer, got {value}"
    elif kind in ("string", "model", "file"):
        if not isinstance(value, str):
            return f"expected a string, got {_describe(value)}"
    elif kind == "boolean":
        if not isinstance(value, bool):
            return f"expected true or false, got {_describe(value)}"
    elif kind in ("string_array", "file_array"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return "expected a list of strings"
        if isinstance(spec.get("max"), int) and len(value) > spec["max"]:
            return f"at most {spec['max']} values, got {len(value)}"
        return None
    allowed = spec.get("allowedValues")
    if isinstance(allowed, list) and allowed and value not in allowed:
        shown = ", ".join(map(str, allowed[:12])) + (", ..." if len(allowed) > 12 else "")
        close = (
            difflib.get_close_matches(value, [str(a) for a in allowed], n=1, cutoff=0.6)
            if isinstance(value, str)
            else []
        )
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"must be one of {shown}, got {value!r}{hint}"
    if kind == "number":
        lo, hi = spec.get("min"), spec.get("max")
        below = isinstance(lo, int | float) and value < lo
        if below or (isinstance(hi, int | float) and value > hi):
            return f"must be within [{lo}, {hi}], got {value}"
    return None


def _required(spec: dict[str, Any]) -> bool:
    required = spec.get("required")
    if isinstance(required, dict):
        return bool(required.get("always"))
    return required is True


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} ({value!r})"


def _line(manifest: Manifest, fld: str) -> int:
    lines = manifest.lines
    probe = fld
    while probe:
        if probe in lines:
            return lines[probe]
        cut = max(probe.rfind("."), probe.rfind("["))
        probe = probe[:cut] if cut > 0 else ""
    return 1


def _requests(manifest: Manifest) -> list[_Request]:
    """The distinct requests a manifest makes, each with its params' field paths."""
    lines = manifest.lines
    requests: list[_Request] = []
    for i, item in enumerate(manifest.items):

        def where(name: str, i: int = i) -> str:
            own = f"items[{i}].params.{name}"
            return own if own in lines or f"params.{name}" not in lines else f"params.{name}"

        sets = set(GENERATION_SET)
        requests.append(
            _Request(
                model=manifest.model,
                endpoint=item.endpoint,
                params=dict(item.params),
                sets=sets,
                where=where,
                model_field="model",
                endpoint_field="endpoint" if "endpoint" in lines else "model",
                has_image=item.image is not None,
            )
        )
        own_steps = any(k.startswith(f"items[{i}].steps") for k in lines)
        base = f"items[{i}].steps" if own_steps else "steps"
        for j, step in enumerate(item.steps):
            requests.append(_step_request(manifest, step, f"{base}[{j}]"))
    return requests


def _step_request(manifest: Manifest, step: StepSpec, at: str) -> _Request:
    lines = manifest.lines
    sets = set(STEP_SET) | ({"prompt"} if step.prompt is not None else set())
    return _Request(
        model=step.model,
        endpoint=step.endpoint,
        params=dict(step.params),
        sets=sets,
        where=lambda name: f"{at}.params.{name}",
        model_field=f"{at}.model",
        endpoint_field=f"{at}.endpoint" if f"{at}.endpoint" in lines else f"{at}.model",
        has_image=True,
    )
