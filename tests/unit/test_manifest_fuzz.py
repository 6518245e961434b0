"""Property: whatever the file holds, load_manifest returns a Manifest or raises ManifestError.

Three sources of input: arbitrary bytes, text assembled from YAML's sharp edges (anchors,
tags, merge keys, flow brackets, huge numbers, odd scalars), and structured manifests whose
fields hold arbitrary YAML values. Every ManifestError problem must be one short line in
the `file:line: field: message` form.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import ManifestError
from pipeline.manifest import Manifest, load_manifest
from pipeline.yamlsafe import compose

FUZZ = settings(
    max_examples=100,
    deadline=None,  # the machine is shared; a slow example is not a failure here
    database=None,  # write nothing into the checkout
    suppress_health_check=[HealthCheck.too_slow],
)
PROBLEM = re.compile(r".+:\d+: \S.*: .+")

TOKENS = [
    "{", "}", "[", "]", ": ", ":", "- ", ",", "\n", "  ", "\t", "'", '"', "#", "|", ">", "? ",
    "---\n", "...\n", "%YAML 1.1\n", "&a ", "*a", "&b ", "*b", "<<: ", "!!int ", "!!str ",
    "!!binary ", "!!python/object:os.system ", "!foo ", "!!set ", "!!omap ", "~", "null",
    "yes", "no", "1e999", "-.inf", ".nan", "0x" + "f" * 50, "9" * 120, "1:2:3", "2024-13-45",
    "2024-01-01", "name", "model", "seed", "items", "id", "prompt", "params", "image",
    "reference_images", "output", "numOutputs", "xSubdivisions", "{item}", "{index:03d}",
    "{item.__class__}", "../", "/dev/zero", ".meta/", "model_scenario-image-slicer",
    "model_bfl-flux-2-dev", "\x00", "\x1b", "\u2028", "\ufeff", "é",
]  # fmt: skip

SKELETON = "name: m\nmodel: model_bfl-flux-2-dev\nseed: 1\nitems:\n  - id: a\n    prompt: p\n"


def check(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.yaml"
        path.write_bytes(data)
        try:
            result = load_manifest(path)
        except ManifestError as exc:
            assert exc.problems
            for problem in exc.problems:
                assert PROBLEM.fullmatch(problem), problem
                assert problem.startswith(f"{path}:")
                assert len(problem) <= 400
        else:
            assert isinstance(result, Manifest)


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=60), st.booleans())
def test_yaml_shaped_text(tokens: list[str], after_skeleton: bool) -> None:
    text = "".join(tokens)
    check(((SKELETON + text) if after_skeleton else text).encode("utf-8"))


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        ["model_scenario-image-slicer", "{item}/{index}.png", "a", "../x", "/dev/zero"]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(
                st.text(max_size=12),
                st.sampled_from(["numOutputs", "xSubdivisions", "upscaleFactor", "seed", "<<"]),
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)
MANIFEST_FIELDS = [
    "version",
    "name",
    "description",
    "model",
    "trained_model",
    "seed",
    "params",
    "output",
]
ITEM_FIELDS = ["id", "prompt", "seed", "params", "image", "reference_images", "tags"]


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "m",
        "model": draw(st.sampled_from(["model_bfl-flux-2-dev", "model_scenario-image-slicer"])),
        "seed": 1,
    }
    for key in draw(st.lists(st.sampled_from(MANIFEST_FIELDS), max_size=3)):
        doc[key] = draw(values)
    items = []
    for index in range(draw(st.integers(min_value=0, max_value=3))):
        item: dict[str, Any] = {"id": f"i{index}", "prompt": "p"}
        for key in draw(st.lists(st.sampled_from(ITEM_FIELDS), max_size=3)):
            item[key] = draw(values)
        items.append(item)
    doc["items"] = draw(st.one_of(st.just(items), values))
    return doc


@FUZZ
@given(manifests(), st.sampled_from(["block", "flow", "anchors"]))
def test_structured_manifests(doc: dict[str, Any], style: str) -> None:
    text = yaml.safe_dump(doc, default_flow_style=style == "flow", allow_unicode=True)
    if style == "anchors":
        # Shared values become anchors and aliases.
        shared = {"params": doc.get("params"), "items": [doc.get("params")] * 3, **doc}
        text = yaml.safe_dump(shared, allow_unicode=True)
    check(text.encode("utf-8"))


plain_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**60), max_value=2**60),
        st.floats(allow_nan=False),
        st.text(max_size=20).filter(lambda t: not _CONTROL.search(t)),
        st.dates(),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=15,
)
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ufffe\uffff]")


@FUZZ
@given(plain_values, st.booleans())
def test_the_hardened_loader_reads_what_safe_load_reads(value: Any, flow: bool) -> None:
    text = yaml.safe_dump(
        {"v": value, "w": [value, {"<<": {"m": value}, "n": 1}]}, default_flow_style=flow
    )
    assert compose(text).data == yaml.safe_load(text)
