"""The manifest loader: every problem as `file:line: field: message`, and item expansion."""

from __future__ import annotations

import hashlib
import io
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from pipeline.errors import ManifestError
from pipeline.manifest import Manifest, load_manifest, validate_files

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"


def png(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


VALID = textwrap.dedent(
    """
    name: forest-icons
    model: model_bfl-flux-2-dev
    seed: 42
    params:
      width: 256
      numOutputs: 2
    items:
      - id: iron-sword
        prompt: iron sword icon
      - id: healing-potion
        prompt: healing potion icon
        seed: 7
    """
).lstrip()


# -- the example manifests ---------------------------------------------------------


def test_example_manifest_is_valid() -> None:
    manifest = load_manifest(MANIFESTS / "example.yaml")
    assert [i.id for i in manifest.items] == ["iron-sword", "healing-potion", "shield-winter"]
    potion, shield = manifest.item("healing-potion"), manifest.item("shield-winter")
    assert (potion.seed, potion.num_outputs) == (7, 4)
    assert shield.image is not None and shield.image.mime_type == "image/png"
    assert shield.image.path == (MANIFESTS / "refs" / "shield.png").resolve()
    assert shield.image.size < 20_000
    assert shield.params["strength"] == 0.6 and shield.params["numOutputs"] == 2


def test_icons_manifest_is_a_valid_realistic_set() -> None:
    manifest = load_manifest(MANIFESTS / "icons.yaml")
    assert 20 <= len(manifest.items) <= 40
    assert manifest.trained_model is not None
    assert {(i.params["width"], i.params["height"]) for i in manifest.items} == {(512, 512)}
    assert len({i.item_key for i in manifest.items}) == len(manifest.items)
    keys = {manifest.output_key(i, n) for i in manifest.items for n in range(i.num_outputs)}
    assert len(keys) == sum(i.num_outputs for i in manifest.items)


def test_validate_files_accepts_the_examples() -> None:
    assert validate_files([MANIFESTS / "example.yaml", MANIFESTS / "icons.yaml"]) == []


# -- expansion -----------------------------------------------------------------------


def test_load_expands_items_with_merged_params_and_seed(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    manifest = load_manifest(path)
    sword, potion = manifest.items
    assert (sword.seed, potion.seed) == (42, 7)
    assert sword.params == {"width": 256, "numOutputs": 2}
    assert sword.num_outputs == 2
    assert (sword.line, potion.line) == (8, 10)
    assert manifest.path == path.resolve()
    assert manifest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest.text == path.read_text()
    assert manifest.output == "{manifest}/{item}/{index}.{ext}"


def test_item_params_merge_over_manifest_params_and_null_removes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        name: m
        model: model_x
        seed: 1
        params: {width: 512, height: 512, guidance: 3.5}
        output: "{item}.{ext}"
        items:
          - id: a
            prompt: p
            params: {width: 1024, guidance: null, style: flat}
        """,
    )
    assert load_manifest(path).items[0].params == {"width": 1024, "height": 512, "style": "flat"}


def test_request_body_with_trained_model_and_asset_ids(tmp_path: Path) -> None:
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "shield.png").write_bytes(png((1, 2, 3)))
    (tmp_path / "refs" / "style.png").write_bytes(png((4, 5, 6)))
    path = write(
        tmp_path,
        """
        name: m
        model: model_bfl-flux-2-dev
        trained_model: model_abc123
        seed: 42
        params: {numOutputs: 2, width: 512}
        items:
          - id: shield
            prompt: "  wooden shield  "
            image: refs/shield.png
            reference_images: [refs/style.png, refs/shield.png]
            params: {strength: 0.6}
        """,
    )
    manifest = load_manifest(path)
    item = manifest.items[0]
    assert item.image is not None
    style = item.reference_images[0]
    ids = {item.image.sha256: "asset_shield", style.sha256: "asset_style"}
    assert item.request_body(manifest, ids) == {
        "numOutputs": 2,
        "width": 512,
        "strength": 0.6,
        "prompt": "wooden shield",
        "seed": 42,
        "modelId": "model_abc123",
        "image": "asset_shield",
        "referenceImages": ["asset_style", "asset_shield"],
    }
    assert style.sha256 == hashlib.sha256(png((4, 5, 6))).hexdigest()
    # The body is a copy: changing it must not change the item.
    item.request_body(manifest, ids)["numOutputs"] = 9
    assert item.params["numOutputs"] == 2
    with pytest.raises(KeyError, match=r"style\.png"):
        item.request_body(manifest, {item.image.sha256: "asset_shield"})


def test_request_body_without_trained_model_has_no_model_id(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, VALID))
    body = manifest.items[1].request_body(manifest, {})
    assert body == {"width": 256, "numOutputs": 2, "prompt": "healing potion icon", "seed": 7}


def test_output_key_renders_the_template(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, VALID))
    assert manifest.output_key(manifest.items[0], 1) == "forest-icons/iron-sword/1.png"
    assert manifest.output_key(manifest.items[0], 0, "webp") == "forest-icons/iron-sword/0.webp"
    with pytest.raises(KeyError, match="nope"):
        manifest.item("nope")


def test_tool_model_items_need_an_image_not_a_prompt(tmp_path: Path) -> None:
    (tmp_path / "sheet.png").write_bytes(png())
    path = write(
        tmp_path,
        """
        name: slices
        model: model_scenario-image-slicer
        seed: 1
        params: {xSubdivisions: 3, ySubdivisions: 2}
        items:
          - id: sheet
            image: sheet.png
          - id: forgot
        """,
    )
    assert problems(path) == [
        f"{path}:8: items[1].image: required field is missing: "
        "model_scenario-image-slicer needs an input image"
    ]
    path.write_text(path.read_text().replace("  - id: forgot\n", ""))
    [item] = load_manifest(path).items
    assert (item.prompt, item.num_outputs) == (None, 6)


# -- item keys ----------------------------------------------------------------------


def keys_of(path: Path) -> dict[str, str]:
    return {item.prompt or "": item.item_key for item in load_manifest(path).items}


def test_item_key_ignores_ids_order_names_templates_and_yaml_formatting(tmp_path: Path) -> None:
    original = keys_of(write(tmp_path, VALID, "a.yaml"))
    reformatted = write(
        tmp_path,
        """
        # the same requests, written differently
        name: another-name
        output: "{item_key}/{index:03d}.{ext}"
        seed: 42
        model: "model_bfl-flux-2-dev"
        params: {numOutputs: 2, width: 256.0}
        items:
          - {id: potion-renamed, seed: 7, prompt: "healing potion icon"}
          - id: sword-renamed
            prompt: >
              iron sword icon
        """,
        "b.yaml",
    )
    assert keys_of(reformatted) == original


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("seed: 42", "seed: 43"),
        ("model: model_bfl-flux-2-dev", "model: model_other"),
        ("seed: 42", "seed: 42\ntrained_model: model_style"),
        ("width: 256", "width: 257"),
        ("iron sword icon", "iron sword icon, rusty"),
    ],
)
def test_item_key_changes_with_what_decides_the_output(tmp_path: Path, old: str, new: str) -> None:
    path = write(tmp_path, VALID)
    before = load_manifest(path).items[0].item_key
    path.write_text(path.read_text().replace(old, new, 1))
    assert load_manifest(path).items[0].item_key != before


def test_item_key_changes_with_the_bytes_of_a_reference_image(tmp_path: Path) -> None:
    ref = tmp_path / "ref.png"
    ref.write_bytes(png((10, 10, 10)))
    path = write(tmp_path, VALID + "    reference_images: [ref.png]\n")
    before = load_manifest(path).items[1].item_key
    ref.write_bytes(png((10, 10, 11)))
    assert load_manifest(path).items[1].item_key != before


# -- problems, with exact lines ----------------------------------------------------


def test_unknown_keys_at_top_level_and_in_an_item(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        name: m
        model: model_x
        seed: 1
        colour: red
        items:
          - id: a
            promt: p
        """,
    )
    assert problems(path) == [
        f"{path}:4: colour: unknown field; allowed: version, name, description, model, "
        "endpoint, trained_model, seed, params, steps, output, overwrite, budget, items",
        f"{path}:6: items[0].prompt: required field is missing",
        f"{path}:7: items[0].promt: unknown field (did you mean 'prompt'?)",
    ]


def test_model_inputs_at_top_level_point_to_params(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("seed: 42\n", "seed: 42\nwidth: 5\n"))
    assert problems(path) == [f"{path}:4: width: unknown field (model inputs go under 'params')"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('seed: "42"', "seed: expected an integer, got a string ('42')"),
        ("seed: 4.5", "seed: expected an integer, got a number (4.5)"),
        ("seed: true", "seed: expected an integer, got a boolean (true)"),
        ("seed: -1", "seed: must be between 0 and 9007199254740991, got -1"),
        ("seed: [1]", "seed: expected an integer, got a list"),
    ],
)
def test_wrong_types_are_errors(tmp_path: Path, line: str, expected: str) -> None:
    path = write(tmp_path, VALID.replace("seed: 42", line))
    assert problems(path) == [f"{path}:3: {expected}"]


