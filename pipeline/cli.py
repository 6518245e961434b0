"""The `pipeline` command: validate, run, status, retry, cancel, lineage, worker, scheduler,
sandbox, db.

Exit codes (interface.md): 0 success; 1 a failed or canceled item (or not found);
2 invalid input or configuration; 3 over budget (nothing paid); 4 a required service could
not be reached. Several runs exit with the worst of their codes.
`--json` prints exactly one JSON document on stdout, errors included
(`{"error": {"code", "message", "problems"}, "exit_code"}`); logs and progress go to stderr.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import typer
from pydantic import SecretStr
from rich.console import Console

from pipeline import batch, db, gallery, reports
from pipeline.errors import (
    AuthError,
    ConfigError,
    ManifestError,
    PipelineError,
    ServiceUnavailable,
    TransientError,
)
from pipeline.settings import Settings, load_settings

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_UNAVAILABLE = 0, 1, 2, 4
EXIT_OVER_BUDGET = 3  # the plan's priced cost exceeds the budget: nothing was paid

app = typer.Typer(
    name="pipeline",
    help="Batch asset pipeline for the Scenario API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Lineage database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")

err = Console(stderr=True, highlight=False, soft_wrap=True)
logger = logging.getLogger("pipeline")


#: What `--json` error documents call each kind of failure (`error.code`).
_KINDS = {
    EXIT_FAILED: "failed",
    EXIT_INVALID: "invalid_input",
    EXIT_OVER_BUDGET: "over_budget",
    EXIT_UNAVAILABLE: "unreachable",
}


class Exit(Exception):
    """Leave the CLI with a code after printing one clear line.

    `kind` names the failure in a `--json` error document; `problems` are its lines
    (`file:line: field: message` for manifests).
    """

    def __init__(
        self,
        code: int,
        message: str | None = None,
        *,
        kind: str | None = None,
        problems: list[str] | None = None,
    ) -> None:
        super().__init__(message or "")
        self.code = code
        self.message = message
        self.kind = kind or _KINDS.get(code, "error")
        self.problems = problems if problems is not None else (message or "").splitlines()


_json_printed = False
# Typer (>= 0.17) vendors Click: its exceptions are not `click`'s.
_USAGE_ERRORS = tuple(
    {click.ClickException, getattr(typer, "TyperException", click.ClickException)}
)
_ABORTS = tuple({click.Abort, getattr(typer, "Abort", click.Abort)})


def _json_mode(argv: list[str]) -> bool:
    return "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv


def main() -> None:
    """Console-script entry point: one line per error, no tracebacks for known failures.

    With `--json`, stdout gets exactly one JSON document in every case: the command's, or
    an error document when it failed before printing one (a usage error included).
    """
    as_json = _json_mode(sys.argv[1:])
    try:
        if not as_json:
            app()
            return
        code = app(standalone_mode=False)
    except Exit as exc:
        if as_json and not _json_printed:
            _print_error(exc)
        elif exc.message:
            err.print(exc.message, markup=False)
        sys.exit(exc.code)
    except _ABORTS:
        _print_error(Exit(EXIT_FAILED, "aborted", kind="aborted"))
        sys.exit(EXIT_FAILED)
    except _USAGE_ERRORS as exc:
        # Only with --json (standalone mode prints and exits by itself): a usage error.
        code = int(getattr(exc, "exit_code", EXIT_INVALID))
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _print_error(Exit(code, f"error: {message}", kind="usage"))
        sys.exit(code)
    sys.exit(code if isinstance(code, int) else 0)


def _print_error(exc: Exit) -> None:
    """The `--json` error document (the human line still goes to stderr)."""
    if exc.message:
        err.print(exc.message, markup=False)
    first = exc.problems[0] if exc.problems else (exc.message or "")
    message = first if len(exc.problems) <= 1 else f"{len(exc.problems)} problems: {first}"
    _print_json(
        {
            "error": {"code": exc.kind, "message": message, "problems": exc.problems},
            "exit_code": exc.code,
        }
    )


@contextmanager
def _errors() -> Iterator[None]:
    """Map the pipeline's exceptions to exit codes and one-line messages."""
    try:
        yield
    except Exit:
        raise
    except ManifestError as exc:
        raise Exit(
            EXIT_INVALID, "\n".join(exc.problems), kind="invalid_input", problems=exc.problems
        ) from None
    except AuthError as exc:
        raise Exit(
            EXIT_INVALID,
            f"error: Scenario refused the credentials: {exc}. "
            "Check SCENARIO_API_KEY and SCENARIO_API_SECRET.",
            kind="credentials",
        ) from None
    except ConfigError as exc:
        message = str(exc)
        kind = "credentials" if "credentials are not set" in message else "configuration"
        raise Exit(EXIT_INVALID, f"error: {message}", kind=kind) from None
    except ServiceUnavailable as exc:
        raise Exit(EXIT_UNAVAILABLE, f"error: {exc}", kind="unreachable") from None
    except TransientError as exc:
        raise Exit(EXIT_UNAVAILABLE, f"error: {exc}", kind="unreachable") from None
    except PipelineError as exc:
        raise Exit(EXIT_INVALID, f"error: {exc}", kind="error") from None


