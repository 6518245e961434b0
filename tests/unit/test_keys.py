"""Item keys (what decides an output) and storage key templates."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest

from pipeline.keys import (
    DEFAULT_TEMPLATE,
    canonical_json,
    compute_item_key,
    render_key,
    uses_index,
    validate_template,
)

BASE: dict[str, Any] = {
    "model": "model_bfl-flux-2-dev",
    "trained_model": "model_style",
    "seed": 42,
    "params": {"width": 512, "height": 512, "numOutputs": 2, "strength": 0.6},
    "prompt": "iron sword icon",
    "input_hashes": [("image", "a" * 64), ("referenceImages[0]", "b" * 64)],
}


def key(**changes: Any) -> str:
    return compute_item_key(**{**BASE, **changes})


def test_item_key_is_a_full_sha256_hex_and_stable_across_calls() -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", key())
    assert key() == key()


def test_item_key_golden_value() -> None:
    # Pinned: a change here silently makes every stored output look new (re-pay for all).
    document = (
        '{"inputs":[["image","' + "a" * 64 + '"],["referenceImages[0]","' + "b" * 64 + '"]],'
        '"model":"model_bfl-flux-2-dev",'
        '"params":{"height":512,"numOutputs":2,"strength":0.6,"width":512},'
        '"prompt":"iron sword icon","seed":42,"trained_model":"model_style","v":1}'
    )
    assert key() == hashlib.sha256(document.encode()).hexdigest()
    assert key() == "99c234acf6b05bc998c0c8da355bede3edff65f76963c96f410c695f5c47732c"


@pytest.mark.parametrize(
    "changes",
    [
        {"seed": 43},
        {"prompt": "iron sword icon, rusty"},
        {"prompt": None},
        {"model": "model_other"},
        {"trained_model": None},
        {"trained_model": "model_style2"},
        {"params": {**BASE["params"], "strength": 0.7}},
        {"params": {**BASE["params"], "guidance": 3.5}},
        {"params": {"width": 512, "height": 512, "numOutputs": 2}},
        {"input_hashes": [("image", "c" * 64), ("referenceImages[0]", "b" * 64)]},
        {"input_hashes": [("image", "a" * 64)]},
        # The same file in another role is another request.
        {"input_hashes": [("referenceImages[0]", "a" * 64), ("image", "b" * 64)]},
        {"input_hashes": [("image", "b" * 64), ("referenceImages[0]", "a" * 64)]},
    ],
)
def test_item_key_changes_with_every_deciding_input(changes: dict[str, Any]) -> None:
    assert key(**changes) != key()


def test_item_key_ignores_param_order() -> None:
    reordered = dict(reversed(list(BASE["params"].items())))
    assert list(reordered) != list(BASE["params"])
    assert key(params=reordered) == key()


def test_item_key_treats_integral_floats_as_integers() -> None:
    assert key(params={**BASE["params"], "width": 512.0}) == key()
    assert key(params={**BASE["params"], "strength": 0.60}) == key()


def test_item_key_does_not_confuse_booleans_with_numbers() -> None:
    assert key(params={"flag": True}) != key(params={"flag": 1})


def test_canonical_json_is_compact_sorted_ascii() -> None:
    assert canonical_json({"b": 1, "a": ["é", 2.0]}) == '{"a":["\\u00e9",2],"b":1}'


def test_canonical_json_rejects_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def render(template: str = DEFAULT_TEMPLATE, **changes: Any) -> str:
    values: dict[str, Any] = {
        "manifest": "forest-icons",
        "item": "iron-sword",
        "index": 1,
        "seed": 42,
        "item_key": "f" * 64,
        "ext": "png",
    }
    return render_key(template, **{**values, **changes})


def test_render_key_default_template() -> None:
    assert render() == "forest-icons/iron-sword/1.png"


def test_render_key_all_placeholders_and_padding() -> None:
    template = "{manifest}/{seed:06d}/{item}-{index:03d}-{item_key}.{ext}"
    assert render(template, ext=".webp") == f"forest-icons/000042/iron-sword-001-{'f' * 64}.webp"


@pytest.mark.parametrize(
    "template",
    [
        DEFAULT_TEMPLATE,
        "{manifest}/{item}/{index}.png",
        "icons/{item_key}/{index:02d}.{ext}",
        "{item}-{index:03}.{ext}",
        "a/{item}/{index:d}/{seed}.{ext}",
    ],
)
def test_valid_templates(template: str) -> None:
    assert validate_template(template, max_outputs=4) == []


@pytest.mark.parametrize(
    ("template", "max_outputs", "expected"),
    [
        ("", 1, "is empty"),
        ("{manifest}/{item}/{name}.png", 1, "unknown placeholder {name}"),
        ("{manifest}/{item}/{}.png", 1, "unknown placeholder {}"),
        ("{manifest}/{item}/{0}.png", 1, "unknown placeholder {0}"),
        ("{item.id}/{index}", 1, "unknown placeholder {item.id}"),
        ("/{manifest}/{item}/{index}.png", 1, "not an absolute path"),
        ("{manifest}/../{item}/{index}.png", 1, "'..' path segments"),
        ("./{item}/{index}.png", 1, "'..' path segments"),
        ("{manifest}//{item}/{index}.png", 1, "empty path segment"),
        ("{manifest}/{item}/", 1, "empty path segment"),
        ("{manifest}\\{item}\\{index}.png", 1, "backslash"),
        ("{manifest}/{item}.png", 2, "must contain {index}"),
        ("{manifest}/{index}.png", 1, "must contain {item} or {item_key}"),
        ("{manifest}/{item!r}/{index}", 1, "cannot take a conversion"),
        ("{manifest:>10}/{item}/{index}", 1, "format spec ':>10' is not allowed on {manifest}"),
        ("{item}/{index:3d}", 1, "format spec ':3d' is not allowed on {index}"),
        ("{item}/{index", 1, "malformed template"),
        ("{item}/{index}}", 1, "malformed template"),
        ("{item}/\t{index}", 1, "control characters"),
    ],
)
def test_invalid_templates(template: str, max_outputs: int, expected: str) -> None:
    problems = validate_template(template, max_outputs=max_outputs)
    assert any(expected in p for p in problems), problems


def test_template_without_index_is_fine_for_single_outputs() -> None:
    assert validate_template("{manifest}/{item}.{ext}", max_outputs=1) == []
    assert not uses_index("{manifest}/{item}.{ext}")
    assert uses_index("{item}/{index:02d}")


def test_invalid_template_reports_every_problem() -> None:
    problems = validate_template("/{manifest}/../{nope}", max_outputs=3)
    assert len(problems) == 5, problems