def test_wrong_types_in_items_and_params(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        name: m
        model: model_x
        seed: 1
        params: []
        items:
          - id: 7
            prompt: 12
          - just-a-string
        """,
    )
    assert problems(path) == [
        f"{path}:4: params: expected a mapping, got a list",
        f"{path}:6: items[0].id: expected a string, got an integer (7)",
        f"{path}:7: items[0].prompt: expected a string, got an integer (12)",
        f"{path}:8: items[1]: expected a mapping, got a string ('just-a-string')",
    ]


def test_duplicate_item_id_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "  - id: iron-sword\n    prompt: again\n")
    assert problems(path) == [
        f"{path}:13: items[2].id: duplicate item id 'iron-sword' (first defined at line 8)"
    ]


def test_missing_required_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "name: m\nitems:\n  - id: a\n")
    assert problems(path) == [
        f"{path}:1: model: required field is missing",
        f"{path}:1: seed: required field is missing",
    ]


def test_empty_items_and_bad_slugs(tmp_path: Path) -> None:
    path = write(tmp_path, "name: Forest_Icons\nmodel: model_x\nseed: 1\nitems: []\n")
    slug = "must be a slug: lowercase letters, digits and single dashes"
    assert problems(path) == [
        f"{path}:1: name: {slug}",
        f"{path}:4: items: must list at least one item",
    ]
    path = write(tmp_path, VALID.replace("id: iron-sword", "id: Iron Sword"))
    assert problems(path) == [f"{path}:8: items[0].id: {slug}"]


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (
            '"{manifest}/{item}/{index}-{name}.png"',
            "unknown placeholder {name}; use {manifest}, {item}, "
            "{index}, {seed}, {item_key}, {ext}, {step}",
        ),
        (
            '"/{manifest}/{item}/{index}.png"',
            "must be a relative key, not an absolute path (drop the leading '/')",
        ),
        ('"{manifest}/../{item}/{index}.png"', "must not contain '.' or '..' path segments"),
        (
            '"{manifest}/{item}.png"',
            "must contain {index}: an item makes up to 2 outputs "
            "and they would overwrite each other",
        ),
        (
            '"{manifest}/{index}.png"',
            "must contain {item} or {item_key}, or all items write to the same keys",
        ),
    ],
)
def test_bad_key_templates(tmp_path: Path, output: str, message: str) -> None:
    path = write(tmp_path, VALID.replace("seed: 42\n", f"seed: 42\noutput: {output}\n"))
    assert problems(path) == [f"{path}:4: output: {message}"]


def test_template_without_index_needed_only_when_an_item_makes_several(tmp_path: Path) -> None:
    text = VALID.replace("numOutputs: 2", "numOutputs: 1").replace(
        "seed: 42\n", 'seed: 42\noutput: "{manifest}/{item}.{ext}"\n'
    )
    assert load_manifest(write(tmp_path, text)).items[0].num_outputs == 1
    path = write(tmp_path, text + "    params: {numOutputs: 3}\n")
    assert "an item makes up to 3 outputs" in problems(path)[0]


def test_rendered_keys_that_collide_are_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        name: m
        model: model_x
        seed: 2
        output: "{item}{seed}.png"
        items:
          - {id: a, prompt: p, seed: 12}
          - {id: a1, prompt: q}
        """,
    )
    assert problems(path) == [f"{path}:4: output: items 'a' and 'a1' both write to 'a12.png'"]