def _settings(**overrides: Any) -> Settings:
    """The validated settings; a bad one exits 2 with one line naming variable and value."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        raise Exit(EXIT_INVALID, f"error: {exc}", kind="configuration") from None
    return settings.model_copy(update=overrides) if overrides else settings


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "celery", "kombu"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- validate ----------------------------------------------------------------------------


@app.command()
def validate(
    files: list[Path] = typer.Argument(..., help="Manifest files to check."),
    online: bool = typer.Option(
        False, "--online", help="Also check params against each model's inputs (GET /models)."
    ),
    sandbox: bool = typer.Option(False, "--sandbox", help="With --online: use a local sandbox."),
) -> None:
    """Check manifests offline; print each problem as file:line: field: message.

    Output keys are also checked against the configured storage's own key rules
    (PIPELINE_STORAGE_URL; nothing is contacted). With --online, params are checked against
    the models' declared inputs (names, types, ranges, allowed and required values).
    """
    from pipeline.manifest import validate_files
    from pipeline.storage import open_storage

    settings = _settings()  # a broken configuration is reported by every command
    with _errors():
        storage = open_storage(settings.storage_url, endpoint_url=settings.s3_endpoint_url)
        problems = validate_files(files, storage.key_problem)
    if online and not problems:
        problems = _online_problems(files, settings, sandbox)
    if problems:
        raise Exit(EXIT_INVALID, "\n".join(problems), kind="invalid_input", problems=problems)
    for path in files:
        err.print(f"{path}: ok", markup=False)


def _online_problems(files: list[Path], settings: Settings, sandbox: bool) -> list[str]:
    """validate --online: each manifest's params against its models' declared inputs."""
    from pipeline import runtime
    from pipeline.inputs import ModelCache, check_manifest
    from pipeline.manifest import load_manifest
    from pipeline.scenario import ScenarioClient

    with _errors(), ExitStack() as stack:
        if sandbox:
            settings = _start_sandbox(stack, settings)
        key, secret = runtime.credentials(settings)
        client = ScenarioClient(settings.api_url, key, secret, timeout=settings.http_timeout)
        stack.callback(client.close)
        describe = ModelCache(client.get_model)
        return [
            problem
            for path in files
            for problem in check_manifest(load_manifest(path), describe, shown=str(path))
        ]


# -- run ---------------------------------------------------------------------------------


def _parse_duration(text: str | None) -> timedelta | None:
    if not text:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise Exit(EXIT_INVALID, f"error: --deadline: expected e.g. 90s, 30m, 6h, got {text!r}")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return timedelta(seconds=value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


def _git_sha(path: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(path.parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


@app.command()
def run(
    manifest_files: list[Path] = typer.Argument(
        ...,
        metavar="FILE|DIR...",
        help="Manifests to run, one run each (a folder: its *.yaml and *.yml files).",
    ),
    wait: bool = typer.Option(False, "--wait", help="Wait until every item is final."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    sandbox: bool = typer.Option(
        False, "--sandbox", help="Run against a local Scenario sandbox (no credentials)."
    ),
    force: bool = typer.Option(False, "--force", help="Regenerate items already stored."),
    deadline: str | None = typer.Option(
        None, "--deadline", help="Cancel what is left after this long (e.g. 30m, 6h)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate against the API and print the cost; run nothing."
    ),
    junit: Path | None = typer.Option(
        None, "--junit", help="With --wait: write a JUnit XML report (a testcase per item)."
    ),
    trigger: str = typer.Option("run", "--trigger", hidden=True),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log progress details."),
    budget: float | None = typer.Option(
        None, "--budget", help="Cap in creative units (overrides the manifest's budget:)."
    ),
    online_check: bool = typer.Option(
        True, "--online-check/--no-online-check", help="Check params against model inputs."
    ),
) -> None:
    """Record a run of each manifest and process their items; prints the run ids."""
    _setup_logging(verbose)
    from pipeline.executor import Executor

    with _errors(), ExitStack() as stack:
        deadline_delta = _parse_duration(deadline)
        manifests = batch.load_manifests(manifest_files)  # all, before any service is touched
        settings = _settings()
        _check_junit(junit, wait, settings)
        if sandbox:
            settings = _start_sandbox(stack, settings)
        executor = stack.enter_context(Executor(settings, sandbox=sandbox))
        processing = not dry_run and (wait or executor.embedded)
        if processing:
            executor.warm_up(stack)  # the worker starts while the runs are checked and recorded
        # Every manifest is checked (inputs, budget) before the first run is recorded.
        caps = [
            _before_paying(executor, manifest, budget, online_check, force, as_json)
            for manifest in manifests
        ]
        if dry_run:
            costs = [executor.dry_run(manifest) for manifest in manifests]
            _print_cost(costs, as_json)
            return
        if processing:  # the sweeper gets ready while the runs are recorded
            executor.start_processing(stack)
        run_ids = batch.start_runs(
            executor,
            manifests,
            force=force,
            deadline=deadline_delta,
            git_sha=_git_sha,
            trigger=trigger if trigger in ("run", "schedule") else "run",
            budgets=caps,
        )
        for manifest, run_id in zip(manifests, run_ids, strict=True):
            err.print(
                f"run {run_id} recorded ({manifest.path.name}, {len(manifest.items)} items)",
                markup=False,
            )
        _finish(executor, run_ids, wait, as_json, stack, junit=junit)


def _before_paying(
    executor: Any,
    manifest: Any,
    budget: float | None,
    online_check: bool,
    force: bool,
    as_json: bool,
) -> float | None:
    """The online input check, then the budget check on the plan; the run's budget."""
    from pipeline.inputs import ModelCache, check_manifest
    from pipeline.plan import Planner, over_budget, tables, text_total

    if budget is not None and not budget > 0:
        raise Exit(EXIT_INVALID, f"error: --budget: must be a positive number, got {budget:g}")
    if online_check:
        problems = check_manifest(manifest, ModelCache(executor.ctx.client.get_model))
        if problems:
            raise Exit(EXIT_INVALID, "\n".join(problems))
    cap = budget if budget is not None else manifest.budget
    if cap is None:
        return None
    asset_ids = {sha: asset for sha, (_, asset) in executor._upload_inputs(manifest).items()}
    planner = Planner(executor.ctx, asset_ids)
    plan = planner.plan(manifest)
    if planner.problems:
        raise Exit(EXIT_INVALID, "\n".join(planner.problems))
    if force or not over_budget(plan, cap):  # --force: enforced while running only
        return cap
    message = (
        f"error: budget: the run would cost {plan['creative_units']:g} CU, over the budget of "
        f"{cap:g} CU; nothing was paid (raise --budget or the manifest's budget:)"
    )
    doc = {"manifests": [plan], "creative_units": plan["creative_units"]}
    if as_json:
        error = {"code": "over_budget", "message": message.removeprefix("error: ")}
        _print_json({"error": error, "exit_code": EXIT_OVER_BUDGET, "budget": cap, "plan": plan})
    else:
        for table in tables(doc | {"priced_at_run_time": plan["priced_at_run_time"]}):
            err.print(table)
        err.print(text_total(doc | {"priced_at_run_time": plan["priced_at_run_time"]}))
    raise Exit(EXIT_OVER_BUDGET, message)


