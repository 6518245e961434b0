"""The multipart `/uploads` flow for files over the 6 MB request limit.

`POST /uploads {fileName, fileSize, contentType, kind: "image", parts}` answers an upload in
status `pending` with one presigned URL per part; each part is PUT there (no Basic auth,
like S3); `POST /uploads/{id}/action {"action": "complete"}` assembles the parts and the
upload turns `validating`, then `imported` with the new asset id as `entityId` (or `failed`
with an `errorMessage`) once the validation took its time (`model_latency["upload"]`, else
`latency`); `GET /uploads/{id}` shows where it stands.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from pipeline.sandbox import signing
from pipeline.sandbox.assets import AUTHOR_ID, OWNER_ID, Assets, not_found
from pipeline.sandbox.catalog import ApiProblem, bad_request
from pipeline.sandbox.state import Store, iso

MAX_PARTS = 10000
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_PART_BYTES = 64 * 1024 * 1024
PART_PATH = "/upload-parts/"
_KINDS = ("image", "asset")


@dataclass
class Upload:
    """One multipart upload and the parts received so far."""

    upload_id: str
    file_name: str
    file_size: int
    content_type: str
    kind: str
    parts_count: int
    created: float
    asset_options: dict[str, Any] | None = None
    parts: dict[int, bytes] = field(default_factory=dict)
    completed_at: float | None = None
    ready_at: float | None = None
    asset_id: str | None = None
    error: str | None = None

    def status(self, now: float) -> str:
        """pending, validating, imported or failed."""
        if self.completed_at is None or self.ready_at is None:
            return "pending"
        if now < self.ready_at:
            return "validating"
        return "failed" if self.error else "imported"


class Uploads:
    """POST /uploads, GET /uploads/{id}, POST /uploads/{id}/action and the part PUTs."""

    def __init__(self, store: Store, assets: Assets) -> None:
        self.store = store
        self.assets = assets

    def _subject(self, upload_id: str, number: int) -> str:
        return f"upload:{upload_id}:{number}"

    def part_url(self, cdn_base: str, upload_id: str, number: int, expires: int) -> str:
        """The presigned URL a part is PUT to."""
        sig = signing.signature(self.store.signing_key, self._subject(upload_id, number), expires)
        query = urlencode({"Expires": expires, "Signature": sig})
        return f"{cdn_base}{PART_PATH}{upload_id}/{number}?{query}"

    def _get(self, upload_id: str) -> Upload:
        upload = self.store.uploads.get(upload_id)
        if not isinstance(upload, Upload):
            raise ApiProblem(404, f"Upload {upload_id} not found", "NotFoundError")
        return upload

    def doc(self, upload: Upload, cdn_base: str) -> dict[str, Any]:
        """The API's upload object."""
        now = self.store.clock()
        status = upload.status(now)
        updated = upload.created
        if upload.completed_at is not None and upload.ready_at is not None:
            updated = upload.ready_at if status in ("imported", "failed") else upload.completed_at
        doc: dict[str, Any] = {
            "id": upload.upload_id,
            "fileName": upload.file_name,
            "originalFileName": upload.file_name,
            "fileSize": upload.file_size,
            "contentType": upload.content_type,
            "kind": upload.kind,
            "source": "multipart",
            "partsCount": upload.parts_count,
            "status": status,
            "authorId": AUTHOR_ID,
            "ownerId": OWNER_ID,
            "createdAt": iso(upload.created),
            "updatedAt": iso(updated),
        }
        if upload.asset_options is not None:
            doc["assetOptions"] = upload.asset_options
        if status == "pending":
            expires = int(now + self.store.config.url_ttl)
            doc["parts"] = [
                {
                    "number": n,
                    "expires": iso(expires),
                    "url": self.part_url(cdn_base, upload.upload_id, n, expires),
                }
                for n in range(1, upload.parts_count + 1)
            ]
        if status == "imported":
            doc["entityId"] = upload.asset_id
        if status == "failed":
            doc["errorMessage"] = upload.error
        return doc

    def create(self, body: Any, cdn_base: str) -> tuple[int, dict[str, Any]]:
        """POST /uploads (multipart image uploads only)."""
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object")
        for field_name in ("url", "civitaiModelUrl", "huggingFaceModelName"):
            if body.get(field_name) is not None:
                raise bad_request(f"{field_name}: the sandbox accepts multipart uploads only")
        name, size, parts = body.get("fileName"), body.get("fileSize"), body.get("parts")
        content_type, kind = body.get("contentType"), body.get("kind")
        if not isinstance(name, str) or not name:
            raise bad_request("fileName is required for a multipart upload")
        if isinstance(size, bool) or not isinstance(size, int | float) or size != int(size):
            raise bad_request("fileSize is required for a multipart upload (bytes)")
        if not 0 < size <= MAX_FILE_BYTES:
            raise bad_request(f"fileSize must be within [1, {MAX_FILE_BYTES}], got {size}")
        if isinstance(parts, bool) or not isinstance(parts, int | float) or parts != int(parts):
            raise bad_request("parts is required for a multipart upload")
        if not 1 <= parts <= MAX_PARTS:
            raise bad_request(f"parts must be within [1, {MAX_PARTS}], got {parts}")
        if not isinstance(content_type, str) or not content_type.startswith("image/"):
            raise bad_request(f"contentType must be an image MIME type, got {content_type!r}")
        if kind not in _KINDS:
            raise bad_request(f"kind must be one of {', '.join(_KINDS)} in the sandbox")
        options = body.get("assetOptions")
        if options is not None:
            if not isinstance(options, dict):
                raise bad_request("assetOptions must be an object")
            parent = options.get("parentId")
            if parent is not None and (
                not isinstance(parent, str) or self.store.find_asset(parent) is None
            ):
                raise not_found(str(parent))
        upload = Upload(
            upload_id=self.store.new_id("upload_", 22),
            file_name=name,
            file_size=int(size),
            content_type=content_type,
            kind=str(kind),
            parts_count=int(parts),
            created=self.store.clock(),
            asset_options=options,
        )
        with self.store.lock:
            self.store.uploads[upload.upload_id] = upload
        return 200, {"upload": self.doc(upload, cdn_base)}

    def retrieve(self, upload_id: str, cdn_base: str) -> tuple[int, dict[str, Any]]:
        """GET /uploads/{uploadId}."""
        return 200, {"upload": self.doc(self._get(upload_id), cdn_base)}

    def action(self, upload_id: str, body: Any, cdn_base: str) -> tuple[int, dict[str, Any]]:
        """POST /uploads/{uploadId}/action {"action": "complete"}: assemble and validate."""
        upload = self._get(upload_id)
        if not isinstance(body, dict) or body.get("action") != "complete":
            raise bad_request('action must be "complete"')
        with self.store.lock:
            if upload.completed_at is not None:  # completing twice changes nothing
                return 200, {"upload": self.doc(upload, cdn_base)}
            missing = [n for n in range(1, upload.parts_count + 1) if n not in upload.parts]
            if missing:
                raise bad_request(f"part {missing[0]} of upload {upload_id} was never uploaded")
            data = b"".join(upload.parts[n] for n in range(1, upload.parts_count + 1))
            upload.parts.clear()
            now = self.store.clock()
            upload.completed_at = now
            upload.ready_at = now + self.store.config.latency_for("upload")
        if len(data) != upload.file_size:
            upload.error = f"received {len(data)} bytes, fileSize announced {upload.file_size}"
        else:
            try:
                asset = self.assets.from_bytes(data, upload.file_name, upload.content_type)
            except ApiProblem:
                upload.error = "the file is not a valid image"
            else:
                parent = (upload.asset_options or {}).get("parentId")
                asset.parent_id = parent if isinstance(parent, str) else None
                upload.asset_id = asset.asset_id
                with self.store.lock:
                    self.store.stats.uploads += 1
        return 200, {"upload": self.doc(upload, cdn_base)}

    def put_part(
        self, upload_id: str, number: str, query: dict[str, list[str]], data: bytes
    ) -> tuple[int, str | None, str | None]:
        """A part PUT to its presigned URL: (status, S3-style XML error or None, ETag)."""
        try:
            part = int(number)
        except ValueError:
            return 404, "NoSuchKey", None
        expires = (query.get("Expires") or [""])[-1]
        sig = (query.get("Signature") or [""])[-1]
        subject = self._subject(upload_id, part)
        if signing.refusal(self.store.signing_key, subject, expires, sig, self.store.clock()):
            return 403, "AccessDenied", None
        with self.store.lock:
            upload = self.store.uploads.get(upload_id)
            if not isinstance(upload, Upload) or upload.completed_at is not None:
                return 404, "NoSuchUpload", None
            if not 1 <= part <= upload.parts_count:
                return 400, "InvalidPart", None
            upload.parts[part] = data
            self.store.stats.upload_parts += 1
        return 200, None, f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'
