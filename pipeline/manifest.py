"""Manifests: load, validate and expand a YAML batch description (format version 1).

    version: 1                     optional; only 1 exists
    name: forest-icons             required slug (lowercase letters, digits, single dashes)
    description: ...               optional free text, not sent anywhere
    model: model_bfl-flux-2-dev    required: the model that runs (POST /generate/custom/{model})
    trained_model: model_abc123    optional: a trained style/LoRA, sent as body.modelId
    seed: 42                       required integer 0..2**53-1; items may override it
    params: {...}                  model inputs passed through as the API names them
    endpoint: custom               optional: custom -> POST /generate/custom/{model}; txt2img,
                                   img2img, ... -> POST /generate/{endpoint}, model as modelId
    steps:                         optional recipe: each step runs on every output of the one
      - model: model_photoroom-background-removal    before it, its input sent as the asset id
        params: {...}              the step's inputs (`image` is set by the pipeline)
        endpoint: custom           optional, as above
        output: "..."              optional: store this intermediate step's outputs too
    output: "{manifest}/{item}/{index}.{ext}"   storage key template of the final outputs
    overwrite: replace             replace (default): a changed item's new outputs replace its
                                   files; never: refuse, as before recipes
    budget: 40                     optional cap in creative units for one run (pipeline.budget)
    items:                         non-empty list
      - id: iron-sword             required slug, unique in the manifest
        prompt: "..."              required, except for tool models (TOOL_MODELS)
        seed: 7                    optional override
        params: {numOutputs: 4}    merged over the manifest's params (shallow; null removes)
        image: refs/shield.png     local file relative to the manifest, sent as body.image
        reference_images: [a.png]  local files, sent as body.referenceImages
        tags: [weapon]             optional labels, not sent and not part of the item key
        steps: [...]               optional: replaces the manifest's steps for this item

Rules beyond the types: unknown keys are errors; types are strict (`seed: "42"` is an
error); `params` may not set `prompt`, `seed`, `modelId`, `image` or `referenceImages`
(they have dedicated fields); `numOutputs` is an integer 1..8; param values must be JSON;
prompts are stripped of surrounding whitespace (so `>`/`|` block scalars hash like quoted
strings); tool models need an `image`; input files must exist and be PNG, JPEG or WebP.

Hostile input fails fast (pipeline.limits, pipeline.yamlsafe): the file must be a regular
file of at most 16 MiB, with no raw control characters, nesting of at most 64 levels, no
alias bomb and no number over 100 characters; input images must be regular files of at
most 50 MB; tool parameters that multiply outputs are bounded before any key is rendered.

An item's `item_key` hashes what decides its output (model, trained model, seed, merged
params, prompt, input image bytes) but not its id, the manifest name or the output template,
so renaming or reordering items never pays for the same image twice (see pipeline.keys).

Every problem is reported, as `file:line: field: message`, with `field` a path such as
`items[2].seed`. Problems that belong to no field use `<file>` (unreadable), `<yaml>`
(syntax) or `<manifest>` (not a mapping, empty).
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import ManifestError, cut, one_line, shorten
from pipeline.keys import (
    DEFAULT_TEMPLATE,
    compute_generation_key,
    compute_recipe_key,
    find_key_collisions,
    render_key,
    uses_index,
    validate_template,
)
from pipeline.limits import MAX_INPUT_BYTES, MAX_MANIFEST_BYTES, param_problem
from pipeline.yamlsafe import YamlProblem
from pipeline.yamlsafe import compose as compose_yaml

# Models that transform an input image rather than generate from a prompt.
TOOL_MODELS = frozenset(
    {
        "model_photoroom-background-removal",
        "model_scenario-image-slicer",
        "model_upscale-v3",
        "model_scenario-grid-maker",
        "model_scenario-resize-image",
    }
)
RESERVED_PARAMS = {
    "prompt": "prompt",
    "seed": "seed",
    "modelId": "trained_model",
    "image": "image",
    "referenceImages": "reference_images",
}
STEP_RESERVED_PARAMS = {**RESERVED_PARAMS, "image": "the previous step's output"}
# POST /generate/{endpoint} types that make images (from the Swagger); custom is the default.
ENDPOINTS = frozenset(
    {
        "custom",
        "txt2img",
        "img2img",
        "controlnet",
        "controlnet-img2img",
        "controlnet-inpaint",
        "controlnet-inpaint-ip-adapter",
        "controlnet-ip-adapter",
        "controlnet-texture",
        "generative-fill",
        "img2img-ip-adapter",
        "img2img-texture",
        "inpaint",
        "inpaint-ip-adapter",
        "patch",
        "pixelate",
        "reframe",
        "remove-background",
        "restyle",
        "skybox-base-360",
        "skybox-upscale-360",
        "texture",
        "txt2img-ip-adapter",
        "txt2img-texture",
        "upscale",
        "vectorize",
    }
)
OVERWRITE_MODES = ("replace", "never")
MAX_ITEM_OUTPUTS = 1024  # outputs of one item across its recipe's fan-out
MAX_SAMPLES = 128  # numSamples bounds of /generate/{inferenceType}
INFERENCE_DEFAULT_SAMPLES = 4  # the API's numSamples default
MAX_SEED = 2**53 - 1  # the API's seeds are JSON numbers: stay exactly representable
MAX_OUTPUTS = 8  # numOutputs bounds in the Swagger file
SLUG_RULE = "must be a slug: lowercase letters, digits and single dashes"
SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_COMMON_INPUTS = frozenset(
    {"numOutputs", "width", "height", "guidance", "strength", "negativePrompt", "aspectRatio"}
)
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))

Loc = tuple[str | int, ...]
MAX_PROBLEM_CHARS = 400  # a problem line longer than this is cut in the middle


@dataclass(frozen=True)
class InputFile:
    """A local input image, identified by the sha256 of its bytes."""

    path: Path
    sha256: str
    size: int
    mime_type: str


@dataclass(frozen=True)
class StepSpec:
    """One recipe step: a model run on each output of the step before it."""

    model: str
    endpoint: str
    params: dict[str, Any] = field(hash=False)
    prompt: str | None
    output: str | None  # key template; None: outputs are not stored (intermediate steps)
    line: int
    expected_outputs: int

    def request_body(self, input_asset: str) -> dict[str, Any]:
        """The JSON body of this step run on one input asset."""
        body = _copy_json(self.params)
        if self.prompt is not None:
            body["prompt"] = self.prompt
        if self.endpoint != "custom":
            body["modelId"] = self.model
        body["image"] = input_asset
        return body

    def settings(self) -> dict[str, Any]:
        """What decides this step's outputs, besides its input (for keys)."""
        return {
            "model": self.model,
            "endpoint": self.endpoint,
            "params": self.params,
            "prompt": self.prompt,
        }


