"""The Scenario API client: sync httpx, typed results, errors translated in one place.

    status / failure           raised
    401                        AuthError
    403 (name says auth)       AuthError
    403 (anything else)        ApiPermanentError  (e.g. ModelAccessRestrictedError)
    400 404 409 422, other 4xx ApiPermanentError
    408 429 5xx                ApiTransientError  (retry_after from retry-after-ms / Retry-After)
    x-should-retry: false      ApiPermanentError  (x-should-retry: true -> ApiTransientError)
    timeout, connection error  ApiTransientError
    CDN 401 403 410            AssetUrlExpired    (fetch the asset again for a fresh URL)
    body cut short             DownloadIncomplete
    CDN: no image, too big     ApiPermanentError  (type or magic bytes; > 200 MB; > 5 redirects)

Uploads up to ~4 MB go as a JSON data URL (POST /assets); larger ones through the multipart
`/uploads` flow (POST /uploads, PUT each part to its signed URL, POST .../action complete,
GET /uploads/{id} until it names the asset).

Reads (GET, get-bulk, cancel) retry transient errors with `read_retry`. Generation is never
retried here: Scenario has no idempotency key, so a retried POST could pay twice; the
caller reconciles with `iter_jobs(created_after=...)` instead. Uploads are retried: a
duplicate upload costs no credits, it only leaves an unused asset behind.

Credentials live only inside the httpx auth object: they are never stored as attributes,
formatted into messages, logged, or sent to the CDN that serves asset bytes.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import httpx

from pipeline import __version__
from pipeline.errors import (
    ApiPermanentError,
    ApiTransientError,
    AssetUrlExpired,
    AuthError,
    DownloadIncomplete,
    PipelineError,
    cut,
    shorten,
)
from pipeline.governor import Governor, NullGovernor
from pipeline.limits import (
    DIRECT_UPLOAD_MAX_BYTES,
    MAX_DOWNLOAD_BYTES,
    MAX_REDIRECTS,
    UPLOAD_PART_BYTES,
)
from pipeline.retry import Backoff, call_with_retry

logger = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 30.0
USER_AGENT = f"scenario-pipeline/{__version__} (+httpx/{httpx.__version__})"
DRY_RUN_STATUS = 269
BULK_LIMIT = 200
PAGE_SIZE_MAX = 100
GOVERNOR_TIMEOUT = 300.0  # seconds a request may wait for the governor before giving up
_MESSAGE_MAX = 500
_AUTH_NAME = re.compile(r"auth|credential|api.?key|token|signature|unauthori[sz]ed", re.I)
_CDN_EXPIRED = {401, 403, 410}
DEFAULT_READ_RETRY = Backoff(max_attempts=3, initial=0.5, maximum=8.0)
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})
_UNTYPED = frozenset({"application/octet-stream", "binary/octet-stream"})  # judged by magic
_MAGIC_BYTES = 12  # enough to tell PNG, JPEG, WebP and GIF apart
UPLOAD_POLL_SECONDS = 1.0
UPLOAD_WAIT_SECONDS = 120.0


class JobStatus(StrEnum):
    """A Scenario job's status (note: `canceled`, one "l")."""

    PENDING = "pending"
    QUEUED = "queued"
    WARMING_UP = "warming-up"
    IN_PROGRESS = "in-progress"
    FINALIZING = "finalizing"
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        """True for success, failure and canceled."""
        return self in (JobStatus.SUCCESS, JobStatus.FAILURE, JobStatus.CANCELED)


@dataclass(frozen=True)
class Job:
    """A Scenario job, as far as the pipeline reads it."""

    id: str
    status: JobStatus
    progress: float
    created_at: datetime
    updated_at: datetime
    asset_ids: tuple[str, ...]
    error: str | None
    hint: str | None
    cost: float | None  # billing.cuCost
    input: dict[str, Any]  # metadata.input: echoes prompt, seed, ... for reconciliation
    model_id: str | None
    job_type: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Submission:
    """The answer to a generation request."""

    job: Job
    creative_units: float | None


@dataclass(frozen=True)
class Asset:
    """A Scenario asset; `url` is a signed CDN URL that expires."""

    id: str
    url: str | None
    mime_type: str | None
    width: int | None
    height: int | None
    output_index: int | None
    status: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