def _check_junit(junit: Path | None, wait: bool, settings: Settings) -> None:
    if junit is not None and not wait and settings.distributed:
        raise Exit(EXIT_INVALID, "error: --junit needs --wait (the report is written at the end)")


def _finish(
    executor: Any,
    run_ids: list[str],
    wait: bool,
    as_json: bool,
    stack: ExitStack,
    *,
    junit: Path | None = None,
) -> None:
    if not executor.embedded and not wait:
        executor.kick()
        if as_json:
            _print_runs([executor.report(run_id) for run_id in run_ids], EXIT_OK)
        else:
            for run_id in run_ids:
                typer.echo(run_id)
        return
    if not wait and executor.embedded:
        err.print("embedded mode: processing in this process until the run is done", markup=False)
    executor.start_processing(stack)
    done = [_wait_for(executor, run_id, show=wait) for run_id in run_ids]
    code = batch.worst(_exit_code(report) for report in done)
    galleries = {
        r["run_id"]: str(gallery.write(r, Path("runs") / f"{r['run_id']}.html")) for r in done
    }
    if junit is not None:
        from pipeline import junit as junit_report

        try:
            junit_report.write(done, junit)
        except OSError as exc:
            raise Exit(
                EXIT_INVALID, f"error: --junit {junit}: cannot write it: {exc.strerror or exc}"
            ) from None
        err.print(f"junit: {junit}", markup=False)
    _notify(executor.settings, done, galleries)
    if as_json:
        _print_runs(done, code)
    else:
        for report in done:
            report["gallery"] = galleries[report["run_id"]]
            _print_summary(report)
    raise Exit(code)