@dataclass(frozen=True)
class ItemSpec:
    """One expanded item: what to send, and the key that identifies its output."""

    id: str
    line: int
    prompt: str | None
    seed: int
    params: dict[str, Any] = field(hash=False)  # hash=False: keeps specs usable in sets
    image: InputFile | None
    reference_images: tuple[InputFile, ...]
    item_key: str  # the whole recipe's identity (the generation key when it has no steps)
    num_outputs: int  # final outputs: the product of every step's outputs
    tags: tuple[str, ...] = ()
    endpoint: str = "custom"
    generation_key: str = ""  # the first node's key
    generation_outputs: int = 1
    steps: tuple[StepSpec, ...] = ()

    @property
    def input_files(self) -> tuple[InputFile, ...]:
        """Every input file of the item: image first, then reference images."""
        return ((self.image,) if self.image else ()) + self.reference_images

    def request_body(self, manifest: Manifest, asset_ids: Mapping[str, str]) -> dict[str, Any]:
        """The JSON body for POST /generate/custom/{model}; asset_ids maps sha256 -> asset id."""

        def asset(file: InputFile) -> str:
            try:
                return asset_ids[file.sha256]
            except KeyError:
                raise KeyError(f"no uploaded asset id for {file.path} ({file.sha256})") from None

        body = _copy_json(self.params)
        if self.prompt is not None:
            body["prompt"] = self.prompt
        body["seed"] = self.seed
        if self.endpoint != "custom":
            body["modelId"] = manifest.model
        elif manifest.trained_model is not None:
            body["modelId"] = manifest.trained_model
        if self.image is not None:
            body["image"] = asset(self.image)
        if self.reference_images:
            body["referenceImages"] = [asset(f) for f in self.reference_images]
        return body


