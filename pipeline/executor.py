"""What the CLI does for `run` and `retry`: check services, record the run, process it.

Order matters for "bad input changes nothing": the manifest is validated, credentials and
services are checked, inputs are uploaded (deduplicated by content) and only then is the
run recorded, in one transaction, before anything is enqueued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import timedelta
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from pipeline import db, preflight, reports, runtime
from pipeline.errors import ConfigError, ManifestError
from pipeline.manifest import ItemSpec, Manifest
from pipeline.models import RunStatus
from pipeline.repository import NewItem
from pipeline.settings import Settings
from pipeline.stages import Context, Sweeper

logger = logging.getLogger(__name__)


class Executor:
    """Runs manifests on the configured services (embedded or distributed)."""

    def __init__(self, settings: Settings, *, sandbox: bool = False) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.embedded = not settings.distributed
        self._ctx: Context | None = None
        self._worker: runtime.EmbeddedWorker | None = None
        self._sweeper: Sweeper | None = None
        self._stack = ExitStack()

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Executor:
        s = self.settings
        key, secret = runtime.credentials(s)  # exit 2 before anything is touched
        engine = db.make_engine(s.database_url)
        self._stack.callback(engine.dispose)
        db.check(engine)
        if engine.dialect.name == "sqlite":
            db.upgrade(s.database_url)  # embedded runs keep their own file current
        elif db.current_revision(engine) != db.head_revision():
            raise ConfigError(
                f"the database {db.safe_url(s.database_url)} is not at the latest schema: "
                "run `pipeline db upgrade`"
            )
        runtime.configure_runtime(s)
        runtime.check_broker(s.broker_url)
        ctx = runtime.build_context(s, runtime.tuning_from(s), engine=engine)
        self._stack.callback(ctx.client.close)
        ctx.storage.check()
        preflight.check_api(s, key, secret)  # exit 4 / 2 now, not after items are recorded
        runtime.set_context(ctx)
        self._ctx = ctx
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    @property
    def ctx(self) -> Context:
        assert self._ctx is not None, "use Executor as a context manager"
        return self._ctx

    # -- manifests and runs ---------------------------------------------------------------

    def _upload_inputs(self, manifest: Manifest) -> dict[str, tuple[int, str]]:
        """Upload each distinct input file once; reuse asset ids recorded earlier.

        A recorded asset may have vanished since (deleted, another project, a restarted
        sandbox): one get-bulk checks them all, and a missing one is uploaded again.
        """
        api_host = urlsplit(self.settings.api_url).netloc
        files = {f.sha256: f for item in manifest.items for f in item.input_files}
        if not files:
            return {}
        known = {
            sha: found
            for sha, found in self.ctx.repo.find_input_assets(api_host).items()
            if sha in files
        }
        alive: set[str] = set()
        if known:
            wanted = sorted({asset for _, asset in known.values()})
            alive = {a.id for a in self.ctx.client.get_assets(wanted)}
        uploaded: dict[str, tuple[int, str]] = {}
        for sha, f in files.items():
            if sha in known and known[sha][1] in alive:
                uploaded[sha] = known[sha]
                continue
            if sha in known:
                logger.info(
                    "input %s: asset %s no longer exists; uploading again", f.path, known[sha][1]
                )
            asset_id = self.ctx.client.upload_image(f.path.read_bytes(), f.path.name, f.mime_type)
            row_id = self.ctx.repo.record_input_asset(asset_id, sha, api_host, f.mime_type)
            uploaded[sha] = (row_id, asset_id)
            logger.info("uploaded %s as %s", f.path, asset_id)
        return uploaded

    def dry_run(self, manifest: Manifest) -> dict[str, Any]:
        """Ask the API what the manifest's generations would cost (dryRun=true); nothing runs.

        Recipe steps run on outputs that do not exist yet, so they cannot be priced here.
        """
        uploaded = self._upload_inputs(manifest)
        asset_ids = {sha: asset for sha, (_, asset) in uploaded.items()}
        total = 0.0
        per_item = {}
        for item in manifest.items:
            body = item.request_body(manifest, asset_ids)
            cost = self.ctx.client.dry_run(manifest.model, body, item.endpoint)
            per_item[item.id] = cost
            total += cost
        return {
            "manifest": manifest.name,
            "items": len(manifest.items),
            "creative_units": round(total, 4),
            "per_item": per_item,
            "unpriced_steps": sum(len(item.steps) for item in manifest.items),
        }

    def start_run(
        self,
        manifest: Manifest,
        *,
        force: bool = False,
        deadline: timedelta | None = None,
        git_sha: str | None = None,
        budget: float | None = None,
        trigger: str = "run",
    ) -> str:
        """Upload inputs, decide skips, and record the run and its items (one transaction).

        The manifest has been through `check` (batch.start_runs checks every manifest before
        the first run is recorded; recording one adds no stored key another could hit).
        """
        repo, storage = self.ctx.repo, self.ctx.storage
        uploaded = self._upload_inputs(manifest)
        asset_ids = {sha: asset for sha, (_, asset) in uploaded.items()}
        stored = {} if force else repo.find_stored_outputs(i.item_key for i in manifest.items)
        items = []
        for spec in manifest.items:
            outputs = stored.get(spec.item_key)
            skip_from = None
            if outputs and all(
                o.key == manifest.output_key(spec, o.index, o.key.rpartition(".")[2])
                and storage.verify(o.key, o.sha256)
                for o in outputs
            ):
                skip_from = outputs[0].item_id
            items.append(self._new_item(manifest, spec, asset_ids, uploaded, skip_from))
        return repo.record_run(
            manifest_name=manifest.name,
            manifest_path=str(manifest.path),
            manifest_sha256=manifest.sha256,
            manifest_body=manifest.text,
            items=items,
            force=force,
            sandbox=self.sandbox,
            storage_url=storage.url,
            api_host=urlsplit(self.settings.api_url).netloc,
            git_sha=git_sha,
            trigger=trigger,
            deadline_at=repo.now() + deadline if deadline else None,
            max_attempts=self.settings.max_job_attempts,
            budget=budget,
        )

    def check(self, manifest: Manifest) -> None:
        """Refuse a manifest the lineage database says cannot run (nothing is recorded)."""
        self._refuse_overwrites(manifest)

    def _refuse_overwrites(self, manifest: Manifest) -> None:
        """Refuse, before paying, a run whose images would land on another item's files.

        An item's own keys are replaced by its new outputs when it changed (the old version
        stays in lineage), unless the manifest says `overwrite: never`. Keys holding the
        output of a different item (another manifest, or another item id) are never taken.
        """
        planned = {
            key: (n, spec)
            for n, spec in enumerate(manifest.items)
            for _step, _index, key in manifest.planned_keys(spec)
        }
        owners = self.ctx.repo.key_owners(planned)
        problems = []
        for key, (n, spec) in planned.items():
            owner = owners.get(key)
            if owner is None:
                continue
            same_item = (owner.manifest, owner.item) == (manifest.name, spec.id)
            if same_item and manifest.overwrite != "never":
                continue
            if same_item and owner.item_key == spec.item_key:
                continue  # the same output again: nothing would change
            if same_item:
                problems.append(
                    f"{manifest.path}:{spec.line}: items[{n}].output: {key} already holds an "
                    f"earlier version of this item (asset {owner.asset_id}) and the manifest "
                    "says `overwrite: never`; put {item_key} or {seed} in `output`, or allow "
                    "replacing"
                )
            else:
                problems.append(
                    f"{manifest.path}:{spec.line}: items[{n}].output: {key} already holds the "
                    f"output of item {owner.item!r} of manifest {owner.manifest!r}; give this "
                    "item its own keys (`output` with {manifest} and {item}), or delete that "
                    "object"
                )
        if problems:
            raise ManifestError(problems)

    @staticmethod
    def _new_item(
        manifest: Manifest,
        spec: ItemSpec,
        asset_ids: dict[str, str],
        uploaded: dict[str, tuple[int, str]],
        skip_from: int | None,
    ) -> NewItem:
        roles = [("image", spec.image)] if spec.image else []
        roles += [(f"referenceImages[{i}]", f) for i, f in enumerate(spec.reference_images)]
        recipe = {
            "steps": [
                step.settings() | {"output": step.output, "expected_outputs": step.expected_outputs}
                for step in spec.steps
            ],
            "output": manifest.output,
            "overwrite": manifest.overwrite,
        }
        return NewItem(
            manifest_item_id=spec.id,
            line=spec.line,
            item_key=spec.item_key,
            prompt=spec.prompt,
            seed=spec.seed,
            model=manifest.model,
            trained_model=manifest.trained_model,
            params=spec.params,
            endpoint=spec.endpoint,
            body=spec.request_body(manifest, asset_ids),
            generation_key=spec.generation_key,
            generation_outputs=spec.generation_outputs,
            recipe=recipe,
            inputs=[(role, str(f.path), f.sha256, uploaded[f.sha256][0]) for role, f in roles],
            skipped_from_id=skip_from,
        )

    def reopen(self, run_id: str, item_ids: list[str]) -> list[str]:
        """Put a run's failed/canceled items (or the named ones) back to work."""
        if not self.ctx.repo.run_exists(run_id):
            raise ConfigError(f"no run {run_id}")
        reopened = self.ctx.repo.reopen_items(
            run_id, item_ids or None, self.settings.max_job_attempts
        )
        missing = set(item_ids) - set(reopened)
        if missing:
            logger.warning("not failed or canceled, left alone: %s", ", ".join(sorted(missing)))
        return reopened

    # -- processing -----------------------------------------------------------------------

    def kick(self) -> None:
        """Ring the distributed sweepers' doorbell (they also wake up by themselves)."""
        from pipeline.celery_app import app

        try:
            app.send_task("pipeline.sweep", retry=False)
        except Exception as exc:  # the run is recorded; sweepers find it without the bell
            logger.warning("could not ring the sweeper: %s", exc)

    def warm_up(self, stack: ExitStack) -> None:
        """Embedded: start the in-process worker now, so it is ready when the run is."""
        if self.embedded and self._worker is None:
            self._worker = runtime.EmbeddedWorker(self.settings.worker_concurrency).launch()
            stack.callback(self._worker.stop)
            runtime.CeleryDispatcher().warm()

    def start_processing(self, stack: ExitStack) -> None:
        """Embedded: start an in-process worker and sweeper. Distributed: join the sweep.

        Started before runs are recorded, the sweeper takes its lease and makes its first
        pass while they are; called again once they are, it is rung, and its next pass
        hands their first items out at once.
        """
        if self._sweeper is not None:
            self.ctx.wake.set()
            return
        if self.embedded:
            self.warm_up(stack)
            assert self._worker is not None
            self._worker.ready()
        runtime.settle_heap()
        self._sweeper = Sweeper(self.ctx, self.settings.api_url).start()
        stack.callback(self._sweeper.stop)

    def progress(self, run_id: str) -> dict[str, int]:
        return self.ctx.repo.run_progress(run_id)

    def report(self, run_id: str) -> dict[str, Any]:
        doc = reports.run_report(self.ctx.repo, run_id)
        if doc is None:
            raise ConfigError(f"no run {run_id}")
        return doc

    def wait(
        self,
        run_id: str,
        *,
        on_progress: Callable[[dict[str, int]], None] | None = None,
        interval: float = 0.25,
        progress_every: float = 1.0,
    ) -> dict[str, Any]:
        """Block until the run is final; returns its report. The status is read every
        `interval`, the item counts for `on_progress` every `progress_every` while it runs:
        in embedded mode this loop shares the interpreter with the sweeper and its POSTs,
        and counting every item four times a second held them up."""
        shown_at = float("-inf")
        while True:  # the run's status is derived by the sweeper (ours or another's)
            if self.ctx.repo.run_status(run_id) != RunStatus.RUNNING:
                return self.report(run_id)
            if on_progress is not None and time.monotonic() - shown_at >= progress_every:
                on_progress(self.progress(run_id))
                shown_at = time.monotonic()
            time.sleep(interval)