def _print_runs(docs: list[dict[str, Any]], code: int) -> None:
    """One run: its document (as always). Several: `{"runs": [...], "exit_code": N}`."""
    _print_json(docs[0] if len(docs) == 1 else {"runs": docs, "exit_code": code})


def _notify(settings: Settings, done: list[dict[str, Any]], galleries: dict[str, str]) -> None:
    if settings.notify_url is None:
        return
    from pipeline import notify

    galleries = {run_id: str(Path(page).resolve()) for run_id, page in galleries.items()}
    notify.notify(settings.notify_url.get_secret_value(), done, galleries=galleries)


def _exit_code(report: dict[str, Any]) -> int:
    return EXIT_OK if report["status"] == "succeeded" else EXIT_FAILED


def _start_sandbox(stack: ExitStack, settings: Settings) -> Settings:
    from pipeline.sandbox import Sandbox, SandboxConfig

    sb = stack.enter_context(Sandbox(SandboxConfig()))
    err.print(f"sandbox: serving the Scenario API at {sb.url}", markup=False)
    return settings.model_copy(
        update={
            "api_url": sb.url,
            "api_key": SecretStr("sandbox"),
            "api_secret": SecretStr("sandbox"),
        }
    )


def _wait_for(executor: Any, run_id: str, *, show: bool) -> dict[str, Any]:
    """Block until the run is final, showing progress on stderr."""
    if show and err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
        )
        with Progress(*columns, console=err, transient=False) as bar:
            task = bar.add_task(run_id, total=None, detail="")

            def show_progress(counts: dict[str, int]) -> None:
                total = sum(counts.values())
                done = sum(counts.get(k, 0) for k in ("succeeded", "failed", "skipped", "canceled"))
                bar.update(task, total=total, completed=done, detail=_detail(counts))

            report = executor.wait(run_id, on_progress=show_progress)
            show_progress(executor.progress(run_id))
            return report
    last: list[str] = [""]
    last_at = [0.0]

    def plain(counts: dict[str, int]) -> None:
        line = _detail(counts)
        if line != last[0] and time.monotonic() - last_at[0] > 2.0:
            err.print(f"{run_id}: {line}", markup=False)
            last[0], last_at[0] = line, time.monotonic()

    report = executor.wait(run_id, on_progress=plain if show else None)
    if show:
        err.print(f"{run_id}: {_detail(executor.progress(run_id))}", markup=False)
    return report


def _detail(counts: dict[str, int]) -> str:
    in_flight = sum(counts.get(k, 0) for k in ("submitting", "running", "collecting"))
    return (
        f"done {counts.get('succeeded', 0) + counts.get('skipped', 0)}"
        f" (skipped {counts.get('skipped', 0)})"
        f" · failed {counts.get('failed', 0) + counts.get('canceled', 0)}"
        f" · in flight {in_flight} · waiting {counts.get('pending', 0)}"
    )


