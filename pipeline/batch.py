"""Several manifests in one command: `pipeline run FILE|DIR...` and the nightly schedule.

    manifest_paths(args)        the files named, a folder standing for its *.yaml/*.yml
    load_manifests(paths)       every manifest, or one ManifestError listing every problem
    start_runs(executor, ...)   checks every manifest, then records one run per manifest
    worst(codes)                the exit code of several runs

Invalid input anywhere means nothing is recorded: every manifest is loaded, and checked
against the lineage database (keys owned by other items), before the first run is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipeline.errors import ManifestError
from pipeline.manifest import Manifest, load_manifest

MANIFEST_SUFFIXES = (".yaml", ".yml")

#: Exit codes from the mildest to the worst: 0 ok, 1 a failed or canceled item,
#: 3 over budget, 2 invalid input or configuration, 4 a required service unreachable.
SEVERITY = (0, 1, 3, 2, 4)


def worst(codes: Iterable[int]) -> int:
    """The exit code of several runs: the worst of theirs (4 > 2 > 3 > 1 > 0)."""
    rank = {code: n for n, code in enumerate(SEVERITY)}
    found = list(codes)
    return max(found, key=lambda c: rank.get(c, len(SEVERITY)), default=0)


def manifest_paths(args: Sequence[Path]) -> list[Path]:
    """The manifest files named on the command line; a folder means its manifests, sorted.

    Raises ManifestError for a name that does not exist or a folder without manifests.
    """
    paths: list[Path] = []
    problems: list[str] = []
    for arg in args:
        if arg.is_dir():
            found = sorted(
                p for p in arg.iterdir() if p.suffix in MANIFEST_SUFFIXES and not p.is_dir()
            )
            if not found:
                problems.append(f"{arg}: no *.yaml or *.yml manifest in this folder")
            paths.extend(found)
        else:
            paths.append(arg)  # load_manifest reports a missing or unreadable file
    if problems:
        raise ManifestError(problems)
    seen: set[Path] = set()
    unique = []
    for path in paths:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(path)
    return unique


def load_manifests(args: Sequence[Path]) -> list[Manifest]:
    """Every manifest named (folders expanded); one ManifestError lists every problem."""
    manifests: list[Manifest] = []
    problems: list[str] = []
    names: dict[str, Path] = {}
    for path in manifest_paths(args):
        try:
            manifest = load_manifest(path)
        except ManifestError as exc:
            problems.extend(exc.problems)
            continue
        other = names.setdefault(manifest.name, path)
        if other != path:
            line = manifest.lines.get("name", 1)
            problems.append(
                f"{path}:{line}: name: manifest name {manifest.name!r} is also used by {other}"
            )
        manifests.append(manifest)
    if problems:
        raise ManifestError(problems)
    return manifests


def start_runs(
    executor: Any,
    manifests: Sequence[Manifest],
    *,
    force: bool = False,
    deadline: timedelta | None = None,
    git_sha: Callable[[Path], str | None] = lambda _path: None,
    trigger: str = "run",
    budgets: Sequence[float | None] | None = None,
) -> list[str]:
    """Check every manifest against the lineage database, then record one run each.

    `budgets` (one per manifest, in CU) caps each run's spend.
    """
    problems: list[str] = []
    for manifest in manifests:
        try:
            executor.check(manifest)
        except ManifestError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ManifestError(problems)
    caps = list(budgets) if budgets is not None else [None] * len(manifests)
    return [
        executor.start_run(
            manifest,
            force=force,
            deadline=deadline,
            git_sha=git_sha(manifest.path),
            trigger=trigger,
            budget=cap,
        )
        for manifest, cap in zip(manifests, caps, strict=True)
    ]
