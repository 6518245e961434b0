"""The online input checker: params against a model's declared inputs (GET /models/{id})."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ApiPermanentError
from pipeline.inputs import ModelCache, check_manifest, value_problem
from pipeline.manifest import load_manifest
from pipeline.sandbox import catalog

FLUX = "model_bfl-flux-2-dev"


def describe(types: dict[str, str] | None = None) -> ModelCache:
    """Model descriptions as the sandbox (and Scenario) publish them."""
    types = types or {}
    calls: list[str] = []

    def fetch(model_id: str) -> dict[str, Any]:
        calls.append(model_id)
        if model_id == "model_missing":
            raise ApiPermanentError("GET /models/model_missing -> 404", status_code=404)
        return catalog.model_document(
            model_id, "2025-01-01T00:00:00Z", types.get(model_id, "custom")
        )

    cache = ModelCache(fetch)
    cache.calls = calls  # type: ignore[attr-defined]
    return cache


def manifest(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return load_manifest(path)


def test_a_misspelt_input_is_reported_at_its_line_with_a_did_you_mean(tmp_path: Path) -> None:
    m = manifest(
        tmp_path,
        f"name: t\nmodel: {FLUX}\nseed: 1\nparams:\n  heigth: 512\n"
        "items:\n  - id: a\n    prompt: p\n    params:\n      widht: 512\n"
        "  - id: b\n    prompt: q\n",
    )
    problems = check_manifest(m, describe(), shown="m.yaml")
    assert problems == [
        f"m.yaml:5: params.heigth: model {FLUX} has no input 'heigth' (did you mean 'height'?)",
        f"m.yaml:10: items[0].params.widht: model {FLUX} has no input 'widht' "
        "(did you mean 'width'?)",
    ]  # the manifest-level typo once, although both items send it


def test_types_ranges_and_allowed_values(tmp_path: Path) -> None:
    m = manifest(
        tmp_path,
        "name: t\nmodel: model_sandbox-sdxl-lora\nendpoint: txt2img\nseed: 1\n"
        "items:\n  - id: a\n    prompt: p\n    params:\n"
        "      numInferenceSteps: 500\n      guidance: fast\n"
        "      scheduler: EulerDiscreteSchedular\n      negativePrompt: 3\n",
    )
    problems = check_manifest(m, describe({"model_sandbox-sdxl-lora": "sd-xl-lora"}), "m.yaml")
    assert problems == [
        "m.yaml:9: items[0].params.numInferenceSteps: must be within [1, 150], got 500",
        "m.yaml:10: items[0].params.guidance: expected a number, got a string ('fast')",
        "m.yaml:11: items[0].params.scheduler: must be one of "
        + ", ".join(catalog.SCHEDULERS[:12])
        + ", ..., got 'EulerDiscreteSchedular' (did you mean 'EulerDiscreteScheduler'?)",
        "m.yaml:12: items[0].params.negativePrompt: expected a string, got int (3)",
    ]


def test_custom_endpoint_refused_by_a_model_type_names_the_endpoint(tmp_path: Path) -> None:
    text = "name: t\nmodel: model_k\nseed: 1\nitems:\n  - id: a\n    prompt: p\n"
    cases = {"sd-xl-lora": "txt2img", "flux.1-kontext-dev": "img2img", "flux.1.1-pro-ultra": None}
    for model_type, endpoint in cases.items():
        problems = check_manifest(manifest(tmp_path, text), describe({"model_k": model_type}), "m")
        if endpoint is None:
            assert not any("cannot run" in p for p in problems)
        else:
            assert problems[0].startswith(
                f"m:2: model: model model_k (type {model_type}) cannot run on /generate/custom; "
                f"set `endpoint: {endpoint}`"
            )


def test_required_inputs_count_what_the_pipeline_sets_itself(tmp_path: Path) -> None:
    upscale = catalog.UPSCALE
    ok = manifest(
        tmp_path,
        f"name: t\nmodel: {FLUX}\nseed: 1\nsteps:\n  - model: {upscale}\n"
        "    params: {upscaleFactor: 4}\nitems:\n  - id: a\n    prompt: p\n",
    )
    # prompt (item), seed, image (set on the step by the pipeline) are not missing
    assert check_manifest(ok, describe(), "m") == []
    required = {"name": "style", "type": "string", "required": {"always": True}}

    def fetch(model_id: str) -> dict[str, Any]:
        return {"type": "custom", "inputs": [*catalog.model_inputs(model_id), required]}

    problems = check_manifest(ok, ModelCache(fetch), "m")
    assert problems == [  # at the item (or step) that would send the request
        f"m:6: steps[0].params: model {catalog.UPSCALE} requires the input 'style'",
        f"m:8: items[0].params: model {FLUX} requires the input 'style'",
    ]


def test_unknown_models_are_named_and_descriptions_are_fetched_once(tmp_path: Path) -> None:
    items = "".join(f"  - id: i{n}\n    prompt: p\n" for n in range(5))
    cache = describe()
    m = manifest(tmp_path, f"name: t\nmodel: {FLUX}\nseed: 1\nitems:\n{items}")
    assert check_manifest(m, cache, "m") == []
    missing = manifest(tmp_path, f"name: t\nmodel: model_missing\nseed: 1\nitems:\n{items}")
    assert check_manifest(missing, cache, "m") == [
        "m:2: model: model model_missing not found (GET /models -> 404)"
    ]
    assert cache.calls == [FLUX, "model_missing"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("spec", "value", "problem"),
    [
        ({"type": "number", "step": 1}, 2.5, "expected an integer, got 2.5"),
        ({"type": "number"}, True, "expected a number, got a boolean (true)"),
        ({"type": "boolean"}, "yes", "expected true or false, got a string ('yes')"),
        ({"type": "file_array", "max": 1}, ["a", "b"], "at most 1 values, got 2"),
        ({"type": "number", "min": 0, "max": 1}, 0.5, None),
    ],
)
def test_value_problems(spec: dict[str, Any], value: Any, problem: str | None) -> None:
    assert value_problem(spec, value) == problem