def _print_json(doc: Any) -> None:
    global _json_printed
    _json_printed = True
    sys.stdout.write(json.dumps(doc, indent=None, sort_keys=False) + "\n")
    sys.stdout.flush()


def _print_summary(report: dict[str, Any], limit: int = 30) -> None:
    """A table of the items (the unfinished and failed first; long runs are cut short)."""
    from rich.table import Table

    out = Console(highlight=False)
    order = {"failed": 0, "canceled": 1}
    items = sorted(report["items"], key=lambda i: order.get(i["status"], 2))
    table = Table(title=f"{report['run_id']} · {report['manifest']['name']} · {report['status']}")
    for col in ("item", "status", "attempts", "outputs", "error"):
        table.add_column(col, overflow="fold")
    for item in items[:limit]:
        outputs = item["outputs"]
        shown = outputs[0]["uri"] if len(outputs) == 1 else f"{len(outputs)} files"
        if len(outputs) > 1:
            shown += f" ({outputs[0]['uri'].rsplit('/', 1)[0]}/…)"
        table.add_row(
            item["id"],
            item["status"],
            str(item["attempts"]),
            shown if outputs else "",
            item["error"] or "",
        )
    out.print(table)
    if len(items) > limit:
        out.print(f"… and {len(items) - limit} more items (pipeline status --json)", markup=False)
    c = report["counts"]
    out.print(
        f"{c['succeeded']} succeeded, {c['skipped']} skipped, {c['failed']} failed, "
        f"{c.get('canceled', 0)} canceled of {c['total']} · {report['creative_units']} CU",
        markup=False,
    )
    if report.get("gallery"):
        out.print(f"gallery: {report['gallery']}", markup=False)


