"""CloudFront-style signed CDN links: an HMAC over the asset id and the expiry time."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlencode

KEY_PAIR_ID = "K2SANDBOXSANDBOX"


def signature(key: bytes, asset_id: str, expires: int) -> str:
    """The hex HMAC that signs a link to `asset_id` (or any subject) until `expires`."""
    return hmac.new(key, f"{asset_id}:{expires}".encode(), hashlib.sha256).hexdigest()


def signed_url(key: bytes, cdn_base: str, asset_id: str, ext: str, expires: int) -> str:
    """http://HOST/cdn/<assetId>.<ext>?Expires=..&Signature=..&Key-Pair-Id=.."""
    query = urlencode(
        {
            "Expires": expires,
            "Signature": signature(key, asset_id, expires),
            "Key-Pair-Id": KEY_PAIR_ID,
        }
    )
    return f"{cdn_base}/cdn/{asset_id}.{ext}?{query}"


def refusal(key: bytes, asset_id: str, expires: str, given: str, now: float) -> str | None:
    """None if the link is valid at `now`, else why not: "tampered" or "expired"."""
    try:
        expires_at = int(expires)
    except ValueError:
        return "tampered"
    if not hmac.compare_digest(signature(key, asset_id, expires_at), given):
        return "tampered"
    if now > expires_at:
        return "expired"
    return None