@dataclass(frozen=True)
class Manifest:
    """A validated manifest with its items expanded."""

    name: str
    model: str
    trained_model: str | None
    seed: int
    params: dict[str, Any] = field(hash=False)
    output: str
    path: Path
    sha256: str
    text: str
    items: tuple[ItemSpec, ...]
    description: str | None = None
    overwrite: str = "replace"
    budget: float | None = None  # creative units one run may spend at most
    lines: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)
    _by_id: dict[str, ItemSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {spec.id: spec for spec in self.items})

    def item(self, item_id: str) -> ItemSpec:
        """The item with this id; KeyError if there is none."""
        try:
            return self._by_id[item_id]
        except KeyError:
            raise KeyError(f"manifest {self.name!r} has no item {item_id!r}") from None

    def output_key(self, item: ItemSpec, index: int, ext: str = "png") -> str:
        """The storage key of one final output of an item."""
        template = self.output
        if index < 0 or (index > 0 and not uses_index(template)):
            raise ValueError(f"output index {index} is out of range for template {template!r}")
        return step_key(self, item, template, len(item.steps), index, ext)

    def planned_keys(self, item: ItemSpec, ext: str = "png") -> list[tuple[int, int, str]]:
        """(step, index, key) of every output the item stores, intermediate steps included."""
        keys = []
        count = item.generation_outputs
        for number, step in enumerate(item.steps, start=1):
            count *= step.expected_outputs
            if step.output is not None and number < len(item.steps):
                keys += [
                    (number, index, step_key(self, item, step.output, number, index, ext))
                    for index in range(count)
                ]
        final = len(item.steps)
        keys += [(final, index, self.output_key(item, index, ext)) for index in range(count)]
        return keys


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _StepModel(_Strict):
    model: str
    endpoint: str = "custom"
    params: dict[str, Any] = Field(default_factory=dict)
    prompt: str | None = None
    output: str | None = None


class _ItemModel(_Strict):
    id: str
    prompt: str | None = None
    seed: int | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    image: str | None = None
    reference_images: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    steps: list[_StepModel] | None = None


class _ManifestModel(_Strict):
    version: int | None = None
    name: str
    description: str | None = None
    model: str
    endpoint: str = "custom"
    trained_model: str | None = None
    seed: int
    params: dict[str, Any] = Field(default_factory=dict)
    steps: list[_StepModel] = Field(default_factory=list)
    output: str = DEFAULT_TEMPLATE
    overwrite: str = "replace"
    budget: float | None = None
    items: list[_ItemModel]


def expected_outputs(model: str, params: Mapping[str, Any], endpoint: str = "custom") -> int:
    """How many outputs one request makes (the slicer makes one per cell)."""
    if model == "model_scenario-image-slicer":
        x, y = params.get("xSubdivisions", 2), params.get("ySubdivisions", 2)
        return max(1, (x if _is_int(x) else 2) * (y if _is_int(y) else 2))
    if endpoint != "custom":
        n = params.get("numSamples", INFERENCE_DEFAULT_SAMPLES)
        return max(1, n) if _is_int(n) else INFERENCE_DEFAULT_SAMPLES
    n = params.get("numOutputs", 1)
    return max(1, n) if _is_int(n) else 1


def count_param(endpoint: str) -> str:
    """The input naming how many images a request makes."""
    return "numOutputs" if endpoint == "custom" else "numSamples"


def step_key(
    manifest: Manifest, item: ItemSpec, template: str, step: int, index: int, ext: str = "png"
) -> str:
    """The storage key of one output of a recipe step (the last step's: `output_key`)."""
    return render_key(
        template,
        manifest=manifest.name,
        item=item.id,
        index=index,
        seed=item.seed,
        item_key=item.item_key,
        ext=ext,
        step=step,
    )


