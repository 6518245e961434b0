"""The API's behaviour, transport-free: validate a request, change the store, build the JSON."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from pipeline.sandbox import catalog, images, inference, outputs
from pipeline.sandbox.assets import AUTHOR_ID, OWNER_ID, Assets
from pipeline.sandbox.catalog import ApiProblem, Plan, bad_request
from pipeline.sandbox.state import ALL_STATUSES, Asset, Job, Store, body_key, iso, parse_iso

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 50
TEAM_ID = OWNER_ID  # jobs' and assets' ownerId is the team's id
# GET /teams/{teamId}/limits reports this when parallel_jobs is unlimited.
UNLIMITED_PARALLEL = 1000
_MODEL_DATE = "2025-01-01T00:00:00.000Z"


class Api:
    """One method per endpoint; each returns (HTTP status, JSON document) or raises ApiProblem."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.assets = Assets(store, self._observe)

    def check_signature(self, asset_id: str, expires: str, signature: str) -> str | None:
        """None if the CDN link is valid now, else why not ("tampered" or "expired")."""
        return self.assets.check_signature(asset_id, expires, signature)

    # --- jobs ---------------------------------------------------------------------------
    def _observe(self, job: Job, now: float | None = None) -> str:
        """The job's status now; the first time it is seen succeeded, its assets appear."""
        status = job.status(self.store.clock() if now is None else now)
        if status == "success" and job.asset_ids is None and job.plan is not None:
            with self.store.lock:
                if job.asset_ids is None:
                    made = outputs.make_outputs(self.store, job, job.plan)
                    job.asset_ids = [a.asset_id for a in made]
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

    # --- generation ---------------------------------------------------------------------
    def generate(self, model_id: str, body: Any, dry_run: bool) -> tuple[int, dict[str, Any]]:
        """POST /generate/custom/{modelId} (HTTP 269 and the cost when dry_run)."""
        self._require_model(model_id)
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object")
        types = self.store.config
        refusal = catalog.custom_refusal(model_id, types.model_type(model_id))
        if refusal is not None:
            raise refusal
        trained = body.get("modelId")
        if isinstance(trained, str):
            self._require_model(trained)
            refusal = catalog.custom_refusal(trained, types.model_type(trained))
            if refusal is not None:
                raise refusal
        plan = catalog.plan_generation(model_id, body)
        self._resolve_inputs(plan)
        cost = self._cost(plan)
        if dry_run:
            return 269, cost
        job = self._submit(model_id, body, plan, body_key(model_id, body))
        return 200, {"job": self.job_doc(job), **cost}

    def generate_inference(
        self, name: str, body: Any, dry_run: bool, cdn_base: str
    ) -> tuple[int, dict[str, Any]]:
        """POST /generate/{inferenceType}: txt2img, img2img, ..., remove-background, upscale."""
        endpoint = inference.ENDPOINTS.get(name)
        if endpoint is None:
            raise ApiProblem(404, f"No route for POST /v1/generate/{name}", "NotFoundError")
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object")
        if endpoint.capability is None:
            plan = inference.plan_tool(endpoint, body)
            job_model = endpoint.name
        else:
            job_model = self._inference_model(endpoint, body)
            for concept in inference.concept_model_ids(body):
                self._require_model(concept)
            plan = inference.plan_inference(endpoint, body, self.store.config.model_type(job_model))
        self._resolve_inputs(plan)
        key = body_key(f"/generate/{name}", body)
        if plan.inference is not None:
            plan.inference["seed"] = str(body.get("seed", outputs.derived_seed(key)))
            for field, asset_id in (("image", plan.input_asset_id), ("mask", plan.mask_asset_id)):
                if asset_id is not None:
                    plan.inference[field] = plan.inference[f"{field}Id"] = asset_id
            if endpoint.ip_adapter:
                plan.inference["ipAdapterImageIds"] = list(plan.reference_asset_ids)
        cost = self._cost(plan)
        if dry_run:
            return 269, cost
        # The remove-background answer carries its output asset, pending until the job ends.
        reserve = endpoint.name == "remove-background"
        job = self._submit(job_model, body, plan, key, reserve=reserve)
        doc: dict[str, Any] = {"job": self.job_doc(job), **cost}
        if plan.inference is not None:
            doc["inference"] = plan.inference
        if reserve:
            asset = self.store.assets[job.reserved_asset_ids[0]]
            doc["asset"] = self.assets.asset_doc(asset, cdn_base)
        return 200, doc

    def _inference_model(self, endpoint: inference.Endpoint, body: dict[str, Any]) -> str:
        """The body's modelId, checked: it exists, is not a custom model, can do this."""
        model_id = catalog.check_string(body, "modelId", required=True)
        assert model_id is not None
        self._require_model(model_id)
        model_type = self.store.config.model_type(model_id)
        if model_type == "custom":
            raise bad_request(
                f"Model {model_id} is a custom model: run it through "
                f"POST /generate/custom/{model_id}, not POST /generate/{endpoint.name}"
            )
        if endpoint.capability not in catalog.capabilities(model_id, model_type):
            raise bad_request(
                f"Model {model_id} ({model_type}) does not support {endpoint.capability}"
            )
        return model_id

    def _resolve_inputs(self, plan: Plan) -> None:
        """Turn the plan's image references into asset ids (404 for unknown ones) and size
        an upscale."""
        if plan.input_asset_id is not None:
            plan.input_asset_id = self.assets.resolve_image(plan.input_asset_id).asset_id
        if plan.mask_asset_id is not None:
            plan.mask_asset_id = self.assets.resolve_image(plan.mask_asset_id).asset_id
        plan.reference_asset_ids = [
            self.assets.resolve_image(r).asset_id for r in plan.reference_asset_ids
        ]
        if plan.kind == "upscale":
            source = self.store.assets[plan.input_asset_id or ""]
            width, height, cost = inference.upscale_target(plan, source.width, source.height)
            if max(width, height) > images.MAX_SIDE:
                raise bad_request(f"upscaled image would exceed {images.MAX_SIDE} px per side")
            plan.params["outWidth"], plan.params["outHeight"] = width, height
            if plan.job_type != "custom":
                plan.cost, plan.cost_details = cost, {"upscale": cost}

    @staticmethod
    def _cost(plan: Plan) -> dict[str, Any]:
        return {
            "creativeUnitsCost": plan.cost,
            "creativeUnitsDiscount": 0,
            "costDetails": plan.cost_details or {"custom-generation": plan.cost},
        }

    def _submit(
        self, model_id: str, body: dict[str, Any], plan: Plan, key: str, reserve: bool = False
    ) -> Job:
        """Create and bill the job unless its pool's parallel-jobs cap is reached (429);
        `reserve` announces its outputs at once."""
        limit = self.store.config.parallel_jobs
        pool = "custom" if plan.job_type == "custom" else "inference"
        with self.store.lock:
            if limit is not None and self.store.running_jobs(pool) >= limit:
                self.store.stats.responses_429["parallel"] += 1
                what = "jobs" if pool == "custom" else "inferences"
                raise ApiProblem(
                    429,
                    f"Too many running {what}: parallel {what} limit ({limit}) reached",
                    "ParallelJobsLimitError",
                    limit=limit,
                )
            job = self._new_job(model_id, body, plan, key)
            self.store.add_job(job)
            if reserve:
                outputs.reserve_outputs(self.store, job, plan)
        return job

    def _new_job(self, model_id: str, body: dict[str, Any], plan: Plan, key: str) -> Job:
        cfg = self.store.config
        prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
        matched = next((s for s in cfg.fail_prompts if s and s in (prompt or "")), None)
        fails = matched is not None or self.store.roll(cfg.failure_rate, "failure")
        job = Job(
            seq=self.store.next_seq(),
            job_id=self.store.new_id("job_", 25),
            job_type=plan.job_type,
            model_id=model_id,
            body=body,
            created=self.store.now_ms(),
            duration=self.store.job_duration(model_id, plan.job_type),
            cost=plan.cost,
            key=key,
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

    # --- models, teams and captions -------------------------------------------------------
    def get_model(self, model_id: str) -> tuple[int, dict[str, Any]]:
        """GET /models/{modelId}: its type (model_types), capabilities and inputs."""
        self._require_model(model_id)
        model_type = self.store.config.model_type(model_id)
        return 200, {"model": catalog.model_document(model_id, _MODEL_DATE, model_type)}

    def list_teams(self) -> tuple[int, dict[str, Any]]:
        """GET /teams (in the SDK, not the Swagger): the one team the key belongs to."""
        team = {
            "id": TEAM_ID,
            "name": "Sandbox",
            "plan": "cu-pro",
            "type": "shared",
            "createdAt": _MODEL_DATE,
            "updatedAt": _MODEL_DATE,
            "context": {"invitationsCount": 0, "keysCount": 1, "userRole": "key", "usersCount": 1},
            "projects": [
                {
                    "id": "proj_SandboxSandboxSandbox",
                    "name": "Sandbox",
                    "createdAt": _MODEL_DATE,
                    "updatedAt": _MODEL_DATE,
                }
            ],
        }
        return 200, {"teams": [team]}

    def team_limits(self, team_id: str) -> tuple[int, dict[str, Any]]:
        """GET /teams/{teamId}/limits (in the SDK, not the Swagger); 403 unless
        limits_access, as for the many API keys that may not read it."""
        if team_id != TEAM_ID:
            raise ApiProblem(404, f"Team {team_id} not found", "NotFoundError")
        cfg = self.store.config
        if not cfg.limits_access:
            raise ApiProblem(
                403, "Forbidden: this API key may not read the team's limits", "ForbiddenError"
            )
        parallel = cfg.parallel_jobs if cfg.parallel_jobs is not None else UNLIMITED_PARALLEL
        limits = dict.fromkeys(
            (
                "apiKeys", "canvasAssetLayers", "canvasAssets", "collections", "defaultSeats",
                "downloadAssets", "downloadModel", "maxTrainingDatasets", "models",
                "OTPSessions", "projects", "seats", "snapshotsRetention", "upload",
            ),
            100,
        )  # fmt: skip
        limits.update(
            creativeUnits=100000,
            inferenceBatchSize=128,
            minCooldown=0,
            maxCooldown=60,
            parallelCustomJobs=parallel,
            parallelInferences=parallel,
            parallelTraining=1,
            parallelWorkflowRuns=parallel,
            premiumGenerationSamples=4,
            scalingFactor=1,
        )
        with self.store.lock:
            spent = self.store.stats.creative_units
        return 200, {
            "limits": limits,
            "oneShotCreativeUnits": [],
            "period": {"start": _MODEL_DATE, "end": "2099-01-01T00:00:00.000Z"},
            "plan": "cu-pro",
            "values": {
                "apiKeys": 1,
                "canvasAssets": 0,
                "collections": 0,
                "creativeUnits": spent,
                "projects": 1,
                "seats": 1,
            },
        }

    def caption(self, body: Any, dry_run: bool) -> tuple[int, dict[str, Any]]:
        """POST /generate/caption: one deterministic caption per image, job already done."""
        refs = None
        if isinstance(body, dict):
            refs = body.get("images") or body.get("assetIds")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise bad_request("images must be a non-empty array of asset ids or data URLs")
        assets = [self.assets.resolve_image(ref) for ref in refs]
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
