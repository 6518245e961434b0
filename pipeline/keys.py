"""Item identity and storage keys: `compute_item_key` and output key templates.

An item's `item_key` is the sha256 (hex) of a canonical JSON document holding everything
that decides its output, and nothing else:

    {"v": ITEM_KEY_VERSION, "model", "trained_model", "seed", "params" (merged),
     "prompt", "inputs": [[role, sha256 of the file bytes], ...]}

The item id, the manifest name, the output template, the order of items and the YAML
formatting are deliberately left out: renaming or moving an item must not pay for it again.
Canonical means sorted keys, no whitespace, ASCII only, and integral floats written as
integers (`guidance: 3` and `guidance: 3.0` are the same request). Bump ITEM_KEY_VERSION
only when the meaning of a key changes; doing so makes every item look new.

Output templates are `str.format` strings over exactly the fields in PLACEHOLDERS. `{index}`
and `{seed}` may carry a zero-padding spec (`{index:03d}`); nothing else takes a spec or a
conversion. `validate_template` returns every problem as a message; `render_key` renders.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

ITEM_KEY_VERSION = 1

PLACEHOLDERS = frozenset({"manifest", "item", "index", "seed", "item_key", "ext", "step"})
DEFAULT_TEMPLATE = "{manifest}/{item}/{index}.{ext}"

# Only integer fields may be padded, and only with zeros: a space-padded key is a trap.
_INT_FIELDS = frozenset({"index", "seed", "step"})
_PAD_SPEC = re.compile(r"(?:0[1-9][0-9]?)?d?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _canonical(value: Any) -> Any:
    """Normalise a JSON value so that equal requests hash equally."""
    kind = type(value)  # the exact built-in types first: items' keys are most of a big run
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return int(value) if value.is_integer() else value
    if kind is dict:
        return {k if type(k) is str else str(k): _canonical(v) for k, v in value.items()}
    if kind is list:
        return [_canonical(v) for v in value]
    if isinstance(value, bool | str):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    raise TypeError(f"not a JSON value: {type(value).__name__}")


# One encoder for every key: json.dumps builds a new one on each call with these options.
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
)


def canonical_json(value: Any) -> str:
    """Serialise a JSON value canonically: sorted keys, no whitespace, ASCII."""
    return _ENCODER.encode(_canonical(value))


def compute_item_key(
    *,
    model: str,
    trained_model: str | None,
    seed: int,
    params: Mapping[str, Any],
    prompt: str | None,
    input_hashes: Sequence[tuple[str, str]],
) -> str:
    """Return the item key: sha256 hex of the canonical JSON of what decides the output."""
    document = {
        "v": ITEM_KEY_VERSION,
        "model": model,
        "trained_model": trained_model,
        "seed": seed,
        "params": dict(params),
        "prompt": prompt,
        # Roles keep `image` apart from `referenceImages[0]`; their order is the request's.
        "inputs": [[role, sha] for role, sha in input_hashes],
    }
    return hashlib.sha256(canonical_json(document).encode("ascii")).hexdigest()


def compute_generation_key(
    *,
    model: str,
    endpoint: str,
    trained_model: str | None,
    seed: int,
    params: Mapping[str, Any],
    prompt: str | None,
    input_hashes: Sequence[tuple[str, str]],
) -> str:
    """The node key of an item's first (generation) step.

    For the default endpoint it is the item key of a recipe-less item, so outputs recorded
    before recipes existed are still found.
    """
    key = compute_item_key(
        model=model,
        trained_model=trained_model,
        seed=seed,
        params=params,
        prompt=prompt,
        input_hashes=input_hashes,
    )
    if endpoint == "custom":
        return key
    return _sha({"v": ITEM_KEY_VERSION, "generation": key, "endpoint": endpoint})


def compute_step_key(
    *, model: str, endpoint: str, params: Mapping[str, Any], prompt: str | None, input_asset: str
) -> str:
    """The node key of a recipe step: its model, endpoint and params, and its input asset.

    The input is named by Scenario's asset id: a step is reused only when it would run on
    the very same image, which holds when its parent node was itself reused.
    """
    document = {
        "v": ITEM_KEY_VERSION,
        "model": model,
        "endpoint": endpoint,
        "params": dict(params),
        "prompt": prompt,
        "input": input_asset,
    }
    return _sha(document)


def compute_recipe_key(generation_key: str, steps: Sequence[Mapping[str, Any]]) -> str:
    """An item's key when it has recipe steps: its generation and every step's settings."""
    if not steps:
        return generation_key
    return _sha({"v": ITEM_KEY_VERSION, "generation": generation_key, "steps": list(steps)})


def _sha(document: Any) -> str:
    return hashlib.sha256(canonical_json(document).encode("ascii")).hexdigest()


def template_fields(template: str) -> list[tuple[str, str, str | None]]:
    """Return (field, format_spec, conversion) for each placeholder; ValueError if malformed."""
    fields = []
    for _literal, field, spec, conversion in string.Formatter().parse(template):
        if field is not None:
            fields.append((field, spec or "", conversion))
    return fields


def validate_template(template: str, *, max_outputs: int = 1) -> list[str]:
    """Return every problem of an output key template (empty when valid)."""
    if not template:
        return ["is empty"]
    try:
        fields = template_fields(template)
    except ValueError as exc:
        return [f"malformed template: {exc} (write a literal brace as '{{{{' or '}}}}')"]
    problems = []
    names = set()
    for field, spec, conversion in fields:
        if field not in PLACEHOLDERS:
            shown = "{}" if field == "" else "{" + field + "}"
            problems.append(f"unknown placeholder {shown}; use {', '.join(sorted_placeholders())}")
            continue
        names.add(field)
        if conversion is not None:
            problems.append(f"placeholder {{{field}}} cannot take a conversion (!{conversion})")
        if spec and (field not in _INT_FIELDS or not _PAD_SPEC.fullmatch(spec)):
            problems.append(
                f"format spec ':{spec}' is not allowed on {{{field}}}; "
                "only {index}, {seed} and {step} take a zero padding such as ':03d'"
            )
    if "\\" in template:
        problems.append("must not contain a backslash; storage keys use '/'")
    if template.startswith("/"):
        problems.append("must be a relative key, not an absolute path (drop the leading '/')")
    if _CONTROL.search(template):
        problems.append("must not contain control characters")
    segments = template.split("/")
    if any(segment in ("..", ".") for segment in segments):
        problems.append("must not contain '.' or '..' path segments")
    if any(segment == "" for segment in segments[1:]):
        problems.append("must not contain an empty path segment ('//' or a trailing '/')")
    if not names & {"item", "item_key"}:
        problems.append("must contain {item} or {item_key}, or all items write to the same keys")
    if max_outputs > 1 and "index" not in names:
        problems.append(
            f"must contain {{index}}: an item makes up to {max_outputs} outputs "
            "and they would overwrite each other"
        )
    return problems


def sorted_placeholders() -> list[str]:
    """The allowed placeholders in documentation order, written as `{name}`."""
    order = ["manifest", "item", "index", "seed", "item_key", "ext", "step"]
    return ["{" + name + "}" for name in order]


def render_key(
    template: str,
    *,
    manifest: str,
    item: str,
    index: int,
    seed: int,
    item_key: str,
    ext: str,
    step: int = 0,
) -> str:
    """Render an output key template (validated beforehand) for one output."""
    return template.format(
        manifest=manifest,
        item=item,
        index=index,
        seed=seed,
        item_key=item_key,
        ext=ext.lstrip("."),
        step=step,
    )


def uses_index(template: str) -> bool:
    """Whether the template distinguishes the outputs of one item."""
    return any(field == "index" for field, _spec, _conv in template_fields(template))


def find_key_collisions(keys: Iterable[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """Return (key, first owner, second owner) for each key rendered by two owners."""
    seen: dict[str, str] = {}
    collisions = []
    for owner, key in keys:
        if key in seen and seen[key] != owner:
            collisions.append((key, seen[key], owner))
        else:
            seen.setdefault(key, owner)
    return collisions