def merge_params(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Item params over manifest params, shallowly; a null value removes the key."""
    merged = {**base, **override}
    return {k: v for k, v in merged.items() if v is not None}


def load_manifest(path: str | Path) -> Manifest:
    """Load and validate a manifest file; ManifestError lists every problem."""
    return _Loader(Path(path)).load()


def validate_files(
    paths: Iterable[str | Path], key_problem: Callable[[str], str | None] | None = None
) -> list[str]:
    """Return every problem of every manifest file (empty when all are valid).

    With `key_problem` (a storage's `key_problem`), every output key is checked against the
    storage's own rules as well (see storage_key_problems).
    """
    problems: list[str] = []
    names: dict[str, Path] = {}
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        try:
            manifest = load_manifest(path)
        except ManifestError as exc:
            problems.extend(exc.problems)
            continue
        if manifest.path in seen:
            continue
        seen.add(manifest.path)
        if key_problem is not None:
            problems.extend(storage_key_problems(manifest, key_problem, shown=path))
        other = names.setdefault(manifest.name, path)
        if other != path:
            line = manifest.lines.get("name", 1)
            problems.append(
                f"{path}:{line}: name: manifest name {manifest.name!r} is also used by {other}"
            )
    return problems


def _copy_json(value: Any) -> Any:
    """A copy of a JSON value (its lists and mappings new), much cheaper than deepcopy."""
    if isinstance(value, dict):
        return {k: _copy_json(v) if isinstance(v, dict | list) else v for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) if isinstance(v, dict | list) else v for v in value]
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"{'an integer' if isinstance(value, int) else 'a number'} ({cut(value, 40)})"
    if isinstance(value, str):
        return f"a string ({cut(value, 40)})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _json_problem(value: Any) -> str | None:
    """Why a param value cannot be sent as JSON, or None."""
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if value == value and abs(value) != float("inf") else "must be a finite number"
    if isinstance(value, list):
        return next((p for p in map(_json_problem, value) if p), None)
    if isinstance(value, dict):
        return next((p for p in map(_json_problem, value.values()) if p), None)
    return f"is not a JSON value ({_describe(value)}); quote it if it is text"


class _Loader:
    """One load: the YAML tree with a line for every key, then the checks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: dict[Loc, int] = {(): 1}
        self.problems: list[tuple[int, str, str]] = []  # (line, field, message)
        self.data: Any = None
        self.files: dict[Path, InputFile | str] = {}

    # -- reporting ---------------------------------------------------------------
    def line_of(self, loc: Loc) -> int:
        while loc not in self.lines:
            loc = loc[:-1]
        return self.lines[loc]

    def field_of(self, loc: Loc) -> str:
        text, node = "", self.data
        for part in loc:
            if isinstance(node, list) and isinstance(part, int):
                text += f"[{part}]"
                node = node[part] if 0 <= part < len(node) else None
            else:
                text += f".{part}" if text else str(part)
                node = node.get(part) if isinstance(node, dict) else None
        return text or "<manifest>"

    def add(self, loc: Loc, message: str) -> None:
        self.problems.append((self.line_of(loc), self.field_of(loc), message))

    def fail(self) -> ManifestError:
        # Sorted by position; problems on one field keep the order they were found in.
        unique = sorted(dict.fromkeys(self.problems), key=lambda p: (p[0], p[1]))
        return ManifestError([f"{self.path}:{line}: {fld}: {msg}" for line, fld, msg in unique])

    # -- loading -------------------------------------------------------------------
    def load(self) -> Manifest:
        try:
            with _collector_paused():
                return self._load()
        except ManifestError as exc:
            # A safety net: each problem is one line that does not grow with the input.
            lines = [shorten(one_line(p), MAX_PROBLEM_CHARS, middle=True) for p in exc.problems]
            raise ManifestError(lines) from None

    def _load(self) -> Manifest:
        raw = _read_manifest(self.path)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise ManifestError([f"{self.path}:{line}: <file>: not UTF-8 text"]) from None
        try:
            self.data = self.compose(text)
        except YamlProblem as exc:
            raise ManifestError([f"{self.path}:{exc.line}: <yaml>: {exc.message}"]) from None
        if not isinstance(self.data, dict):
            found = "an empty file" if self.data is None else _describe(self.data)
            self.problems.append((1, "<manifest>", f"expected a mapping of fields, got {found}"))
            raise self.fail()
        model = self.validate_types()
        self.check_values()
        if self.problems or model is None:
            raise self.fail()
        manifest = self.expand(model, raw, text)
        if self.problems:
            raise self.fail()
        return manifest

    def compose(self, text: str) -> Any:
        """The YAML value, recording a line for every key (see pipeline.yamlsafe)."""
        composed = compose_yaml(text)
        self.lines.update(composed.lines)
        self.problems.extend(composed.problems)
        return composed.data

    # -- checks --------------------------------------------------------------------
    def validate_types(self) -> _ManifestModel | None:
        try:
            return _ManifestModel.model_validate(self.data)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                loc = tuple(p for p in err["loc"] if p != "[key]")
                self.add(loc, self.type_message(err["type"], loc, err.get("input"), err["msg"]))
            return None

    def type_message(self, kind: str, loc: Loc, value: Any, default: str) -> str:
        if kind == "missing":
            return "required field is missing"
        if kind == "extra_forbidden":
            if "steps" in loc[:-1]:
                known: Iterable[str] = _StepModel.model_fields
            elif len(loc) == 3:
                known = _ItemModel.model_fields
            else:
                known = _ManifestModel.model_fields
            return "unknown field" + _suggest(str(loc[-1]), list(known))
        expected = {
            "int_type": "an integer",
            "float_type": "a number",
            "string_type": "a string",
            "dict_type": "a mapping",
            "model_type": "a mapping",
            "list_type": "a list",
        }.get(kind)
        if expected:
            return f"expected {expected}, got {_describe(value)}"
        return default

    def check_values(self) -> None:
        d = self.data
        if _is_int(d.get("version")) and d["version"] != 1:
            self.add(("version",), f"unsupported version {d['version']}; this pipeline reads 1")
        if isinstance(d.get("name"), str) and not SLUG.fullmatch(d["name"]):
            self.add(("name",), SLUG_RULE)
        for key in ("model", "trained_model"):
            if isinstance(d.get(key), str) and not MODEL_ID.fullmatch(d[key]):
                self.add((key,), f"not a model id: {cut(d[key])}")
        endpoint = d.get("endpoint", "custom")
        self.check_endpoint(("endpoint",), endpoint)
        if endpoint != "custom" and isinstance(d.get("trained_model"), str):
            self.add(
                ("trained_model",),
                f"with endpoint {endpoint!r} the model runs as body.modelId: put the trained "
                "model in `model` and drop `trained_model`",
            )
        budget = d.get("budget")
        if (
            isinstance(budget, int | float)
            and not isinstance(budget, bool)
            and not (0 < budget < float("inf"))
        ):
            self.add(("budget",), f"must be a positive number of creative units, got {budget}")
        if d.get("overwrite", "replace") not in OVERWRITE_MODES:
            self.add(("overwrite",), f"must be one of {', '.join(OVERWRITE_MODES)}")
        self.check_seed(("seed",), d.get("seed"))
        self.check_params(("params",), d.get("params"), endpoint)
        self.check_steps(("steps",), d.get("steps"))
        items = d.get("items")
        if not isinstance(items, list):
            items = []
        elif not items:
            self.add(("items",), "must list at least one item")
        model = d.get("model")
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            at: Loc = ("items", i)
            item_id = item.get("id")
            if isinstance(item_id, str):
                if not SLUG.fullmatch(item_id):
                    self.add((*at, "id"), SLUG_RULE)
                elif item_id in seen:
                    self.add(
                        (*at, "id"),
                        f"duplicate item id {cut(item_id)} (first defined at line {seen[item_id]})",
                    )
                seen.setdefault(item_id, self.line_of((*at, "id")))
            prompt = item.get("prompt")
            if isinstance(prompt, str) and not prompt.strip():
                self.add((*at, "prompt"), "is empty")
            if isinstance(model, str) and model in TOOL_MODELS:
                if item.get("image") is None:
                    self.add(
                        (*at, "image"), f"required field is missing: {model} needs an input image"
                    )
            elif isinstance(model, str) and prompt is None:
                self.add((*at, "prompt"), "required field is missing")
            self.check_seed((*at, "seed"), item.get("seed"))
            self.check_params((*at, "params"), item.get("params"), endpoint)
            self.check_steps((*at, "steps"), item.get("steps"))
            self.check_files(at, item)
        self.check_output(d, items)

    def check_seed(self, loc: Loc, seed: Any) -> None:
        if _is_int(seed) and not 0 <= seed <= MAX_SEED:
            self.add(loc, f"must be between 0 and {MAX_SEED}, got {seed}")

    def check_endpoint(self, loc: Loc, endpoint: Any) -> None:
        if isinstance(endpoint, str) and endpoint not in ENDPOINTS:
            close = difflib.get_close_matches(endpoint, sorted(ENDPOINTS), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else "; e.g. custom, txt2img, img2img"
            self.add(loc, f"unknown endpoint {endpoint!r}{hint}")

    def check_params(
        self,
        loc: Loc,
        params: Any,
        endpoint: Any = "custom",
        step: bool = False,
        model: Any = None,
    ) -> None:
        if not isinstance(params, dict):
            return
        reserved = STEP_RESERVED_PARAMS if step else RESERVED_PARAMS
        counter = "numSamples" if endpoint != "custom" else "numOutputs"
        most = MAX_SAMPLES if endpoint != "custom" else MAX_OUTPUTS
        if model is None:
            model = self.data.get("model")
        for key, value in params.items():
            if key in reserved and not (step and key == "prompt"):
                where = reserved[key]
                use = f"it is {where}" if step and key == "image" else f"use the `{where}` field"
                self.add((*loc, key), f"{key!r} is set by the pipeline; {use}")
            elif key in ("numOutputs", "numSamples") and key != counter:
                self.add((*loc, key), f"this endpoint counts outputs with {counter!r}, not {key!r}")
            elif key == counter and value is not None:
                if not _is_int(value):
                    self.add((*loc, key), f"expected an integer, got {_describe(value)}")
                elif not 1 <= value <= most:
                    self.add((*loc, key), f"must be between 1 and {most}, got {value}")
            elif problem := _json_problem(value) or param_problem(model, key, value):
                self.add((*loc, key), problem)

    def check_steps(self, loc: Loc, steps: Any) -> None:
        if not isinstance(steps, list):
            return
        for j, step in enumerate(steps):
            if not isinstance(step, dict):
                continue
            at = (*loc, j)
            if isinstance(step.get("model"), str) and not MODEL_ID.fullmatch(step["model"]):
                self.add((*at, "model"), f"not a model id: {step['model']!r}")
            endpoint = step.get("endpoint", "custom")
            self.check_endpoint((*at, "endpoint"), endpoint)
            if isinstance(step.get("prompt"), str) and not step["prompt"].strip():
                self.add((*at, "prompt"), "is empty")
            self.check_params(
                (*at, "params"), step.get("params"), endpoint, step=True, model=step.get("model")
            )
            output = step.get("output")
            if isinstance(output, str) and j == len(steps) - 1:
                self.add(
                    (*at, "output"),
                    "the last step's outputs go to the manifest's `output`; remove this one",
                )

    def check_files(self, at: Loc, item: dict[str, Any]) -> None:
        if isinstance(item.get("image"), str):
            self.input_file((*at, "image"), item["image"])
        refs = item.get("reference_images")
        if isinstance(refs, list):
            for j, ref in enumerate(refs):
                if isinstance(ref, str):
                    self.input_file((*at, "reference_images", j), ref)

    def input_file(self, loc: Loc, value: str) -> InputFile | None:
        """Hash a local input file once; report it at loc if unusable."""
        if not value.strip():
            self.add(loc, "is empty")
            return None
        path = (self.path.parent / value).resolve()
        if path not in self.files:
            self.files[path] = _read_input(path)
        found = self.files[path]
        if isinstance(found, str):
            self.add(loc, f"{shorten(value)}: {found}")
            return None
        return found

    def check_output(self, d: dict[str, Any], items: list[Any]) -> None:
        """Template syntax; whether templates tell outputs apart is checked on expansion."""
        output = d.get("output", DEFAULT_TEMPLATE)
        if isinstance(output, str):
            for problem in validate_template(output):
                self.add(("output",), problem)
        step_lists: list[tuple[Loc, Any]] = [(("steps",), d.get("steps"))]
        step_lists += [
            (("items", i, "steps"), item.get("steps"))
            for i, item in enumerate(items)
            if isinstance(item, dict)
        ]
        for loc, steps in step_lists:
            for j, step in enumerate(steps if isinstance(steps, list) else []):
                if isinstance(step, dict) and isinstance(step.get("output"), str):
                    for problem in validate_template(step["output"]):
                        self.add((*loc, j, "output"), problem)

    # -- expansion -----------------------------------------------------------------
    def expand(self, m: _ManifestModel, raw: bytes, text: str) -> Manifest:
        specs = []
        manifest_steps = self.expand_steps(("steps",), m.steps)
        for i, item in enumerate(m.items):
            params = merge_params(m.params, item.params)
            prompt = item.prompt.strip() if item.prompt is not None else None
            seed = m.seed if item.seed is None else item.seed
            image = self.input_file(("items", i, "image"), item.image) if item.image else None
            refs = tuple(
                f
                for j, ref in enumerate(item.reference_images)
                if (f := self.input_file(("items", i, "reference_images", j), ref))
            )
            hashes = [("image", image.sha256)] if image else []
            hashes += [(f"referenceImages[{j}]", f.sha256) for j, f in enumerate(refs)]
            generation_key = compute_generation_key(
                model=m.model,
                endpoint=m.endpoint,
                trained_model=m.trained_model,
                seed=seed,
                params=params,
                prompt=prompt,
                input_hashes=hashes,
            )
            if item.steps is None:
                steps = manifest_steps
            else:
                steps = self.expand_steps(("items", i, "steps"), item.steps)
            first = expected_outputs(m.model, params, m.endpoint)
            total = first
            for step in steps:
                total *= step.expected_outputs
            if total > MAX_ITEM_OUTPUTS:
                self.add(
                    ("items", i),
                    f"the recipe makes {total} outputs for this item; at most "
                    f"{MAX_ITEM_OUTPUTS} are allowed (lower numOutputs or the slicer's grid)",
                )
                continue
            specs.append(
                ItemSpec(
                    id=item.id,
                    line=self.line_of(("items", i)),
                    prompt=prompt,
                    seed=seed,
                    params=params,
                    image=image,
                    reference_images=refs,
                    item_key=compute_recipe_key(generation_key, [s.settings() for s in steps]),
                    num_outputs=total,
                    tags=tuple(item.tags),
                    endpoint=m.endpoint,
                    generation_key=generation_key,
                    generation_outputs=first,
                    steps=steps,
                )
            )
        manifest = Manifest(
            name=m.name,
            model=m.model,
            trained_model=m.trained_model,
            seed=m.seed,
            params=merge_params(m.params, {}),
            output=m.output,
            path=self.path.resolve(),
            sha256=hashlib.sha256(raw).hexdigest(),
            text=text,
            items=tuple(specs),
            description=m.description,
            overwrite=m.overwrite,
            budget=m.budget,
            lines=_FieldLines(self.lines),
        )
        if not self.problems:
            self.check_counts(manifest)
        if not self.problems:
            self.check_collisions(manifest)
        return manifest

    def expand_steps(self, loc: Loc, steps: list[_StepModel]) -> tuple[StepSpec, ...]:
        return tuple(
            StepSpec(
                model=step.model,
                endpoint=step.endpoint,
                params=merge_params(step.params, {}),
                prompt=step.prompt.strip() if step.prompt is not None else None,
                output=step.output,
                line=self.line_of((*loc, j)),
                expected_outputs=expected_outputs(step.model, step.params, step.endpoint),
            )
            for j, step in enumerate(steps)
        )

    def check_counts(self, manifest: Manifest) -> None:
        """Each template must tell apart the outputs it stores ({index})."""
        most: dict[Loc, tuple[str, int]] = {}
        for n, spec in enumerate(manifest.items):
            base: Loc = (
                ("steps",)
                if self.data.get("items", [{}])[n].get("steps") is None
                else (
                    "items",
                    n,
                    "steps",
                )
            )
            count = spec.generation_outputs
            for j, step in enumerate(spec.steps):
                count *= step.expected_outputs
                if step.output is not None:
                    at = (*base, j, "output")
                    most[at] = (step.output, max(count, most.get(at, ("", 0))[1]))
            most[("output",)] = (manifest.output, max(count, most.get(("output",), ("", 0))[1]))
        for loc, (template, count) in most.items():
            if count > 1 and not uses_index(template):
                self.add(
                    loc,
                    f"must contain {{index}}: an item makes up to {count} outputs "
                    "and they would overwrite each other",
                )

    def check_collisions(self, manifest: Manifest) -> None:
        """Two different outputs must never share a storage key."""
        rendered = (
            (f"{spec.item_key}:{step}:{index}", key)
            for spec in manifest.items
            for step, index, key in manifest.planned_keys(spec)
        )
        owners = {spec.item_key: spec.id for spec in manifest.items}
        for key, first, second in find_key_collisions(rendered):
            a, b = owners[first.split(":")[0]], owners[second.split(":")[0]]
            what = f"items {a!r} and {b!r} both write" if a != b else f"item {a!r} writes twice"
            self.add(("output",), f"{what} to {key!r}")


def storage_key_problems(
    manifest: Manifest,
    key_problem: Callable[[str], str | None],
    *,
    shown: Path | None = None,
) -> list[str]:
    """`file:line: output: ...` for each item with an output key the storage would refuse.

    key_problem is the configured storage's own rule set (Storage.key_problem: lengths,
    reserved names, no I/O). One line per item, at the item's line, naming the first
    refused key; run before anything is paid for.
    """
    problems = []
    path = shown or manifest.path
    for spec in manifest.items:
        # An item's keys differ only in the digits of {index}: per stored step, the first
        # and the last (the longest) decide every rule, however many outputs it makes.
        first_last: dict[int, list[str]] = {}
        for step, _index, key in manifest.planned_keys(spec):
            keys = first_last.setdefault(step, [])
            keys[1:] = [key]
            if len(keys) == 1:
                keys.append(key)
        for key in (k for keys in first_last.values() for k in dict.fromkeys(keys)):
            problem = key_problem(key)
            if problem:
                problems.append(
                    f"{path}:{spec.line}: output: item {cut(spec.id, 40)} would be stored at "
                    f"{cut(key, 80)}, which the storage refuses: {problem}"
                )
                break
    return problems


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a manifest loads.

    A 100,000-item manifest makes millions of objects, none of them in a cycle: each
    collection the allocations trigger would walk them all again for nothing (a fifth of
    the load's time). Garbage is still freed as usual, by reference counting.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _loc_text(loc: Loc) -> str:
    """A location as a field path (`items[2].params.width`): ints are list indices."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


class _FieldLines(Mapping[str, int]):
    """`Manifest.lines`: field path -> line, rendered only when first asked for.

    A 100,000-item manifest has hundreds of thousands of keys; most runs never look one up
    by its path, and a top-level field is found without rendering the others.
    """

    def __init__(self, locs: Mapping[Loc, int]) -> None:
        self._locs = locs
        self._paths: dict[str, int] | None = None

    def _all(self) -> dict[str, int]:
        if self._paths is None:
            self._paths = {_loc_text(loc): line for loc, line in self._locs.items() if loc}
        return self._paths

    def __getitem__(self, key: str) -> int:
        if self._paths is None and key.isidentifier() and (key,) in self._locs:
            return self._locs[(key,)]
        return self._all()[key]

    def __contains__(self, key: object) -> bool:
        if self._paths is None and isinstance(key, str) and (key,) in self._locs:
            return True  # a top-level field, found without rendering every path
        return key in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def _suggest(key: str, known: list[str]) -> str:
    """A hint for an unknown field: the likely intended one, or the allowed ones."""
    if key in RESERVED_PARAMS and RESERVED_PARAMS[key] in known:
        return f" (did you mean {RESERVED_PARAMS[key]!r}?)"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    if key in _COMMON_INPUTS:
        return " (model inputs go under 'params')"
    return f"; allowed: {', '.join(known)}"


def _open_regular(path: Path) -> int | str:
    """An fd open for reading on a regular file, or why not (FIFOs and devices never block)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            kind = "a directory" if path.is_dir() else "a special file (device, FIFO or socket)"
            return f"is {kind}, not a regular file"
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the stat
        os.close(fd)
        return "is a special file (device, FIFO or socket), not a regular file"
    return fd


def _read_manifest(path: Path) -> bytes:
    """The manifest's bytes: a regular file of at most MAX_MANIFEST_BYTES."""
    fd = _open_regular(path)
    if isinstance(fd, str):
        reason = "No such file or directory" if fd == "file not found" else fd
        raise ManifestError(
            [f"{path}:1: <file>: cannot read: {reason.removeprefix('cannot read: ')}"]
        )
    try:
        with os.fdopen(fd, "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError([f"{path}:1: <file>: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            [
                f"{path}:1: <file>: larger than {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB; "
                "split the batch into several manifests"
            ]
        )
    return raw


def _read_input(path: Path) -> InputFile | str:
    """An InputFile for a local image, or why it cannot be used."""
    fd = _open_regular(path)
    if isinstance(fd, str):
        return fd
    digest = hashlib.sha256()
    size = 0
    head = b""
    try:
        with os.fdopen(fd, "rb") as handle:
            if os.fstat(handle.fileno()).st_size > MAX_INPUT_BYTES:
                return f"larger than {MAX_INPUT_BYTES // 1_000_000} MB"
            while chunk := handle.read(1 << 20):
                head = head or chunk[:16]
                digest.update(chunk)
                size += len(chunk)
                if size > MAX_INPUT_BYTES:  # grew while being read
                    return f"larger than {MAX_INPUT_BYTES // 1_000_000} MB"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    if size == 0:
        return "file is empty"
    mime = next((m for magic, m in _MAGIC if head.startswith(magic)), None)
    if mime is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None:
        return "not a PNG, JPEG or WebP image"
    return InputFile(path=path, sha256=digest.hexdigest(), size=size, mime_type=mime)


__all__ = [
    "MAX_OUTPUTS",
    "RESERVED_PARAMS",
    "TOOL_MODELS",
    "InputFile",
    "ItemSpec",
    "Manifest",
    "ManifestError",
    "StepSpec",
    "expected_outputs",
    "load_manifest",
    "merge_params",
    "storage_key_problems",
    "validate_files",
]