# ---------------------------------------------------------------- parsing


def _parse_time(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise ApiPermanentError(f"unexpected API response: job {what} missing")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ApiPermanentError(f"unexpected API response: bad {what} {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _opt_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_job(data: Mapping[str, Any]) -> Job:
    """A `Job` from the API's job object (raises ApiPermanentError on a foreign shape)."""
    try:
        job_id = data["jobId"]
        status = JobStatus(data["status"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ApiPermanentError(f"unexpected API response: not a job ({exc!s})") from exc
    metadata = data.get("metadata") or {}
    billing = data.get("billing") or {}
    cost = billing.get("cuCost")
    return Job(
        id=str(job_id),
        status=status,
        progress=float(data.get("progress") or 0.0),
        created_at=_parse_time(data.get("createdAt"), "createdAt"),
        updated_at=_parse_time(data.get("updatedAt"), "updatedAt"),
        asset_ids=tuple(str(a) for a in metadata.get("assetIds") or ()),
        error=_opt_str(metadata.get("error")),
        hint=_opt_str(metadata.get("hint")),
        cost=float(cost) if isinstance(cost, int | float) else None,
        input=dict(metadata.get("input") or {}),
        # The job object has no canonical model field; input.modelId is the trained model.
        model_id=_opt_str(data.get("modelId")) or _opt_str(metadata.get("modelId")),
        job_type=_opt_str(data.get("jobType")),
        raw=dict(data),
    )


def parse_asset(data: Mapping[str, Any]) -> Asset:
    """An `Asset` from the API's asset object."""
    if not isinstance(data, Mapping) or not isinstance(data.get("id"), str):
        raise ApiPermanentError("unexpected API response: not an asset")
    metadata = data.get("metadata") or {}
    properties = data.get("properties") or {}
    output_index = data.get("outputIndex", metadata.get("outputIndex"))
    return Asset(
        id=data["id"],
        url=_opt_str(data.get("url")),
        mime_type=_opt_str(data.get("mimeType")),
        width=_opt_int(properties.get("width", metadata.get("width"))),
        height=_opt_int(properties.get("height", metadata.get("height"))),
        output_index=_opt_int(output_index),
        status=_opt_str(data.get("status")),
        raw=dict(data),
    )


# ---------------------------------------------------------------- errors


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _body_fields(response: httpx.Response) -> tuple[str, str | None, str | None]:
    """(message, name, hint) from an error body of unknown shape."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        name = _opt_str(body.get("name"))
        hint = _opt_str(body.get("hint"))
        error = body.get("error")
        if isinstance(error, dict):
            error = error.get("message") or error.get("name")
        message = _opt_str(body.get("message")) or _opt_str(error) or name
        return message or response.reason_phrase, name, hint
    text = response.text.strip() if response.text else ""
    return text[:200] or response.reason_phrase, None, None


_RATE_WORDS = re.compile(r"rate|too many requests", re.I)


def _refused_for_concurrency(method: str, path: str, message: str, name: str | None) -> bool:
    """A 429 on a generation is the plan's parallel-jobs cap (API.md), unless it says rate."""
    if method != "POST" or not path.startswith("/generate/"):
        return False
    return not _RATE_WORDS.search(f"{name or ''} {message}")


def error_for_response(
    method: str, path: str, response: httpx.Response, scrub: Callable[[str], str] = str
) -> PipelineError | None:
    """The pipeline error for an API response, or None when it succeeded."""
    status = response.status_code
    if status < 400:
        return None
    message, name, hint = _body_fields(response)
    text = scrub(f"{method} {path} -> {status}: {message}")[:_MESSAGE_MAX]
    hint = scrub(hint)[:_MESSAGE_MAX] if hint else None
    should_retry = response.headers.get("x-should-retry", "").strip().lower()
    if status == 401 or (status == 403 and name and _AUTH_NAME.search(name)):
        return AuthError(text, status_code=status, name=name, hint=hint)
    transient = status in (408, 429) or status >= 500
    if should_retry == "false":
        transient = False
    elif should_retry == "true":
        transient = True
    if transient:
        return ApiTransientError(
            text,
            status_code=status,
            retry_after=parse_retry_after(response.headers),
            concurrency=status == 429 and _refused_for_concurrency(method, path, message, name),
        )
    return ApiPermanentError(text, status_code=status, name=name, hint=hint)


def _make_scrubber(*secrets: str) -> Callable[[str], str]:
    """A function that masks `secrets` in text (defence in depth: servers may echo them)."""
    needles = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def scrub(text: str) -> str:
        for needle in needles:
            text = text.replace(needle, "***")
        return text

    return scrub


def _safe_url(url: httpx.URL) -> str:
    """Host and path only: signed CDN queries and userinfo stay out of messages."""
    port = f":{url.port}" if url.port else ""
    return shorten(f"{url.host}{port}{url.path}", 120)


# ---------------------------------------------------------------- client


class ScenarioClient:
    """A sync client for the parts of the Scenario API the pipeline uses."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        api_secret: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        governor: Governor | None = None,
        read_retry: Backoff | None = DEFAULT_READ_RETRY,
        sleep: Callable[[float], None] = time.sleep,
        governor_timeout: float | None = GOVERNOR_TIMEOUT,
        max_connections: int = 20,
        project_id: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._governor: Governor = governor or NullGovernor()
        self._read_retry = read_retry
        self._sleep = sleep
        self._governor_timeout = governor_timeout
        token = base64.b64encode(f"{api_key}:{api_secret}".encode()).decode()
        self._scrub = _make_scrubber(api_key, api_secret, token)
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=KEEPALIVE_SECONDS,
        )
        timeouts = httpx.Timeout(timeout, connect=min(10.0, timeout))
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        self._http = httpx.Client(
            base_url=self.base_url + "/",
            auth=httpx.BasicAuth(api_key, api_secret),
            headers=headers,
            params={"projectId": project_id} if project_id else None,
            timeout=timeouts,
            limits=limits,
            transport=transport,
            follow_redirects=False,
        )
        # Asset bytes come from a CDN on another host: a client without auth, so the API
        # credentials can never reach it, even through a redirect.
        self._cdn = httpx.Client(
            headers={"User-Agent": USER_AGENT},
            timeout=timeouts,
            limits=limits,
            transport=transport,
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
        )

    def __repr__(self) -> str:
        return f"ScenarioClient(base_url={self.base_url!r})"

    def __enter__(self) -> ScenarioClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()
        self._cdn.close()

    # ------------------------------------------------------------ transport

    def _send_once(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None,
        json: Any,
        before_send: Callable[[], None] | None = None,
    ) -> httpx.Response:
        """One governed request; raises the translated error on failure."""
        self._governor.acquire(timeout=self._governor_timeout)
        if before_send is not None:
            before_send()  # the last word before the request leaves; may raise to abort
        try:
            response = self._http.request(method, path.lstrip("/"), params=params, json=json)
        except httpx.TimeoutException as exc:
            raise ApiTransientError(
                self._scrub(f"{method} {path}: connection error: timed out ({type(exc).__name__})")
            ) from None
        except httpx.TransportError as exc:
            # `from None`: the message already names the failure, and a chained httpx
            # error would print its own text unscrubbed.
            raise ApiTransientError(
                self._scrub(f"{method} {path}: connection error: {type(exc).__name__}: {exc}")
            ) from None
        logger.debug("%s %s -> %d", method, path, response.status_code)
        error = error_for_response(method, path, response, self._scrub)
        if error is None:
            return response
        if response.status_code == 429 and not getattr(error, "concurrency", False):
            # A rate limit: the whole fleet slows down. A concurrency refusal is not about
            # request rate; pausing polls and downloads for it would only lose time.
            self._governor.penalize(getattr(error, "retry_after", None))
        raise error

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        retry: bool,
        before_send: Callable[[], None] | None = None,
    ) -> httpx.Response:
        """A request, retried on transient errors when `retry` and a read policy is set."""

        def send() -> httpx.Response:
            return self._send_once(method, path, params=params, json=json, before_send=before_send)

        if not retry or self._read_retry is None:
            return send()
        return call_with_retry(
            send,
            backoff=self._read_retry,
            sleep=self._sleep,
            on_retry=lambda attempt, exc, wait: logger.info(
                "%s (attempt %d); retrying in %.1fs", exc, attempt, wait
            ),
        )

    def _json(self, method: str, path: str, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError as exc:
            raise ApiTransientError(f"{method} {path}: response is not JSON") from exc
        if not isinstance(body, dict):
            raise ApiPermanentError(f"{method} {path}: unexpected response shape")
        return body

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        retry: bool,
        before_send: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        response = self._request(
            method, path, params=params, json=json, retry=retry, before_send=before_send
        )
        return self._json(method, path, response)

    @staticmethod
    def _field(body: dict[str, Any], key: str, method: str, path: str) -> Any:
        if key not in body:
            raise ApiPermanentError(f"{method} {path}: response has no {key!r}")
        return body[key]

    # ------------------------------------------------------------ generation

    def generate(
        self,
        model_id: str,
        body: dict[str, Any],
        *,
        endpoint: str = "custom",
        before_send: Callable[[], None] | None = None,
    ) -> Submission:
        """Start a generation job. Never retried: a retried POST could pay twice.

        `endpoint` "custom" posts to /generate/custom/{model_id}; any other inference type
        posts to /generate/{endpoint}, where the body carries the model as `modelId`.
        `before_send` runs after the governor let the request through and right before it
        is sent; raising there aborts without sending (a caller re-checks its claim).
        """
        path = generation_path(model_id, endpoint)
        data = self._call("POST", path, json=body, retry=False, before_send=before_send)
        cost = data.get("creativeUnitsCost")
        return Submission(
            job=parse_job(self._field(data, "job", "POST", path)),
            creative_units=float(cost) if isinstance(cost, int | float) else None,
        )

    def dry_run(self, model_id: str, body: dict[str, Any], endpoint: str = "custom") -> float:
        """Validate inputs and price a generation without running it (HTTP 269)."""
        path = generation_path(model_id, endpoint)
        # Not retried either: were dryRun ever ignored, a retry would pay twice.
        response = self._request("POST", path, params={"dryRun": "true"}, json=body, retry=False)
        data = self._json("POST", path, response)
        if response.status_code != DRY_RUN_STATUS and "job" in data:
            raise ApiPermanentError(
                f"POST {path}?dryRun=true -> {response.status_code}: the API started a job"
                f" instead of a dry run ({data['job'].get('jobId')})"
            )
        cost = data.get("creativeUnitsCost")
        if not isinstance(cost, int | float):
            raise ApiPermanentError(f"POST {path}?dryRun=true: response has no creativeUnitsCost")
        return float(cost)

    # ------------------------------------------------------------ jobs

    def get_job(self, job_id: str) -> Job:
        """One job by id."""
        path = f"/jobs/{quote(job_id, safe='')}"
        return parse_job(self._field(self._call("GET", path, retry=True), "job", "GET", path))

    def iter_jobs(
        self,
        *,
        status: str | None = None,
        job_type: str | None = None,
        job_types: Sequence[str] = (),
        updated_after: datetime | None = None,
        created_after: datetime | None = None,
        page_size: int = 100,
    ) -> Iterator[Job]:
        """Every matching job, following nextPaginationToken across short or empty pages.

        The API sorts by update date when `status` or `job_type` is set, and then accepts
        only `updated_after`; without them it sorts by creation and accepts only
        `created_after`. Other combinations raise ValueError before any request.
        """
        filtered = bool(status or job_type or job_types)
        if updated_after is not None and not filtered:
            raise ValueError("updated_after needs status or job_type (an API rule)")
        if created_after is not None and filtered:
            raise ValueError("created_after cannot be combined with status or job_type")
        params: dict[str, Any] = {"pageSize": max(1, min(page_size, PAGE_SIZE_MAX))}
        if status:
            params["status"] = status
        if job_type:
            params["type"] = job_type
        if job_types:  # as the official SDK sends arrays: types[]=a&types[]=b
            params["types[]"] = sorted(set(job_types))
        if updated_after is not None:
            params["updatedAfter"] = format_time(updated_after)
        if created_after is not None:
            params["createdAfter"] = format_time(created_after)
        seen_tokens: set[str] = set()
        while True:
            data = self._call("GET", "/jobs", params=params, retry=True)
            for item in data.get("jobs") or ():
                yield parse_job(item)
            token = data.get("nextPaginationToken")
            if not token:
                return
            if token in seen_tokens:  # a server bug must not become an endless loop
                raise ApiPermanentError("GET /jobs: pagination token repeated")
            seen_tokens.add(token)
            params = {**params, "paginationToken": token}

    def cancel_job(self, job_id: str) -> Job:
        """Ask Scenario to cancel a job (safe to repeat, so transient errors are retried)."""
        path = f"/jobs/{quote(job_id, safe='')}/action"
        data = self._call("POST", path, json={"action": "cancel"}, retry=True)
        return parse_job(self._field(data, "job", "POST", path))

    # ------------------------------------------------------------ assets and models

    def upload_image(self, data: bytes, name: str, mime_type: str = "image/png") -> str:
        """Upload image bytes as a new asset and return its id (retried: uploads are free).

        Up to DIRECT_UPLOAD_MAX_BYTES the bytes go as a JSON data URL (POST /assets); larger
        ones through the multipart /uploads flow, which the API asks for above ~6 MB.
        """
        if len(data) > DIRECT_UPLOAD_MAX_BYTES:
            return self._upload_multipart(data, name, mime_type)
        image = f"data:{mime_type};base64,{base64.b64encode(data).decode('ascii')}"
        body = self._call("POST", "/assets", json={"image": image, "name": name}, retry=True)
        asset = self._field(body, "asset", "POST", "/assets")
        return parse_asset(asset).id

    def _upload_multipart(self, data: bytes, name: str, mime_type: str) -> str:
        """POST /uploads, PUT each part to its signed URL, complete, then wait for the asset."""
        parts = max(1, -(-len(data) // UPLOAD_PART_BYTES))
        request = {
            "fileName": name,
            "fileSize": len(data),
            "contentType": mime_type,
            "kind": "asset",
            "parts": parts,
        }
        upload = self._upload_field(self._call("POST", "/uploads", json=request, retry=True))
        upload_id = _opt_str(upload.get("id"))
        urls = _part_urls(upload.get("parts"), parts)
        if upload_id is None or urls is None:
            raise ApiPermanentError(f"POST /uploads: unexpected response (no id or {parts} parts)")
        path = f"/uploads/{quote(upload_id, safe='')}"
        for number, url in enumerate(urls, start=1):
            chunk = data[(number - 1) * UPLOAD_PART_BYTES : number * UPLOAD_PART_BYTES]
            self._put_part(url, chunk, number)
        self._call("POST", f"{path}/action", json={"action": "complete"}, retry=True)
        waited = 0.0
        while True:
            upload = self._upload_field(self._call("GET", path, retry=True))
            status = upload.get("status")
            if status == "failed":
                reason = _opt_str(upload.get("errorMessage")) or "no reason given"
                raise ApiPermanentError(self._scrub(f"upload {upload_id} failed: {reason}")[:500])
            asset_id = _opt_str(upload.get("entityId"))
            if asset_id and status in ("complete", "imported", "validated"):
                return asset_id
            if waited >= UPLOAD_WAIT_SECONDS:
                raise ApiTransientError(
                    f"upload {upload_id} still {status!r} after {UPLOAD_WAIT_SECONDS:.0f}s"
                )
            self._sleep(UPLOAD_POLL_SECONDS)
            waited += UPLOAD_POLL_SECONDS

    @staticmethod
    def _upload_field(body: dict[str, Any]) -> dict[str, Any]:
        upload = body.get("upload")
        if not isinstance(upload, dict):
            raise ApiPermanentError("/uploads: response has no 'upload'")
        return upload

    def _put_part(self, url: str, chunk: bytes, number: int) -> None:
        """PUT one part to its signed storage URL: no API credentials go there."""
        target = httpx.URL(url)
        where = _safe_url(target)
        if target.scheme not in ("http", "https"):
            raise ApiPermanentError(f"upload part {number}: not an http(s) URL")

        def send() -> None:
            try:
                response = self._cdn.put(target, content=chunk)
            except httpx.TimeoutException:
                raise ApiTransientError(f"PUT {where}: connection error: timed out") from None
            except (httpx.TransportError, httpx.TooManyRedirects) as exc:
                raise ApiTransientError(
                    f"PUT {where}: connection error: {type(exc).__name__}"
                ) from None
            if response.status_code >= 400:
                transient = response.status_code in (408, 429) or response.status_code >= 500
                error = ApiTransientError if transient else ApiPermanentError
                raise error(f"PUT {where} (part {number}) -> {response.status_code}")

        if self._read_retry is None:
            send()
        else:
            call_with_retry(send, backoff=self._read_retry, sleep=self._sleep)

    def get_asset(self, asset_id: str) -> Asset:
        """One asset, with a freshly signed URL."""
        path = f"/assets/{quote(asset_id, safe='')}"
        return parse_asset(self._field(self._call("GET", path, retry=True), "asset", "GET", path))

    def get_assets(self, asset_ids: Sequence[str]) -> list[Asset]:
        """Many assets through POST /assets/get-bulk, 200 per request, in the order asked."""
        wanted = list(dict.fromkeys(asset_ids))
        found: dict[str, Asset] = {}
        for start in range(0, len(wanted), BULK_LIMIT):
            chunk = wanted[start : start + BULK_LIMIT]
            data = self._call("POST", "/assets/get-bulk", json={"assetIds": chunk}, retry=True)
            for item in data.get("assets") or ():
                asset = parse_asset(item)
                found[asset.id] = asset
        ordered = [found.pop(a) for a in wanted if a in found]
        return ordered + list(found.values())

    def plan_limits(self) -> dict[str, int] | None:
        """The plan's parallel-job caps {"custom": n, "inference": m}, when the key may read
        them (GET /teams, then GET /teams/{teamId}/limits; not in the Swagger, in the SDK).

        None when it may not; a transient failure raises, so that it is asked again."""
        try:
            teams = self._call("GET", "/teams", retry=True).get("teams") or []
            team = next((t.get("id") for t in teams if isinstance(t, dict) and t.get("id")), None)
            if not isinstance(team, str):
                return None
            path = f"/teams/{quote(team, safe='')}/limits"
            limits = self._call("GET", path, retry=True).get("limits") or {}
        except ApiPermanentError:
            return None  # no access (403) or not there (404): learn them instead
        names = (("custom", "parallelCustomJobs"), ("inference", "parallelInferences"))
        found = {
            pool: int(limits[name])
            for pool, name in names
            if isinstance(limits.get(name), int | float) and limits[name] >= 1
        }
        return found or None

    def get_model(self, model_id: str) -> dict[str, Any]:
        """A model's description, including its `inputs`."""
        path = f"/models/{quote(model_id, safe='')}"
        model = self._field(self._call("GET", path, retry=True), "model", "GET", path)
        if not isinstance(model, dict):
            raise ApiPermanentError(f"GET {path}: unexpected response shape")
        return model

    # ------------------------------------------------------------ downloads

    @contextmanager
    def download(
        self, url: str, *, chunk_size: int = 65536, max_bytes: int = MAX_DOWNLOAD_BYTES
    ) -> Iterator[Iterator[bytes]]:
        """Stream a signed asset URL's bytes; never sends the API's Authorization header.

        The body must be an image (PNG, JPEG, WebP or GIF: content type and magic bytes) of
        at most max_bytes, reached in at most MAX_REDIRECTS redirects; anything else is a
        PermanentError, raised before or while the bytes stream (a cut body stays a
        DownloadIncomplete). CDN requests do not pass the governor: the rate limit is the API's.
        """
        target = httpx.URL(self.base_url).join(url)  # absolute URLs stay as they are
        where = _safe_url(target)
        if target.scheme not in ("http", "https"):
            raise ApiPermanentError(f"download of {where}: not an http(s) URL")
        try:
            with self._cdn.stream("GET", target) as response:
                final = _safe_url(response.url)
                _check_download_status(final, response)
                _check_download_headers(final, response, max_bytes)
                yield _iter_body(final, response, chunk_size, max_bytes)
        except httpx.TimeoutException:
            raise ApiTransientError(f"GET {where}: connection error: timed out") from None
        except httpx.TooManyRedirects:
            raise ApiPermanentError(
                f"GET {where}: more than {MAX_REDIRECTS} redirects", status_code=None
            ) from None
        except httpx.TransportError as exc:
            raise ApiTransientError(
                f"GET {where}: connection error: {type(exc).__name__}"
            ) from None


def _check_download_status(where: str, response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    if status in _CDN_EXPIRED:
        raise AssetUrlExpired(f"GET {where} -> {status}: signed URL refused or expired")
    if status in (408, 429) or status >= 500:
        raise ApiTransientError(
            f"GET {where} -> {status}: CDN failing",
            status_code=status,
            retry_after=parse_retry_after(response.headers),
        )
    raise ApiPermanentError(
        f"GET {where} -> {status}: CDN refused the download", status_code=status
    )


def check_complete(where: str, received: int, expected: int | None) -> None:
    """Raise DownloadIncomplete when fewer bytes arrived than Content-Length announced."""
    if expected is not None and received < expected:
        raise DownloadIncomplete(f"GET {where}: body cut short ({received} of {expected} bytes)")


def _check_download_headers(where: str, response: httpx.Response, max_bytes: int) -> None:
    """Refuse a body that announces a non-image type or more than max_bytes."""
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind not in IMAGE_TYPES and kind not in _UNTYPED:
        raise ApiPermanentError(f"GET {where}: served {cut(kind, 60)}, not an image")
    length = response.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise ApiPermanentError(
            f"GET {where}: {int(length)} bytes is more than the {max_bytes}-byte limit"
        )


def image_type(head: bytes) -> str | None:
    """The image MIME type its first bytes announce (PNG, JPEG, WebP, GIF), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def _iter_body(
    where: str, response: httpx.Response, chunk_size: int, max_bytes: int = MAX_DOWNLOAD_BYTES
) -> Iterator[bytes]:
    length = response.headers.get("content-length")
    expected = int(length) if length and length.isdigit() else None
    received = 0
    head = b""
    checked = False
    try:
        for chunk in response.iter_bytes(chunk_size):
            received += len(chunk)
            if received > max_bytes:
                raise ApiPermanentError(f"GET {where}: body exceeds the {max_bytes}-byte limit")
            if not checked:
                head += chunk
                if len(head) < _MAGIC_BYTES:
                    continue  # hold the first bytes back until they can be checked
                _check_magic(where, head)
                checked, chunk, head = True, head, b""
            yield chunk
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout) as exc:
        raise DownloadIncomplete(
            f"GET {where}: connection cut mid-body ({type(exc).__name__})"
        ) from None
    if response.headers.get("content-encoding", "identity").lower() not in ("", "identity"):
        # Content-Length counts the compressed bytes: compare the raw count instead.
        received = response.num_bytes_downloaded
    check_complete(where, received, expected)
    if not checked:  # a body shorter than any image header
        _check_magic(where, head)
        yield head


def _check_magic(where: str, head: bytes) -> None:
    if image_type(head) is None:
        raise ApiPermanentError(f"GET {where}: the body is not a PNG, JPEG, WebP or GIF image")


def _part_urls(parts: Any, count: int) -> list[str] | None:
    """The signed URLs of parts 1..count in order, or None when the answer does not hold them."""
    if not isinstance(parts, list):
        return None
    by_number: dict[int, str] = {}
    for part in parts:
        if isinstance(part, dict) and isinstance(part.get("url"), str):
            number = part.get("number")
            if isinstance(number, int | float) and not isinstance(number, bool):
                by_number[int(number)] = part["url"]
    urls = [by_number.get(n) for n in range(1, count + 1)]
    return None if any(u is None for u in urls) else [u for u in urls if u]


def generation_path(model_id: str, endpoint: str = "custom") -> str:
    """The URL path that runs a model: /generate/custom/{model} or /generate/{endpoint}."""
    if endpoint == "custom":
        return f"/generate/custom/{quote(model_id, safe='')}"
    return f"/generate/{quote(endpoint, safe='')}"


def format_time(value: datetime) -> str:
    """An ISO-8601 UTC timestamp with milliseconds and a Z, as the API writes them."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    text = value.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")
