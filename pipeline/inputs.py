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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ApiPermanentError
from pipeline.manifest import Manifest, StepSpec

# Model types whose models POST /generate/custom refuses (prefixes, as Scenario names them).
INFERENCE_ONLY_PREFIXES = ("sd-1_5", "sd-xl", "flux.1")
# Inputs the pipeline fills in itself, per kind of request.
GENERATION_SET = frozenset({"prompt", "seed", "modelId", "image", "referenceImages"})
STEP_SET = frozenset({"image", "modelId"})

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


@dataclass(slots=True)
class _Request:
    """One request a manifest makes, with where its params come from."""

    model: str
    endpoint: str
    params: dict[str, Any]
    sets: frozenset[str]  # inputs the pipeline sends itself
    params_at: str  # field path of its own params: items[2].params, steps[0].params
    model_field: str
    endpoint_field: str
    has_image: bool = False
    inherits: bool = False  # params missing from its own come from the manifest's `params`

    def signature(self) -> tuple[Any, ...]:
        """What decides its problems, field paths aside (equal reprs: equal JSON values)."""
        return (self.model, self.endpoint, self.sets, self.has_image, repr(self.params))

    def where(self, name: str, lines: Mapping[str, int]) -> str:
        """The field path of one of its params, as written in the manifest."""
        own = f"{self.params_at}.{name}"
        if not self.inherits or own in lines or f"params.{name}" not in lines:
            return own
        return f"params.{name}"

    def field_of(self, kind: str, name: str, lines: Mapping[str, int]) -> str:
        """The field path a problem of this kind (see check_request) is reported at."""
        if kind == "model":
            return self.model_field
        if kind == "endpoint":
            return self.endpoint_field
        if kind == "required":
            return self.where(name, lines).rpartition(".")[0] or "params"
        return self.where(name, lines)


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
    """Every problem of the manifest's params against its models' inputs (sorted by line).

    Items that send the same request share one check (a big manifest has few distinct
    requests); each item's problems are still reported at its own fields.
    """
    path = shown or str(manifest.path)
    lines = manifest.lines
    checked: dict[tuple[Any, ...], list[tuple[str, str, str]]] = {}
    problems: dict[tuple[int, str, str], None] = {}
    for request in _requests(manifest):
        signature = request.signature()
        found = checked.get(signature)
        if found is None:
            found = checked[signature] = check_request(request, describe)
        for kind, name, message in found:
            fld = request.field_of(kind, name, lines)
            problems[(_line(manifest, fld), fld, message)] = None
    return [f"{path}:{line}: {fld}: {msg}" for line, fld, msg in sorted(problems)]


def check_request(request: _Request, describe: Describe) -> list[tuple[str, str, str]]:
    """(kind, param name, message) problems of one request; kind is model, endpoint, param
    or required (`_Request.field_of` says where each is reported)."""
    model = describe(request.model)
    if model is None:
        return [("model", "", f"model {request.model} not found (GET /models -> 404)")]
    found: list[tuple[str, str, str]] = []
    model_type = str(model.get("type") or "")
    if request.endpoint == "custom" and inference_only(model_type):
        use = suggested_endpoint(model_type, request.has_image)
        found.append(
            (
                "endpoint",
                "",
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
            found.append(("param", name, f"model {request.model} has no input {name!r}{hint}"))
            continue
        problem = value_problem(spec, value)
        if problem:
            found.append(("param", name, problem))
    for name, spec in inputs.items():
        if _required(spec) and name not in request.params and name not in request.sets:
            found.append(("required", name, f"model {request.model} requires the input {name!r}"))
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


def _requests(manifest: Manifest) -> Iterator[_Request]:
    """Every request the manifest makes: each item's generation, then its recipe steps."""
    lines = manifest.lines
    endpoint_field = "endpoint" if "endpoint" in lines else "model"
    shared_steps: dict[int, _Request] = {}  # the manifest's steps, made once
    for i, item in enumerate(manifest.items):
        yield _Request(
            model=manifest.model,
            endpoint=item.endpoint,
            params=item.params,
            sets=GENERATION_SET,
            params_at=f"items[{i}].params",
            model_field="model",
            endpoint_field=endpoint_field,
            has_image=item.image is not None,
            inherits=True,
        )
        if not item.steps:
            continue
        # Every key has a line: the item has its own steps when `items[i].steps` has one.
        if f"items[{i}].steps" in lines:
            for j, step in enumerate(item.steps):
                yield _step_request(manifest, step, f"items[{i}].steps[{j}]")
            continue
        for j, step in enumerate(item.steps):
            if j not in shared_steps:
                shared_steps[j] = _step_request(manifest, step, f"steps[{j}]")
            yield shared_steps[j]


def _step_request(manifest: Manifest, step: StepSpec, at: str) -> _Request:
    lines = manifest.lines
    return _Request(
        model=step.model,
        endpoint=step.endpoint,
        params=step.params,
        sets=STEP_SET | ({"prompt"} if step.prompt is not None else set()),
        params_at=f"{at}.params",
        model_field=f"{at}.model",
        endpoint_field=f"{at}.endpoint" if f"{at}.endpoint" in lines else f"{at}.model",
        has_image=True,
    )
