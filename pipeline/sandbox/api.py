"""The API's behaviour, transport-free: validate a request, change the store, build the JSON."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from pipeline.sandbox import catalog, images, signing
from pipeline.sandbox.catalog import ApiProblem, Plan, bad_request
from pipeline.sandbox.state import ALL_STATUSES, Asset, Job, Store, body_key, iso, parse_iso

AUTHOR_ID = "5a5d5a0dbeefcafe5a5d5a0dbeefcafe"
OWNER_ID = "team_SandboxSandboxSandbox"
MAX_BULK_IDS = 200
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 50
_EDIT_CAPABILITIES = ["REMOVE_BACKGROUND", "UPSCALE", "DETECTION"]
_MIME_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
_TOOL_SOURCE = {
    "slicer": "unknown",
    "remove-background": "background-removal",
    "upscale": "upscale",
}


class Api:
    """One method per endpoint; each returns (HTTP status, JSON document) or raises ApiProblem."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # --- signing ------------------------------------------------------------------------
    def signed_url(self, asset_id: str, cdn_base: str, ext: str = "png") -> str:
        """A CloudFront-style signed link to the asset that expires after url_ttl."""
        expires = int(self.store.clock() + self.store.config.url_ttl)
        return signing.signed_url(self.store.signing_key, cdn_base, asset_id, ext, expires)

    def check_signature(self, asset_id: str, expires: str, signature: str) -> str | None:
        """None if the link is valid now, else why not ("tampered" or "expired")."""
        now = self.store.clock()
        return signing.refusal(self.store.signing_key, asset_id, expires, signature, now)

    # --- jobs ---------------------------------------------------------------------------
    def _observe(self, job: Job, now: float | None = None) -> str:
        """The job's status now; the first time it is seen succeeded, its assets appear."""
        status = job.status(self.store.clock() if now is None else now)
        if status == "success" and job.asset_ids is None and job.plan is not None:
            with self.store.lock:
                if job.asset_ids is None:
                    job.asset_ids = [a.asset_id for a in self._make_outputs(job, job.plan)]
        return status

    def job_doc(self, job: Job, now: float | None = None) -> dict[str, Any]:
        """The API's job object as of `now` (default: the clock)."""
        now = self.store.clock() if now is None else now
        status = self._observe(job, now)
        history = job.history(now)
        metadata: dict[str, Any] = {"input": job.body}
        if status == "success" and job.asset_ids is not None:
            metadata["assetIds"] = list(job.asset_ids)
        if status == "failure":
            metadata["error"], metadata["hint"] = job.error, job.hint
        if job.output is not None:
            metadata["output"] = job.output
        return {
            "jobId": job.job_id,
            "jobType": job.job_type,
            "status": status,
            "progress": job.progress(now),
            "statusHistory": [{"date": iso(at), "status": name} for name, at in history],
            "createdAt": iso(job.created),
            "updatedAt": iso(history[-1][1]),
            "metadata": metadata,
            "billing": {"cuCost": job.cost, "cuDiscount": 0},
            "authorId": AUTHOR_ID,
            "ownerId": OWNER_ID,
        }

    def _job(self, job_id: str) -> Job:
        job = self.store.jobs.get(job_id)
        if job is None:
            raise ApiProblem(404, f"Job {job_id} not found", "NotFoundError")
        return job

    def get_job(self, job_id: str) -> tuple[int, dict[str, Any]]:
        """GET /jobs/{jobId}."""
        return 200, {"job": self.job_doc(self._job(job_id))}

    def cancel_job(self, job_id: str, body: Any) -> tuple[int, dict[str, Any]]:
        """POST /jobs/{jobId}/action with {"action": "cancel"}."""
        job = self._job(job_id)
        if not isinstance(body, dict) or body.get("action") != "cancel":
            raise bad_request('action must be "cancel"')
        if not self.store.cancel(job):
            status = job.status(self.store.clock())
            if status != "canceled":  # canceling twice is harmless; a finished job is not
                raise bad_request(f"Job {job_id} is already {status}")
        return 200, {"job": self.job_doc(job)}

    def generate(self, model_id: str, body: Any, dry_run: bool) -> tuple[int, dict[str, Any]]:
        """POST /generate/custom/{modelId} (HTTP 269 and the cost when dry_run)."""
        self._require_model(model_id)
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object")
        plan = catalog.plan_generation(model_id, body)
        trained = body.get("modelId")
        if isinstance(trained, str):
            self._require_model(trained)
        if plan.input_asset_id is not None:
            plan.input_asset_id = self._resolve_image(plan.input_asset_id).asset_id
        plan.reference_asset_ids = [
            self._resolve_image(r).asset_id for r in plan.reference_asset_ids
        ]
        if plan.kind == "upscale":
            source = self.store.assets[plan.input_asset_id or ""]
            factor = plan.params["upscaleFactor"]
            if max(source.width, source.height) * factor > images.MAX_SIDE:
                raise bad_request(f"upscaled image would exceed {images.MAX_SIDE} px per side")
        cost = {
            "creativeUnitsCost": plan.cost,
            "creativeUnitsDiscount": 0,
            "costDetails": {"custom-generation": plan.cost},
        }
        if dry_run:
            return 269, cost
        limit = self.store.config.parallel_jobs
        with self.store.lock:
            if limit is not None and self.store.running_jobs() >= limit:
                self.store.stats.responses_429["parallel"] += 1
                raise ApiProblem(
                    429,
                    f"Too many running jobs: parallel jobs limit ({limit}) reached",
                    "ParallelJobsLimitError",
                    limit=limit,
                )
            job = self._new_job(model_id, body, plan)
            self.store.add_job(job)
        return 200, {"job": self.job_doc(job), **cost}

    def _new_job(self, model_id: str, body: dict[str, Any], plan: Plan) -> Job:
        cfg = self.store.config
        prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
        matched = next((s for s in cfg.fail_prompts if s and s in (prompt or "")), None)
        fails = matched is not None or self.store.roll(cfg.failure_rate)
        job = Job(
            seq=self.store.next_seq(),
            job_id=self.store.new_id("job_", 25),
            job_type="custom",
            model_id=model_id,
            body=body,
            created=self.store.now_ms(),
            duration=self.store.job_duration(),
            cost=plan.cost,
            key=body_key(model_id, body),
            plan=plan,
            fails=fails,
        )
        if matched is not None:
            job.error = f"Generation failed: the prompt contains {matched!r}"
            job.hint = (
                "The sandbox fails every prompt containing this text (fail_prompts); "
                "change the prompt or the sandbox config and submit again."
            )
        elif fails:
            job.error = "Generation failed: the inference worker crashed"
            job.hint = "This failure is transient; submitting the same request again may succeed."
        return job

    def _require_model(self, model_id: str) -> None:
        if model_id in self.store.config.missing_models:
            raise ApiProblem(404, f"Model {model_id} not found", "NotFoundError")

    def list_jobs(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """GET /jobs: filters, newest first, cursor pagination with deliberately short pages."""

        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        try:
            page_size = int(one("pageSize") or DEFAULT_PAGE_SIZE)
        except ValueError:
            raise bad_request("pageSize must be an integer") from None
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise bad_request(f"pageSize must be within [1, {MAX_PAGE_SIZE}]")
        status = one("status")
        if status is not None and status not in ALL_STATUSES:
            raise bad_request(f"status must be one of {', '.join(ALL_STATUSES)}")
        types = {
            t for v in query.get("types", []) + query.get("types[]", []) for t in v.split(",") if t
        } or ({one("type") or ""} - {""})
        by_update = bool(status or types or one("workflowId"))
        updated_after = self._date(one("updatedAfter"), "updatedAfter")
        created_after = self._date(one("createdAfter"), "createdAfter")
        if updated_after is not None and not by_update:
            raise bad_request(
                'updatedAfter is only allowed with "status", "type", "types" or '
                '"workflowId"; use createdAfter without them'
            )
        if created_after is not None and by_update:
            raise bad_request(
                'createdAfter is not allowed with "status", "type", "types" or '
                '"workflowId"; use updatedAfter with them'
            )
        cursor = self._cursor(one("paginationToken"))

        now = self.store.clock()
        rows: list[tuple[float, int, Job]] = []
        with self.store.lock:
            jobs = list(self.store.jobs.values())
        for job in jobs:
            current = self._observe(job, now)
            updated = job.history(now)[-1][1]
            if (status and current != status) or (types and job.job_type not in types):
                continue
            if updated_after is not None and updated <= updated_after:
                continue
            if created_after is not None and job.created <= created_after:
                continue
            sort_at = updated if by_update else job.created
            if cursor is not None and (sort_at, job.seq) >= cursor:
                continue
            rows.append((sort_at, job.seq, job))
        rows.sort(key=lambda row: (row[0], row[1]), reverse=True)

        cut = self.store.config.page_cut_every
        page: list[tuple[float, int, Job]] = []
        for row in rows:
            page.append(row)
            if len(page) == page_size or (cut and row[1] % cut == 0):
                break
        doc: dict[str, Any] = {"jobs": [self.job_doc(row[2], now) for row in page]}
        if page and (len(page) < len(rows) or len(page) == page_size):
            # A full last page still carries a token: the next page is empty, token-less.
            last = page[-1]
            raw = json.dumps({"at": last[0], "seq": last[1]}).encode()
            doc["nextPaginationToken"] = base64.urlsafe_b64encode(raw).decode()
        return 200, doc

    @staticmethod
    def _date(value: str | None, name: str) -> float | None:
        if value is None:
            return None
        try:
            return parse_iso(value)
        except ValueError:
            raise bad_request(f"{name} must be an ISO 8601 date") from None

    @staticmethod
    def _cursor(token: str | None) -> tuple[float, int] | None:
        if not token:
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode()))
            return float(data["at"]), int(data["seq"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise bad_request("paginationToken is invalid") from None

    # --- assets -------------------------------------------------------------------------
    def _resolve_image(self, ref: str) -> Asset:
        """An input image given as an asset id or a data URL (which becomes an asset)."""
        if ref.startswith("data:"):
            return self._asset_from_data_url(ref, name=None)
        asset = self.store.assets.get(ref)
        if asset is None:
            raise bad_request(f"Unknown asset id: {ref}")
        return asset

    def _asset_from_data_url(self, data_url: str, name: str | None) -> Asset:
        header, _, payload = data_url.partition(",")
        if not header.startswith("data:") or ";base64" not in header:
            raise bad_request("image must be a base64 data URL (data:image/png;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
            width, height = images.image_size(data)
        except (binascii.Error, ValueError, OSError):
            raise bad_request("image is not a valid base64-encoded image") from None
        now = self.store.clock()
        asset = Asset(
            asset_id=self.store.new_id("asset_", 22),
            created=now,
            source="uploaded",
            width=width,
            height=height,
            render=lambda: data,
            name=name,
            mime=header[5:].split(";")[0] or "image/png",
        )
        self.store.add_asset(asset, data)
        self.store.asset_bytes(asset)
        return asset

    def upload(self, body: Any, cdn_base: str) -> tuple[int, dict[str, Any]]:
        """POST /assets with a base64 data URL."""
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object")
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request("name is required")
        image = body.get("image")
        if not isinstance(image, str):
            raise bad_request("image is required (a base64 data URL)")
        parent = body.get("parentId")
        if parent is not None and parent not in self.store.assets:
            raise bad_request(f"Unknown asset id: {parent}")
        asset = self._asset_from_data_url(image, name)
        asset.parent_id = parent
        with self.store.lock:
            self.store.stats.uploads += 1
        return 200, {"asset": self.asset_doc(asset, cdn_base)}

    def asset_doc(self, asset: Asset, cdn_base: str) -> dict[str, Any]:
        """The API's asset object, with a freshly signed URL."""
        data = self.store.asset_bytes(asset)
        mime = asset.mime
        metadata: dict[str, Any] = {
            "kind": "image",
            "type": asset.source,
            "width": asset.width,
            "height": asset.height,
        }
        for key, value in (
            ("name", asset.name),
            ("prompt", asset.prompt),
            ("seed", asset.seed),
            ("modelId", asset.model_id),
            ("parentId", asset.parent_id),
            ("parentJobId", asset.job_id),
            ("outputIndex", asset.output_index),
        ):
            if value is not None:
                metadata[key] = value
        doc: dict[str, Any] = {
            "id": asset.asset_id,
            "url": self.signed_url(asset.asset_id, cdn_base, _MIME_EXT.get(mime, "png")),
            "mimeType": mime,
            "kind": "image",
            "status": "success",
            "source": asset.source,
            "metadata": metadata,
            "properties": {
                "size": len(data),
                "width": asset.width,
                "height": asset.height,
                "format": _MIME_EXT.get(mime, "png"),
            },
            "authorId": AUTHOR_ID,
            "ownerId": OWNER_ID,
            "collectionIds": [],
            "editCapabilities": _EDIT_CAPABILITIES,
            "privacy": "private",
            "tags": [],
            "createdAt": iso(asset.created),
            "updatedAt": iso(asset.created),
        }
        if asset.output_index is not None:
            doc["outputIndex"] = asset.output_index
        return doc

    def get_asset(self, asset_id: str, cdn_base: str) -> tuple[int, dict[str, Any]]:
        """GET /assets/{assetId}."""
        asset = self.store.assets.get(asset_id)
        if asset is None:
            raise ApiProblem(404, f"Asset {asset_id} not found", "NotFoundError")
        return 200, {"asset": self.asset_doc(asset, cdn_base)}

    def get_bulk(self, body: Any, cdn_base: str) -> tuple[int, dict[str, Any]]:
        """POST /assets/get-bulk: up to 200 ids; unknown ids are left out."""
        ids = body.get("assetIds") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise bad_request("assetIds must be an array of asset ids")
        if len(ids) > MAX_BULK_IDS:
            raise bad_request(f"assetIds accepts at most {MAX_BULK_IDS} ids, got {len(ids)}")
        found = [self.store.assets[i] for i in dict.fromkeys(ids) if i in self.store.assets]
        return 200, {"assets": [self.asset_doc(a, cdn_base) for a in found]}

    def _make_outputs(self, job: Job, plan: Plan) -> list[Asset]:
        """Create the assets a succeeded job produced (their bytes render on first use)."""
        store = self.store
        source = store.assets.get(plan.input_asset_id or "")
        outputs: list[Asset] = []

        def add(index: int, kind: str, width: int, height: int, render: Any) -> None:
            asset = Asset(
                asset_id=store.new_id("asset_", 22),
                created=job.history(store.clock())[-1][1],
                source=kind,
                width=width,
                height=height,
                render=render,
                job_id=job.job_id,
                model_id=job.body.get("modelId") or job.model_id,
                output_index=index,
                prompt=job.body.get("prompt"),
                parent_id=source.asset_id if source else None,
            )
            store.add_asset(asset)
            outputs.append(asset)

        if plan.kind == "image":
            seed = str(job.body.get("seed", int(job.key[:8], 16) % 2**31))
            width, height = plan.params["width"], plan.params["height"]
            kind = "img2img" if source else "txt2img"
            for index in range(plan.num_outputs):
                key = f"{job.key}:{index}"
                if source is None:
                    render: Any = lambda k=key: images.generated_png(k, width, height)  # noqa: E731
                else:
                    render = lambda k=key, s=source, f=float(plan.params["strength"]): (  # noqa: E731
                        images.img2img_png(k, width, height, store.asset_bytes(s), f)
                    )
                add(index, kind, width, height, render)
                outputs[-1].seed = seed
        elif source is not None and plan.kind == "slicer":
            x, y = plan.params["xSubdivisions"], plan.params["ySubdivisions"]
            for index in range(x * y):
                row, col = divmod(index, x)
                w = (col + 1) * source.width // x - col * source.width // x
                h = (row + 1) * source.height // y - row * source.height // y
                add(
                    index,
                    "unknown",
                    w,
                    h,
                    lambda i=index: images.slice_png(store.asset_bytes(source), x, y)[i],
                )
        elif source is not None and plan.kind == "remove-background":
            colour = plan.params.get("backgroundColor")
            add(
                0,
                _TOOL_SOURCE[plan.kind],
                source.width,
                source.height,
                lambda: images.remove_background_png(store.asset_bytes(source), colour),
            )
        elif source is not None and plan.kind == "upscale":
            factor = plan.params["upscaleFactor"]
            add(
                0,
                "upscale",
                source.width * factor,
                source.height * factor,
                lambda: images.upscale_png(store.asset_bytes(source), factor),
            )
        return outputs

    # --- models and captions --------------------------------------------------------------
    def get_model(self, model_id: str) -> tuple[int, dict[str, Any]]:
        """GET /models/{modelId}."""
        self._require_model(model_id)
        return 200, {"model": catalog.model_document(model_id, "2025-01-01T00:00:00.000Z")}

    def caption(self, body: Any, dry_run: bool) -> tuple[int, dict[str, Any]]:
        """POST /generate/caption: one deterministic caption per image, job already done."""
        refs = None
        if isinstance(body, dict):
            refs = body.get("images") or body.get("assetIds")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise bad_request("images must be a non-empty array of asset ids or data URLs")
        assets = [self._resolve_image(ref) for ref in refs]
        cost = float(len(assets) * catalog.CU_CAPTION_PER_IMAGE)
        if dry_run:
            return 269, {"creativeUnitsCost": cost, "creativeUnitsDiscount": 0}
        captions = [
            f"a sandbox image of {a.width}x{a.height} pixels, mostly "
            f"{images.dominant_colour(self.store.asset_bytes(a))}"
            for a in assets
        ]
        job = Job(
            seq=self.store.next_seq(),
            job_id=self.store.new_id("job_", 25),
            job_type="caption",
            model_id="caption",
            body=body,
            created=self.store.now_ms(),
            duration=0.0,
            cost=cost,
            key=body_key("caption", body),
            output={"captions": captions},
        )
        with self.store.lock:
            self.store.jobs[job.job_id] = job
        return 200, {
            "captions": captions,
            "job": self.job_doc(job),
            "creativeUnitsCost": cost,
            "creativeUnitsDiscount": 0,
        }

    def produced(self) -> list[Asset]:
        """Every job output so far, each rendered once so its sha256 is known."""
        with self.store.lock:
            jobs = list(self.store.jobs.values())
        outputs = []
        for job in jobs:
            self._observe(job)
            for asset_id in job.asset_ids or []:
                asset = self.store.assets[asset_id]
                if asset.sha256 is None:
                    self.store.asset_bytes(asset)
                outputs.append(asset)
        return outputs