def test_missing_input_files_are_reported_at_their_line(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "notes.txt").write_text("not an image")
    path = write(
        tmp_path,
        VALID
        + "    image: nope.png\n"
        + "    reference_images:\n"
        + "      - ok.png\n"
        + "      - refs/missing.png\n"
        + "      - notes.txt\n",
    )
    assert problems(path) == [
        f"{path}:13: items[1].image: nope.png: file not found",
        f"{path}:16: items[1].reference_images[1]: refs/missing.png: file not found",
        f"{path}:17: items[1].reference_images[2]: notes.txt: not a PNG, JPEG or WebP image",
    ]


def test_params_owned_by_the_pipeline_are_rejected(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        VALID.replace("  width: 256", "  width: 256\n  seed: 3\n  modelId: model_y")
        + "    params: {prompt: hi, referenceImages: [], numOutputs: 9}\n",
    )
    assert problems(path) == [
        f"{path}:6: params.seed: 'seed' is set by the pipeline; use the `seed` field",
        f"{path}:7: params.modelId: 'modelId' is set by the pipeline; "
        "use the `trained_model` field",
        f"{path}:15: items[1].params.numOutputs: must be between 1 and 8, got 9",
        f"{path}:15: items[1].params.prompt: 'prompt' is set by the pipeline; "
        "use the `prompt` field",
        f"{path}:15: items[1].params.referenceImages: 'referenceImages' is set by the pipeline; "
        "use the `reference_images` field",
    ]


