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

from pipeline import db, preflight, runtime
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
        """Upload each distinct input file once; reuse asset ids recorded earlier."""
        api_host = urlsplit(self.settings.api_url).netloc
        uploaded: dict[str, tuple[int, str]] = {}
        for item in manifest.items:
            for f in item.input_files:
                if f.sha256 in uploaded:
                    continue
                known = self.ctx.repo.find_input_asset(f.sha256, api_host)
                if known is None:
                    asset_id = self.ctx.client.upload_image(
                        f.path.read_bytes(), f.path.name, f.mime_type
                    )
                    row_id = self.ctx.repo.record_input_asset(
                        asset_id, f.sha256, api_host, f.mime_type
                    )
                    known = (row_id, asset_id)
                    logger.info("uploaded %s as %s", f.path, asset_id)
                uploaded[f.sha256] = known
        return uploaded

    def dry_run(self, manifest: Manifest) -> dict[str, Any]:
        """Ask the API what the manifest would cost (dryRun=true); nothing runs."""
        uploaded = self._upload_inputs(manifest)
        asset_ids = {sha: asset for sha, (_, asset) in uploaded.items()}
        total = 0.0
        per_item = {}
        for item in manifest.items:
            cost = self.ctx.client.dry_run(manifest.model, item.request_body(manifest, asset_ids))
            per_item[item.id] = cost
            total += cost
        return {
            "manifest": manifest.name,
            "items": len(manifest.items),
            "creative_units": round(total, 4),
            "per_item": per_item,
        }

    def start_run(
        self,
        manifest: Manifest,
        *,
        force: bool = False,
        deadline: timedelta | None = None,
        git_sha: str | None = None,
    ) -> str:
        """Upload inputs, decide skips, and record the run and its items (one transaction)."""
        repo, storage = self.ctx.repo, self.ctx.storage
        uploaded = self._upload_inputs(manifest)
        asset_ids = {sha: asset for sha, (_, asset) in uploaded.items()}
        self._refuse_overwrites(manifest)
        stored = {} if force else repo.find_stored_outputs(i.item_key for i in manifest.items)
        items = []
        for spec in manifest.items:
            outputs = stored.get(spec.item_key)
            skip_from = None
            if outputs and all(storage.verify(o.key, o.sha256) for o in outputs):
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
            deadline_at=repo.now() + deadline if deadline else None,
            max_attempts=self.settings.max_job_attempts,
        )

    def _refuse_overwrites(self, manifest: Manifest) -> None:
        """Refuse, before paying, a run whose new images would land on keys holding others.

        Stored objects are never overwritten with different bytes (CDN caches keep them a
        year); a changed prompt or seed needs a key template that tells variants apart.
        """
        planned = {
            manifest.output_key(spec, index): (n, spec)
            for n, spec in enumerate(manifest.items)
            for index in range(spec.num_outputs)
        }
        owners = self.ctx.repo.key_owners(planned)
        problems = [
            f"{manifest.path}:{spec.line}: items[{n}].output: {key} already holds the output "
            f"of a different item_key ({owners[key][:12]}); put {{item_key}} or {{seed}} in "
            "`output` so that variants get their own keys, or delete the stored object"
            for key, (n, spec) in planned.items()
            if key in owners and owners[key] != spec.item_key
        ]
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
        return NewItem(
            manifest_item_id=spec.id,
            line=spec.line,
            item_key=spec.item_key,
            prompt=spec.prompt,
            seed=spec.seed,
            model=manifest.model,
            trained_model=manifest.trained_model,
            params=spec.params,
            body=spec.request_body(manifest, asset_ids),
            num_outputs=spec.num_outputs,
            output_template=manifest.output,
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

    def start_processing(self, stack: ExitStack) -> None:
        """Embedded: start an in-process worker and sweeper. Distributed: join the sweep."""
        if self.embedded:
            worker = runtime.EmbeddedWorker(self.settings.worker_concurrency).start()
            stack.callback(worker.stop)
        sweeper = Sweeper(self.ctx, self.settings.api_url).start()
        stack.callback(sweeper.stop)

    def progress(self, run_id: str) -> dict[str, int]:
        return self.ctx.repo.run_progress(run_id)

    def report(self, run_id: str) -> dict[str, Any]:
        doc = self.ctx.repo.run_report(run_id)
        if doc is None:
            raise ConfigError(f"no run {run_id}")
        return doc

    def wait(
        self,
        run_id: str,
        *,
        on_progress: Callable[[dict[str, int]], None] | None = None,
        interval: float = 0.25,
    ) -> dict[str, Any]:
        """Block until the run is final; returns its report."""
        while True:  # the run's status is derived by the sweeper (ours or another's)
            if on_progress is not None:
                on_progress(self.progress(run_id))
            if self.ctx.repo.run_status(run_id) != RunStatus.RUNNING:
                return self.report(run_id)
            time.sleep(interval)