def _print_cost(costs: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        _print_json(costs[0] if len(costs) == 1 else {"dry_runs": costs, "exit_code": EXIT_OK})
        return
    for cost in costs:
        prefix = f"{cost['manifest']}: " if len(costs) > 1 else ""
        typer.echo(
            f"{prefix}{cost['items']} items would cost {cost['creative_units']} creative units"
        )


# -- plan --------------------------------------------------------------------------------


@app.command()
def plan(
    paths: list[Path] = typer.Argument(
        ..., metavar="FILE|DIR...", help="Manifests, or folders of *.yaml/*.yml manifests."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    as_markdown: bool = typer.Option(
        False, "--markdown", help="Print Markdown (for a pull-request comment)."
    ),
    sandbox: bool = typer.Option(False, "--sandbox", help="Use a local Scenario sandbox."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log progress details."),
) -> None:
    """Show what a run of each manifest would do (new, changed, unchanged, removed items;
    reused and re-run recipe steps) and what it would cost, priced by dry run; pays nothing."""
    _setup_logging(verbose)
    from pipeline import plan as planning
    from pipeline.executor import Executor

    with _errors(), ExitStack() as stack:
        # As `run` reads them, with its errors (a folder without manifests is one of them).
        manifests = batch.load_manifests(paths)
        settings = _settings()
        if sandbox:
            settings = _start_sandbox(stack, settings)
        executor = stack.enter_context(Executor(settings, sandbox=sandbox))
        plans, problems = [], []
        for manifest in manifests:
            uploaded = executor._upload_inputs(manifest)
            planner = planning.Planner(
                executor.ctx, {sha: asset for sha, (_, asset) in uploaded.items()}
            )
            plans.append(planner.plan(manifest))
            problems += planner.problems
        if problems:
            raise Exit(EXIT_INVALID, "\n".join(problems))
    doc = planning.summarize(plans)
    if as_json:
        _print_json(doc)
    elif as_markdown:
        sys.stdout.write(planning.markdown(doc))
    else:
        out = Console(highlight=False)
        for table in planning.tables(doc):
            out.print(table)
        out.print(planning.text_total(doc), markup=False)


# -- status / retry / lineage ------------------------------------------------------------


@contextmanager
def _repository() -> Iterator[Any]:
    from pipeline.repository import Repository

    with _errors():
        settings = _settings()
        engine = db.make_engine(settings.database_url)
        db.check(engine)
        if db.current_revision(engine) is None:
            raise Exit(
                EXIT_FAILED,
                "no runs recorded yet (the lineage database is empty)",
                kind="not_found",
            )
        try:
            yield Repository(engine)
        finally:
            engine.dispose()


@app.command()
def status(
    run_id: str | None = typer.Argument(None, help="A run id (default: the latest run)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Show a run (default: the latest) with the state of each item."""
    with _repository() as repo:
        run_id = run_id or repo.latest_run_id()
        report = reports.run_report(repo, run_id) if run_id else None
        if report is None:
            raise Exit(
                EXIT_FAILED,
                f"no run {run_id}" if run_id else "no runs recorded yet",
                kind="not_found",
            )
    if as_json:
        _print_json(report)
    else:
        _print_summary(report)


@app.command()
def retry(
    run_ids: list[str] = typer.Argument(
        ..., metavar="RUN_ID...", help="The runs whose failed or canceled items to re-run."
    ),
    item: list[str] = typer.Option([], "--item", help="Only these item ids (repeatable)."),
    wait: bool = typer.Option(False, "--wait", help="Wait until every item is final."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    sandbox: bool = typer.Option(False, "--sandbox", help="Use a local Scenario sandbox."),
    junit: Path | None = typer.Option(
        None, "--junit", help="With --wait: write a JUnit XML report (a testcase per item)."
    ),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Re-run the failed or canceled items of runs (all, or the ones named) as new attempts."""
    _setup_logging(verbose)
    from pipeline.executor import Executor

    with _errors(), ExitStack() as stack:
        settings = _settings()
        _check_junit(junit, wait, settings)
        if sandbox:
            settings = _start_sandbox(stack, settings)
        executor = stack.enter_context(Executor(settings, sandbox=sandbox))
        run_ids = list(dict.fromkeys(run_ids))
        unknown = [r for r in run_ids if not executor.ctx.repo.run_exists(r)]
        if unknown:  # nothing is reopened when any id is wrong
            raise Exit(
                EXIT_INVALID,
                "\n".join(f"error: no run {r}" for r in unknown),
                kind="not_found",
            )
        for run_id in run_ids:
            reopened = executor.reopen(run_id, item)
            err.print(f"run {run_id}: retrying {len(reopened)} item(s)", markup=False)
        _finish(executor, run_ids, wait, as_json, stack, junit=junit)


@app.command()
def cancel(
    run_id: str = typer.Argument(..., help="The run to stop."),
    reason: str = typer.Option(
        "canceled from the command line", "--reason", help="Recorded on each canceled item."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the run's document on stdout."),
) -> None:
    """Stop a run: pending work is canceled, in-flight Scenario jobs too; stored files stay."""
    from pipeline.executor import Executor
    from pipeline.models import RunStatus
    from pipeline.stages import cancel_run

    with _errors(), ExitStack() as stack:
        settings = _settings()
        executor = stack.enter_context(Executor(settings))
        repo = executor.ctx.repo
        if not repo.run_exists(run_id):
            raise Exit(EXIT_INVALID, f"error: no run {run_id}", kind="not_found")
        if repo.run_status(run_id) != RunStatus.RUNNING:
            err.print(f"run {run_id} is already {repo.run_status(run_id)}", markup=False)
        else:
            jobs = cancel_run(executor.ctx, run_id, _one_line(reason))
            err.print(
                f"run {run_id} canceled ({len(jobs)} Scenario job(s) canceled); "
                f"stored outputs are kept; `pipeline retry {run_id}` runs the rest",
                markup=False,
            )
        report = executor.report(run_id)
    if as_json:
        _print_json(report)
    else:
        typer.echo(run_id)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500] or "canceled from the command line"


@app.command("gallery")
def gallery_command(
    run_id: str | None = typer.Argument(None, help="A run id (default: the latest run)."),
    output: Path | None = typer.Option(None, "-o", "--output", help="The HTML file to write."),
) -> None:
    """Write a run's images as an HTML contact sheet (runs/RUN_ID.html by default)."""
    with _repository() as repo:
        run_id = run_id or repo.latest_run_id()
        report = reports.run_report(repo, run_id) if run_id else None
        if report is None:
            raise Exit(
                EXIT_FAILED,
                f"no run {run_id}" if run_id else "no runs recorded yet",
                kind="not_found",
            )
    page = gallery.write(report, output or Path("runs") / f"{report['run_id']}.html")
    typer.echo(str(page))


@app.command()
def lineage(
    ref: str = typer.Argument(
        ...,
        help="A local file (any copy, found by its bytes), storage key or URI, sha256, "
        "asset id or job id.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Trace a stored file back through its recipe chain to its run, manifest and item."""
    from pipeline.storage import open_storage

    with _repository() as repo:
        settings = _settings()
        path = Path(ref)
        if path.is_file():
            # A local file, wherever it was copied to and however renamed: its bytes say
            # which stored object (and which version of it) it is.
            refs = [_sha256_of(path)]
        else:
            refs = [ref]
            try:
                storage = open_storage(settings.storage_url, endpoint_url=settings.s3_endpoint_url)
                key = storage.key_from_uri(ref)
                if key:
                    refs.append(key)
            except PipelineError:
                pass
        docs = reports.lineage(repo, refs)
    if as_json:
        _print_json({"ref": ref, "found": len(docs), "matches": docs})
    elif docs:
        for doc in docs:
            _print_lineage(doc)
    if not docs:
        raise Exit(EXIT_FAILED, None if as_json else f"{ref}: not found in the lineage database")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise Exit(EXIT_INVALID, f"{path}: cannot read: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _print_lineage(doc: dict[str, Any]) -> None:
    out = Console(highlight=False)
    o, it, asset = doc["object"], doc["item"], doc["asset"]
    state = "" if o.get("current", True) else "  (superseded: a newer version is at this key)"
    lines = [
        f"[bold]{o['uri']}[/bold]{state}",
        f"  sha256     {o['sha256']}  ({o['bytes']} bytes)",
        f"  asset      {asset['id']} ({asset['width']}x{asset['height']})",
    ]
    for step in reversed(doc.get("chain", [])):
        job = step["job"] or {}
        label = "generation" if step["step"] == 0 else f"step {step['step']}"
        via = "" if step["endpoint"] == "custom" else f" via /generate/{step['endpoint']}"
        reused = ", reused from an earlier run" if step["reused"] else ""
        cost = job.get("creative_units")
        lines.append(
            f"  {'<-':<3}{label:<11}{step['model']}{via}  job {job.get('id')}"
            + (f" ({cost} CU{reused})" if cost is not None else f" ({reused.lstrip(', ')})")
        )
        params = {k: v for k, v in step["params"].items() if k not in ("prompt", "seed")}
        if params:
            lines.append(f"  {'':<14}params {json.dumps(params, sort_keys=True)}")
        if step["input_asset"]:
            lines.append(f"  {'':<14}input  {step['input_asset']}")
    lines += [
        f"  item       {it['id']} (line {it['line']})  item_key {it['item_key'][:16]}",
        f"  prompt     {it['prompt']}",
        f"  seed       {it['seed']}",
        f"  model      {it['model']}"
        + (f"  trained {it['trained_model']}" if it["trained_model"] else ""),
        f"  manifest   {doc['manifest']['name']}  {doc['manifest']['path']}"
        f"  sha256 {doc['manifest']['sha256'][:12]}",
        f"  run        {doc['run']['id']} ({doc['run']['status']}, {doc['run']['created_at']})",
    ]
    lines += [f"  input      {i['role']}: {i['path']} -> {i['asset_id']}" for i in doc["inputs"]]
    if len(doc.get("versions", [])) > 1:
        lines.append(f"  versions   {len(doc['versions'])} at this key:")
        lines += [
            f"             {v['stored_at']}  sha256 {v['sha256'][:16]}  asset {v['asset_id']}"
            f"  run {v['run_id']}"
            for v in doc["versions"]
        ]
    if o.get("public_url"):
        lines.append(f"  public     {o['public_url']}")
    for line in lines:
        out.print(line, markup=line.startswith("[bold]"))


# -- processes ---------------------------------------------------------------------------


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def worker(
    ctx: typer.Context,
    sweeper: bool = typer.Option(
        True, "--sweeper/--no-sweeper", help="Also take part in sweeping (one is active)."
    ),
) -> None:
    """A Celery worker on PIPELINE_BROKER_URL; extra arguments go to `celery worker`."""
    _setup_logging(False)
    from pipeline import runtime
    from pipeline.celery_app import app as celery

    with _errors():
        settings = _settings()
        if not settings.distributed:
            raise Exit(
                EXIT_INVALID,
                "error: `pipeline worker` needs a real broker: set PIPELINE_BROKER_URL=redis://...",
            )
        runtime.configure_runtime(settings)
        runtime.check_broker(settings.broker_url)
        runtime.credentials(settings)
        _prepare_database(settings)
    argv = ["worker", "--loglevel=INFO", "-Q", "pipeline"]
    extra = list(ctx.args)
    if not any(a.startswith(("--pool", "-P")) for a in extra):
        argv.append("--pool=threads")  # I/O-bound tasks; no fork with a live sweeper thread
    if not any(a.startswith(("--concurrency", "-c")) for a in extra):
        argv.append(f"--concurrency={settings.worker_concurrency}")
    loop = None
    if sweeper:
        loop = _sweeper(runtime.context(), settings).start()
    try:
        celery.worker_main(argv + extra)
    finally:
        if loop is not None:
            loop.stop()


@app.command()
def poller() -> None:
    """Run only the sweeper (polls jobs, dispatches work); any number may run, one is active."""
    _setup_logging(True)
    from pipeline import runtime

    with _errors():
        settings = _settings()
        runtime.configure_runtime(settings)
        runtime.credentials(settings)
        _prepare_database(settings)
        loop = _sweeper(runtime.context(), settings)
    runtime.settle_heap()
    err.print("poller: sweeping (Ctrl-C to stop)", markup=False)
    try:
        loop.run()
    except KeyboardInterrupt:
        loop.stop()


def _sweeper(ctx: Any, settings: Settings) -> Any:
    """The sweeper; with PIPELINE_NOTIFY_URL it announces scheduled runs as they finish."""
    if settings.notify_url is not None:
        from pipeline.notify import NotifyingSweeper

        return NotifyingSweeper(ctx, settings.api_url, settings.notify_url.get_secret_value())
    from pipeline.stages import Sweeper

    return Sweeper(ctx, settings.api_url)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def scheduler(ctx: typer.Context) -> None:
    """Celery beat: starts a run of each manifest in PIPELINE_SCHEDULE_MANIFESTS on
    PIPELINE_SCHEDULE (a crontab expression); the workers process them. Extra arguments go
    to `celery beat`."""
    _setup_logging(False)
    from pipeline import runtime, schedule
    from pipeline.celery_app import app as celery

    with _errors():
        settings = _settings()
        if not settings.schedule:
            raise Exit(
                EXIT_INVALID,
                'error: PIPELINE_SCHEDULE is not set: give a crontab expression, e.g. "0 2 * * *"',
                kind="configuration",
            )
        if not settings.distributed:
            raise Exit(
                EXIT_INVALID,
                "error: `pipeline scheduler` needs a real broker: set "
                "PIPELINE_BROKER_URL=redis://...",
                kind="configuration",
            )
        folder = schedule.manifests_folder(settings)
        runtime.configure_runtime(settings)
        runtime.check_broker(settings.broker_url)
        celery.conf.beat_schedule = schedule.beat_schedule(settings)
    err.print(
        f"scheduler: runs every manifest in {folder} on {settings.schedule!r} (UTC)",
        markup=False,
    )
    celery.start(["beat", "--loglevel=INFO", *ctx.args])


def _prepare_database(settings: Settings) -> None:
    engine = db.make_engine(settings.database_url)
    try:
        db.check(engine)
        if engine.dialect.name == "sqlite":
            db.upgrade(settings.database_url)
        elif db.current_revision(engine) != db.head_revision():
            raise ConfigError(
                f"the database {db.safe_url(settings.database_url)} is not at the latest "
                "schema: run `pipeline db upgrade`"
            )
    finally:
        engine.dispose()


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Upgrade the lineage database schema (Alembic) to head."""
    with _errors():
        settings = _settings()
        engine = db.make_engine(settings.database_url)
        try:
            db.check(engine)
        finally:
            engine.dispose()
        db.upgrade(settings.database_url, revision)
    err.print(f"database {db.safe_url(settings.database_url)} at {revision}", markup=False)


def _register_sandbox() -> None:
    try:
        from pipeline.sandbox.command import sandbox_command
    except ImportError:  # pragma: no cover - the sandbox ships with the package
        return
    app.command("sandbox", help="Serve the local Scenario-compatible API.")(sandbox_command)


_register_sandbox()


if __name__ == "__main__":  # pragma: no cover
    main()