def test_param_values_must_be_json(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("  width: 256", "  width: 256\n  released: 2024-01-01"))
    assert problems(path) == [
        f"{path}:6: params.released: is not a JSON value (a date); quote it if it is text"
    ]


def test_yaml_syntax_error_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: m\nitems:\n  - id: a\n   prompt: b\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:4: <yaml>: ")


def test_duplicate_yaml_keys_are_errors(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("seed: 7", "seed: 7\n    seed: 8"))
    assert problems(path) == [f"{path}:13: items[1].seed: duplicate key (first given at line 12)"]


def test_empty_file_and_non_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert problems(path) == [
        f"{path}:1: <manifest>: expected a mapping of fields, got an empty file"
    ]
    path = write(tmp_path, "- a\n- b\n")
    assert problems(path) == [f"{path}:1: <manifest>: expected a mapping of fields, got a list"]


def test_missing_file_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert problems(path) == [f"{path}:1: <file>: cannot read: No such file or directory"]


def test_unsupported_version(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 2\n" + textwrap.dedent(VALID).lstrip())
    assert problems(path) == [f"{path}:1: version: unsupported version 2; this pipeline reads 1"]
    path = write(tmp_path, "version: 1\n" + textwrap.dedent(VALID).lstrip())
    assert load_manifest(path).name == "forest-icons"


def test_every_problem_is_reported_sorted_by_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        name: Bad Name
        model: model_x
        seed: "1"
        output: "/{item}/{nope}"
        items:
          - id: a
            prompt: p
            extra: 1
          - id: a
            seed: x
        """,
    )
    found = problems(path)
    assert len(found) == 8, found
    lines = [int(p.split(":")[1]) for p in found]
    assert lines == sorted(lines) and set(lines) == {1, 3, 4, 8, 9, 10}


def test_anchors_and_merge_keys_are_supported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        name: m
        model: model_x
        seed: 1
        output: "{item}/{index}.png"
        items:
          - id: a
            prompt: p
            params: &big {width: 1024, height: 1024}
          - id: b
            prompt: q
            params: {<<: *big, height: 512}
        """,
    )
    a, b = load_manifest(path).items
    assert (a.params, b.params) == ({"width": 1024, "height": 1024}, {"width": 1024, "height": 512})


def test_validate_files_collects_all_files_and_duplicate_names(tmp_path: Path) -> None:
    first = write(tmp_path, VALID, "first.yaml")
    second = write(tmp_path, VALID, "second.yaml")
    broken = write(tmp_path, VALID.replace("seed: 42", "seed: x"), "broken.yaml")
    assert validate_files([first, broken, second, first]) == [
        f"{broken}:3: seed: expected an integer, got a string ('x')",
        f"{second}:1: name: manifest name 'forest-icons' is also used by {first}",
    ]


def test_manifest_is_immutable(tmp_path: Path) -> None:
    manifest: Manifest = load_manifest(write(tmp_path, VALID))
    with pytest.raises(AttributeError):
        manifest.seed = 1  # type: ignore[misc]
    assert len({manifest, *manifest.items, *load_manifest(manifest.path).items}) == 3


def test_template_is_checked_even_without_items(tmp_path: Path) -> None:
    path = write(tmp_path, 'name: m\nmodel: model_x\nseed: 1\noutput: "{nope}"\n')
    assert problems(path) == [
        f"{path}:1: items: required field is missing",
        f"{path}:4: output: unknown placeholder {{nope}}; use {{manifest}}, {{item}}, {{index}}, "
        "{seed}, {item_key}, {ext}, {step}",
        f"{path}:4: output: must contain {{item}} or {{item_key}}, "
        "or all items write to the same keys",
    ]


def test_budget_is_a_positive_number_of_creative_units(tmp_path: Path) -> None:
    base = "name: m\nmodel: model_x\nseed: 1\nbudget: {}\nitems:\n  - id: a\n    prompt: p\n"
    assert load_manifest(write(tmp_path, base.format("12.5"))).budget == 12.5
    for value, message in (
        ("0", "must be a positive number of creative units, got 0"),
        ("-3", "must be a positive number of creative units, got -3"),
        ('"40"', "expected a number, got a string ('40')"),
    ):
        path = write(tmp_path, base.format(value))
        assert problems(path) == [f"{path}:4: budget: {message}"]
