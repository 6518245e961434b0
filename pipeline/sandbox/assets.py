"""Assets: uploads, input resolution, the asset object, get/get-bulk/delete, signed links."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from pipeline.sandbox import images, signing
from pipeline.sandbox.catalog import ApiProblem, bad_request
from pipeline.sandbox.state import Asset, Job, Store, iso

AUTHOR_ID = "5a5d5a0dbeefcafe5a5d5a0dbeefcafe"
OWNER_ID = "team_SandboxSandboxSandbox"
MAX_BULK_IDS = 200
MAX_DELETE_IDS = 100
MIME_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
_EDIT_CAPABILITIES = ["REMOVE_BACKGROUND", "UPSCALE", "DETECTION"]


def not_found(asset_id: str) -> ApiProblem:
    """The 404 the API answers for an unknown or deleted asset id."""
    return ApiProblem(404, f"Asset {asset_id} not found", "NotFoundError")


class Assets:
    """The asset endpoints; `job_status(job)` observes a job (creating its outputs)."""

    def __init__(self, store: Store, job_status: Callable[[Job], str]) -> None:
        self.store = store
        self.job_status = job_status

    # --- signing ------------------------------------------------------------------------
    def signed_url(self, asset_id: str, cdn_base: str, ext: str = "png") -> str:
        """A CloudFront-style signed link to the asset that expires after url_ttl."""
        expires = int(self.store.clock() + self.store.config.url_ttl)
        return signing.signed_url(self.store.signing_key, cdn_base, asset_id, ext, expires)

    def check_signature(self, asset_id: str, expires: str, signature: str) -> str | None:
        """None if the link is valid now, else why not ("tampered" or "expired")."""
        now = self.store.clock()
        return signing.refusal(self.store.signing_key, asset_id, expires, signature, now)

    # --- inputs -------------------------------------------------------------------------
    def resolve_image(self, ref: str) -> Asset:
        """An input image given as an asset id or a data URL (which becomes an asset);
        404 NotFoundError for an unknown or deleted asset id, as the API answers."""
        if ref.startswith("data:"):
            return self.from_data_url(ref, name=None)
        asset = self.store.find_asset(ref)
        if asset is None:
            raise not_found(ref)
        return asset

    def from_data_url(self, data_url: str, name: str | None) -> Asset:
        """A new uploaded asset holding the data URL's image; 400 if it is not one."""
        header, _, payload = data_url.partition(",")
        if not header.startswith("data:") or ";base64" not in header:
            raise bad_request("image must be a base64 data URL (data:image/png;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise bad_request("image is not a valid base64-encoded image") from None
        return self.from_bytes(data, name, header[5:].split(";")[0] or "image/png")

    def from_bytes(self, data: bytes, name: str | None, mime: str) -> Asset:
        """A new uploaded asset holding `data`; 400 if the bytes are not an image."""
        try:
            width, height = images.image_size(data)
        except (ValueError, OSError):
            raise bad_request("image is not a valid base64-encoded image") from None
        asset = Asset(
            asset_id=self.store.new_id("asset_", 22),
            created=self.store.clock(),
            source="uploaded",
            width=width,
            height=height,
            render=lambda: data,
            name=name,
            mime=mime,
        )
        self.store.add_asset(asset, data)
        self.store.asset_bytes(asset)
        return asset

    # --- endpoints ----------------------------------------------------------------------
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
        if parent is not None and (
            not isinstance(parent, str) or not self.store.find_asset(parent)
        ):
            raise not_found(str(parent))
        asset = self.from_data_url(image, name)
        asset.parent_id = parent
        with self.store.lock:
            self.store.stats.uploads += 1
        return 200, {"asset": self.asset_doc(asset, cdn_base)}

    def _status(self, asset: Asset) -> str:
        """success, or pending/error for an output announced before its job ended."""
        job = self.store.jobs.get(asset.job_id or "")
        if job is None or not job.reserved_asset_ids:
            return "success"
        status = self.job_status(job)
        if status == "success":
            return "success"
        return "error" if status in ("failure", "canceled") else "pending"

    def asset_doc(self, asset: Asset, cdn_base: str) -> dict[str, Any]:
        """The API's asset object, with a freshly signed URL."""
        status = self._status(asset)
        size = len(self.store.asset_bytes(asset)) if status == "success" else 0
        mime = asset.mime
        metadata: dict[str, Any] = {
            "kind": "image",
            "type": asset.meta_type or asset.source,
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
            "url": self.signed_url(asset.asset_id, cdn_base, MIME_EXT.get(mime, "png")),
            "mimeType": mime,
            "kind": "image",
            "status": status,
            "source": asset.source,
            "metadata": metadata,
            "properties": {
                "size": size,
                "width": asset.width,
                "height": asset.height,
                "format": MIME_EXT.get(mime, "png"),
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
        asset = self.store.find_asset(asset_id)
        if asset is None:
            raise not_found(asset_id)
        return 200, {"asset": self.asset_doc(asset, cdn_base)}

    def get_bulk(self, body: Any, cdn_base: str) -> tuple[int, dict[str, Any]]:
        """POST /assets/get-bulk: up to 200 ids; unknown and deleted ids are left out."""
        ids = body.get("assetIds") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise bad_request("assetIds must be an array of asset ids")
        if len(ids) > MAX_BULK_IDS:
            raise bad_request(f"assetIds accepts at most {MAX_BULK_IDS} ids, got {len(ids)}")
        found = [a for i in dict.fromkeys(ids) if (a := self.store.find_asset(i)) is not None]
        return 200, {"assets": [self.asset_doc(a, cdn_base) for a in found]}

    def delete(self, body: Any) -> tuple[int, dict[str, Any]]:
        """DELETE /assets {assetIds} (at most 100): the assets vanish from every route and
        the CDN. Ids already gone are ignored, so a retried delete succeeds."""
        ids = body.get("assetIds") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise bad_request("assetIds must be a non-empty array of asset ids")
        if len(ids) > MAX_DELETE_IDS:
            raise bad_request(f"assetIds accepts at most {MAX_DELETE_IDS} ids, got {len(ids)}")
        with self.store.lock:
            for asset_id in ids:
                asset = self.store.find_asset(asset_id)
                if asset is not None:
                    asset.deleted = True
                    self.store.stats.assets_deleted += 1
        return 200, {}
