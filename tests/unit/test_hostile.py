"""The hostile corpus: manifests that are wrong the way people (or attackers) write them.

Every case runs `pipeline validate` (in-process through the real entry point; a few in a
subprocess) in an empty working folder and asserts what a user sees: exit code 2, exactly
the expected `file:line: field: message` lines (one per problem, each short), no
traceback, a bounded time and memory, and nothing written anywhere (the working folder,
HOME and TMPDIR are unchanged).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.limits import MAX_INPUT_BYTES, MAX_MANIFEST_BYTES

BASE = """\
name: m
model: model_bfl-flux-2-dev
seed: 1
items:
  - id: a
    prompt: p
"""
# Lines:   1 name, 2 model, 3 seed, 4 items, 5 id, 6 prompt

TOOL = """\
name: m
model: model_photoroom-background-removal
seed: 1
items:
  - id: a
    image: {image}
"""

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
MAX_LINE = 400  # no problem line may grow with the input
TIME_LIMIT = 20.0  # seconds; generous: a hang or a blow-up is what this catches
MEMORY_LIMIT = 64 * 1024 * 1024  # bytes traced (the 16 MiB size-cap case reads 16 MiB)

Expect = tuple[int | None, str, str]  # (line or None for any, field, message substring)


@dataclass
class Case:
    name: str
    text: str | bytes | None = None  # written to m.yaml; None when `setup` makes the input
    expect: list[Expect] = field(default_factory=list)
    setup: Callable[[Path], str] | None = None  # returns the path to validate
    env: dict[str, str] = field(default_factory=dict)


def sub(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def with_param(params: str, model: str = "model_bfl-flux-2-dev") -> str:
    return sub("seed: 1\n", f"seed: 1\nparams: {params}\n", sub("model_bfl-flux-2-dev", model))


def nest(depth: int) -> str:
    return "[" * depth + "]" * depth


def laughs(levels: int, width: int = 9) -> str:
    lines = ["lol0: &l0 " + "[" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def merge_laughs(levels: int) -> str:
    lines = ["m0: &m0 {a0: 1, b0: 2}"]
    for i in range(1, levels):
        refs = ", ".join([f"*m{i - 1}"] * 4)
        lines.append(f"m{i}: &m{i} {{<<: [{refs}], k{i}: 1, l{i}: [*m{i - 1}, *m{i - 1}]}}")
    return "\n".join(lines) + "\n"


def tool_with_image(make: Callable[[Path], str]) -> Callable[[Path], str]:
    def setup(folder: Path) -> str:
        (folder / "m.yaml").write_text(TOOL.format(image=make(folder)), encoding="utf-8")
        return "m.yaml"

    return setup


def fifo(folder: Path) -> str:
    os.mkfifo(folder / "pipe.png")
    return "pipe.png"


def sparse(size: int) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        with (folder / "huge.png").open("wb") as handle:
            handle.write(PNG)
            handle.truncate(size)
        return "huge.png"

    return make


def file_with(name: str, data: bytes) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        (folder / name).write_bytes(data)
        return name

    return make


def symlink_to(target: str) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        (folder / "link.png").symlink_to(target)
        return "link.png"

    return make


def manifest_at(path: str) -> Callable[[Path], str]:
    return lambda _folder: path


def manifest_fifo(folder: Path) -> str:
    os.mkfifo(folder / "m.yaml")
    return "m.yaml"


def manifest_dir(folder: Path) -> str:
    (folder / "m.yaml").mkdir()
    return "m.yaml"


def oversized(folder: Path) -> str:
    with (folder / "m.yaml").open("wb") as handle:
        handle.write(BASE.encode())
        handle.write(b"# " + b"x" * (MAX_MANIFEST_BYTES + 10) + b"\n")
    return "m.yaml"


LONG_ID = "a" * 300
S3 = {"PIPELINE_STORAGE_URL": "s3://bucket"}

CASES = [
    # -- characters and encodings --------------------------------------------------------
    Case("control-char", sub("prompt: p", "prompt: p\x01q"), [(6, "<yaml>", "U+0001")]),
    Case("nul-byte", sub("prompt: p", "prompt: p\x00"), [(6, "<yaml>", "U+0000")]),
    Case("escape-char", sub("name: m", "name: m\x1b[31m"), [(1, "<yaml>", "U+001B")]),
    Case("del-char", sub("seed: 1", "seed: 1\x7f"), [(3, "<yaml>", "U+007F")]),
    Case("nel-char", sub("prompt: p", "prompt: p\x85q"), [(6, "<yaml>", "U+0085")]),
    Case("line-separator", sub("prompt: p", "prompt: p\u2028q"), [(6, "<yaml>", "U+2028")]),
    Case(
        "control-on-two-lines",
        sub("name: m", "name: m\x02").replace("prompt: p", "prompt: \x03"),
        [(1, "<yaml>", "U+0002")],
    ),
    Case(
        "invalid-utf8",
        BASE.encode() + b"  - id: b\n    prompt: \xff\xfe\n",
        [(8, "<file>", "UTF-8")],
    ),
    Case("utf16", BASE.encode("utf-16"), [(1, "<file>", "not UTF-8")]),
    Case("empty-file", "", [(1, "<manifest>", "an empty file")]),
    Case("only-comment", "# nothing here\n", [(1, "<manifest>", "an empty file")]),
    Case("top-level-list", "- a\n- b\n", [(1, "<manifest>", "got a list")]),
    Case("top-level-scalar", "hello\n", [(1, "<manifest>", "got a string")]),
    # -- YAML structure tricks -------------------------------------------------------------
    Case(
        "deep-flow-lists",
        sub("seed: 1", "seed: 1\nx: " + nest(300)),
        [(4, "<yaml>", "deeper than 64")],
    ),
    Case("deep-unclosed", "x: " + "[" * 200_000, [(1, "<yaml>", "deeper than 64")]),
    Case(
        "deep-flow-maps",
        sub("seed: 1", "seed: 1\nx: " + "{a: " * 100 + "1" + "}" * 100),
        [(4, "<yaml>", "deeper than 64")],
    ),
    Case(
        "deep-block-maps",
        BASE + "".join("  " * i + f"k{i}:\n" for i in range(70)) + "  " * 70 + "v: 1\n",
        [(71, "<yaml>", "deeper than 64")],
    ),
    Case("billion-laughs", laughs(9) + BASE, [(None, "<yaml>", "alias bomb")]),
    Case("merge-key-bomb", merge_laughs(14) + BASE, [(None, "<yaml>", "alias bomb")]),
    Case(
        "recursive-alias",
        sub("seed: 1", "seed: 1\nx: &r [a, *r]"),
        [(4, "<yaml>", "recursive alias")],
    ),
    Case("undefined-alias", sub("seed: 1", "seed: *nowhere"), [(3, "<yaml>", "")]),
    Case("two-documents", BASE + "---\nname: other\n", [(7, "<yaml>", "one YAML document")]),
    Case(
        "python-object-tag",
        sub("prompt: p", 'prompt: !!python/object/apply:os.system ["touch pwned"]'),
        [(6, "<yaml>", "unsupported YAML tag")],
    ),
    Case(
        "local-tag",
        sub("prompt: p", "prompt: !shell rm -rf /"),
        [(6, "<yaml>", "unsupported YAML tag")],
    ),
    Case(
        "set-tag",
        sub("seed: 1", "seed: 1\nparams: !!set {a, b}"),
        [(4, "<yaml>", "unsupported YAML tag")],
    ),
    Case(
        "omap-tag",
        sub("seed: 1", "seed: 1\nparams: !!omap [a: 1]"),
        [(4, "<yaml>", "unsupported YAML tag")],
    ),
    Case("bad-binary", sub("prompt: p", "prompt: !!binary abcde"), [(6, "<yaml>", "base64")]),
    Case("empty-int-tag", sub("seed: 1", 'seed: !!int ""'), [(3, "<yaml>", "invalid int")]),
    Case("bad-date", sub("seed: 1", "seed: 2024-13-45"), [(3, "<yaml>", "invalid timestamp")]),
    Case("merge-as-value", sub("prompt: p", "prompt: <<"), [(6, "<yaml>", "merge key")]),
    Case(
        "merge-a-scalar", sub("seed: 1", "seed: 1\nparams: {<<: 5}"), [(4, "<yaml>", "merges only")]
    ),
    Case("integer-key", sub("seed: 1", "seed: 1\n1: x"), [(4, "1", "keys must be strings")]),
    Case("null-key", sub("seed: 1", "seed: 1\n~: x"), [(4, "None", "keys must be strings")]),
    Case(
        "list-key", sub("seed: 1", "seed: 1\n? [a, b]\n: c"), [(4, "<key>", "keys must be strings")]
    ),
    Case(
        "key-with-newline",
        sub("seed: 1", 'seed: 1\n"evil\\nkey": 1'),
        [(4, "evil\\nkey", "unknown")],
    ),
    Case("duplicate-key", sub("seed: 1", "seed: 1\nseed: 2"), [(4, "seed", "duplicate key")]),
    Case("tab-indent", sub("    prompt: p", "\tprompt: p"), [(6, "<yaml>", "")]),
    Case("unterminated-quote", sub("prompt: p", 'prompt: "p'), [(None, "<yaml>", "")]),
    Case("long-plain-key", sub("seed: 1", "seed: 1\n" + "k" * 2000 + ": 1"), [(4, "<yaml>", "")]),
    Case("oversized-file", expect=[(1, "<file>", "larger than 16 MiB")], setup=oversized),
    # -- numbers -----------------------------------------------------------------------------
    Case("huge-seed", sub("seed: 1", "seed: " + "9" * 5000), [(3, "<yaml>", "integer too long")]),
    Case(
        "huge-param", with_param("{width: " + "1" * 4400 + "}"), [(4, "<yaml>", "integer too long")]
    ),
    Case(
        "huge-float",
        with_param("{guidance: 1." + "5" * 5000 + "}"),
        [(4, "<yaml>", "number too long")],
    ),
    Case("huge-hex", sub("seed: 1", "seed: 0x" + "f" * 3000), [(3, "<yaml>", "integer too long")]),
    Case(
        "huge-sexagesimal",
        sub("seed: 1", "seed: " + ":".join(["59"] * 500)),
        [(3, "<yaml>", "too long")],
    ),
    Case("seed-too-big", sub("seed: 1", "seed: 9007199254740993"), [(3, "seed", "between 0 and")]),
    Case("seed-negative", sub("seed: 1", "seed: -1"), [(3, "seed", "between 0 and")]),
    Case(
        "param-int-beyond-json",
        with_param("{width: 36893488147419103232}"),
        [(4, "params.width", "too large")],
    ),
    Case("param-infinity", with_param("{guidance: .inf}"), [(4, "params.guidance", "finite")]),
    Case("param-nan", with_param("{guidance: .nan}"), [(4, "params.guidance", "finite")]),
    # -- types -----------------------------------------------------------------------------
    Case(
        "model-is-list",
        sub("model: model_bfl-flux-2-dev", "model: [a, b]"),
        [(2, "model", "got a list")],
    ),
    Case(
        "model-is-map",
        sub("model: model_bfl-flux-2-dev", "model: {a: b}"),
        [(2, "model", "got a mapping")],
    ),
    Case("model-is-null", sub("model: model_bfl-flux-2-dev", "model:"), [(2, "model", "got null")]),
    Case("name-is-list", sub("name: m", "name: [m]"), [(1, "name", "got a list")]),
    Case("seed-is-string", sub("seed: 1", 'seed: "1"'), [(3, "seed", "expected an integer")]),
    Case("seed-is-bool", sub("seed: 1", "seed: yes"), [(3, "seed", "expected an integer")]),
    Case("seed-is-float", sub("seed: 1", "seed: 1.5"), [(3, "seed", "expected an integer")]),
    Case(
        "items-is-map",
        sub("items:\n  - id: a\n    prompt: p", "items: {id: a}"),
        [(4, "items", "a list")],
    ),
    Case(
        "items-empty",
        sub("items:\n  - id: a\n    prompt: p", "items: []"),
        [(4, "items", "at least one")],
    ),
    Case(
        "item-is-string",
        sub("  - id: a\n    prompt: p", "  - just text"),
        [(5, "items[0]", "a mapping")],
    ),
    Case(
        "prompt-is-list", sub("prompt: p", "prompt: [p, q]"), [(6, "items[0].prompt", "got a list")]
    ),
    Case(
        "prompt-is-map",
        sub("prompt: p", "prompt: {p: q}"),
        [(6, "items[0].prompt", "got a mapping")],
    ),
    Case("id-is-list", sub("id: a", "id: [a]"), [(5, "items[0].id", "got a list")]),
    Case("id-not-slug", sub("id: a", "id: ../../etc"), [(5, "items[0].id", "slug")]),
    Case(
        "tags-is-string",
        sub("prompt: p", "prompt: p\n    tags: weapon"),
        [(7, "items[0].tags", "a list")],
    ),
    Case("params-is-list", with_param("[1, 2]"), [(4, "params", "a mapping")]),
    Case(
        "param-is-date",
        with_param("{released: 2024-01-01}"),
        [(4, "params.released", "JSON value")],
    ),
    Case(
        "param-reserved", with_param("{prompt: x}"), [(4, "params.prompt", "set by the pipeline")]
    ),
    Case(
        "num-outputs-huge",
        with_param("{numOutputs: 1000000000}"),
        [(4, "params.numOutputs", "between 1 and 8")],
    ),
    Case(
        "num-outputs-string",
        with_param('{numOutputs: "4"}'),
        [(4, "params.numOutputs", "an integer")],
    ),
    Case(
        "unknown-field-huge",
        sub("seed: 1", "seed: 1\n" + "x" * 1000 + ": 1"),
        [(4, "x" * 10, "unknown field")],
    ),
    Case(
        "long-model-id",
        sub("model_bfl-flux-2-dev", "model/" + "x" * 100_000),
        [(2, "model", "not a model id")],
    ),
    # -- tool parameters that multiply ------------------------------------------------------
    Case(
        "slicer-billions",
        with_param("{xSubdivisions: 100000, ySubdivisions: 100000}", "model_scenario-image-slicer"),
        [
            (4, "params.xSubdivisions", "between 1 and 6"),
            (4, "params.ySubdivisions", "between 1 and 6"),
            (6, "items[0].image", "needs an input image"),
        ],
    ),
    Case(
        "slicer-zero",
        with_param("{xSubdivisions: 0}", "model_scenario-image-slicer"),
        [(4, "params.xSubdivisions", "between 1 and 6"), (6, "items[0].image", "needs an input")],
    ),
    Case(
        "slicer-string",
        with_param('{ySubdivisions: "3"}', "model_scenario-image-slicer"),
        [(4, "params.ySubdivisions", "an integer"), (6, "items[0].image", "needs an input")],
    ),
    Case(
        "upscale-odd-factor",
        with_param("{upscaleFactor: 3}", "model_upscale-v3"),
        [
            (4, "params.upscaleFactor", "one of 2, 4, 8, 16"),
            (6, "items[0].image", "needs an input"),
        ],
    ),
    Case(
        "upscale-huge-factor",
        with_param("{upscaleFactor: 1e300}", "model_upscale-v3"),
        [
            (4, "params.upscaleFactor", "one of 2, 4, 8, 16"),
            (6, "items[0].image", "needs an input"),
        ],
    ),
    # -- output templates and storage keys ---------------------------------------------------
    Case(
        "template-absolute",
        sub("seed: 1", 'seed: 1\noutput: "/etc/{item}.png"'),
        [(4, "output", "relative")],
    ),
    Case(
        "template-dotdot",
        sub("seed: 1", 'seed: 1\noutput: "../{item}.png"'),
        [(4, "output", "'..'")],
    ),
    Case(
        "template-backslash",
        sub("seed: 1", 'seed: 1\noutput: "a\\\\{item}.png"'),
        [(4, "output", "backslash")],
    ),
    Case(
        "template-attribute",
        sub("seed: 1", 'seed: 1\noutput: "{item}/{item.__class__}"'),
        [(4, "output", "unknown placeholder")],
    ),
    Case(
        "template-index",
        sub("seed: 1", 'seed: 1\noutput: "{item}/{item[0]}"'),
        [(4, "output", "unknown placeholder")],
    ),
    Case(
        "template-width",
        sub("seed: 1", 'seed: 1\noutput: "{item:>99999}"'),
        [(4, "output", "not allowed")],
    ),
    Case(
        "template-conversion",
        sub("seed: 1", 'seed: 1\noutput: "{item!r}"'),
        [(4, "output", "conversion")],
    ),
    Case(
        "template-unbalanced",
        sub("seed: 1", 'seed: 1\noutput: "{item"'),
        [(4, "output", "malformed")],
    ),
    Case(
        "template-reserved-meta",
        sub("seed: 1", 'seed: 1\noutput: ".meta/{item}.png"'),
        [(6, "output", "reserved")],
    ),
    Case(
        "template-reserved-staging",
        sub("seed: 1", 'seed: 1\noutput: ".staging/{item}"'),
        [(6, "output", "reserved")],
    ),
    Case("segment-too-long", sub("id: a", f"id: {LONG_ID}"), [(5, "output", "255 bytes")]),
    Case(
        "s3-key-too-long",
        sub("seed: 1", 'seed: 1\noutput: "{item}/{item}/{item}/{item}/{item}.png"').replace(
            "id: a", f"id: {'b' * 240}"
        ),
        [(6, "output", "1024 bytes")],
        env=S3,
    ),
    Case(
        "s3-prefix-makes-key-too-long",
        sub("id: a", f"id: {'c' * 200}"),
        [(5, "output", "S3's 1024 bytes")],
        env={"PIPELINE_STORAGE_URL": "s3://bucket/" + "p" * 900},
    ),
    # -- input files and special files -------------------------------------------------------
    Case(
        "image-dev-zero",
        TOOL.format(image="/dev/zero"),
        [(6, "items[0].image", "not a regular file")],
    ),
    Case(
        "image-dev-urandom",
        TOOL.format(image="/dev/urandom"),
        [(6, "items[0].image", "not a regular file")],
    ),
    Case(
        "image-fifo",
        expect=[(6, "items[0].image", "not a regular file")],
        setup=tool_with_image(fifo),
    ),
    Case(
        "image-symlink-to-device",
        expect=[(6, "items[0].image", "not a regular file")],
        setup=tool_with_image(symlink_to("/dev/zero")),
    ),
    Case("image-directory", TOOL.format(image="."), [(6, "items[0].image", "directory")]),
    Case(
        "image-too-large",
        expect=[(6, "items[0].image", "larger than 50 MB")],
        setup=tool_with_image(sparse(MAX_INPUT_BYTES + 1)),
    ),
    Case(
        "image-empty",
        expect=[(6, "items[0].image", "empty")],
        setup=tool_with_image(file_with("e.png", b"")),
    ),
    Case(
        "image-is-text",
        expect=[(6, "items[0].image", "not a PNG")],
        setup=tool_with_image(file_with("t.png", b"<svg onload=alert(1)>")),
    ),
    Case("image-missing", TOOL.format(image="nope.png"), [(6, "items[0].image", "not found")]),
    Case(
        "image-path-traversal",
        TOOL.format(image="../../../../../../etc/hostname"),
        [(6, "items[0].image", "")],
    ),
    Case(
        "manifest-dev-zero",
        expect=[(1, "<file>", "not a regular file")],
        setup=manifest_at("/dev/zero"),
    ),
    Case(
        "manifest-dev-urandom",
        expect=[(1, "<file>", "not a regular file")],
        setup=manifest_at("/dev/urandom"),
    ),
    Case("manifest-fifo", expect=[(1, "<file>", "not a regular file")], setup=manifest_fifo),
    Case("manifest-directory", expect=[(1, "<file>", "directory")], setup=manifest_dir),
    Case(
        "manifest-missing", expect=[(1, "<file>", "No such file")], setup=manifest_at("absent.yaml")
    ),
]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under folder with its size and mtime (symlinks not followed)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            info = path.lstat()
            found[str(path.relative_to(folder))] = (info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture
def sandboxed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder, with HOME and TMPDIR pointing at empty folders of their own."""
    work, home, temp = tmp_path / "work", tmp_path / "home", tmp_path / "tmp"
    for folder in (work, home, temp):
        folder.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    for name in ("PIPELINE_STORAGE_URL", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    return work


def run_validate(target: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`pipeline validate target` through the console-script entry point, in this process."""
    argv = sys.argv
    sys.argv = ["pipeline", "validate", target]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def check_lines(target: str, stderr: str, expect: list[Expect]) -> None:
    lines = stderr.splitlines()
    assert "Traceback" not in stderr
    assert len(lines) == len(expect), stderr[:2000]
    for line, (number, fld, text) in zip(lines, expect, strict=True):
        assert len(line) <= MAX_LINE, line[:200]
        match = re.fullmatch(r"(.+?):(\d+): (\S+): (.+)", line)
        assert match, line
        assert match.group(1) == target
        if number is not None:
            assert int(match.group(2)) == number, line
        assert match.group(3).startswith(fld[:60]), line
        assert text in match.group(4), line


def test_the_corpus_is_big_enough() -> None:
    assert len(CASES) >= 60
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_manifest_is_refused_with_one_line_per_problem(
    case: Case,
    sandboxed: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    if case.setup is not None:
        target = case.setup(sandboxed)
    else:
        target = "m.yaml"
        data = case.text.encode("utf-8") if isinstance(case.text, str) else case.text
        (sandboxed / target).write_bytes(data or b"")
    outside = sandboxed.parent
    before = {folder: snapshot(outside / folder) for folder in ("work", "home", "tmp")}

    tracemalloc.start()
    started = time.monotonic()
    try:
        code, stdout, stderr = run_validate(target, capsys)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert code == 2, stderr[:2000]
    assert stdout == ""
    check_lines(target, stderr, case.expect)
    assert elapsed < TIME_LIMIT
    assert peak < MEMORY_LIMIT + (MAX_MANIFEST_BYTES if case.name == "oversized-file" else 0)
    assert {folder: snapshot(outside / folder) for folder in before} == before


SUBPROCESS_CASES = [
    "billion-laughs",
    "deep-unclosed",
    "huge-seed",
    "image-dev-zero",
    "model-is-list",
]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_the_real_command_exits_2_with_one_line(name: str, sandboxed: Path) -> None:
    case = next(c for c in CASES if c.name == name)
    assert isinstance(case.text, str)
    (sandboxed / "m.yaml").write_text(case.text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "SCENARIO_"))}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", "m.yaml"],
        cwd=sandboxed,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    check_lines("m.yaml", done.stderr, case.expect)
    assert sorted(p.name for p in sandboxed.iterdir()) == ["m.yaml"]
