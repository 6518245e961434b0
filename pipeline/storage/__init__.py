"""Where outputs are stored: `open_storage(url)` picks the backend from the URL scheme.

file://./assets            a folder relative to the current directory
file:///srv/assets         an absolute folder
s3://bucket                a bucket (endpoint from `endpoint_url`, e.g. AWS_ENDPOINT_URL)
s3://bucket/some/prefix    keys stored under a prefix
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.errors import ConfigError
from pipeline.storage.base import Storage, StoredObject, validate_key
from pipeline.storage.local import LocalStorage
from pipeline.storage.s3 import S3Storage

__all__ = [
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StoredObject",
    "open_storage",
    "validate_key",
]


def open_storage(
    url: str,
    *,
    public_base_url: str | None = None,
    endpoint_url: str | None = None,
    region_name: str | None = None,
    aws_access_key_id: str | None = None,
    aws_secret_access_key: str | None = None,
) -> Storage:
    """The storage a `file://` or `s3://` URL names; nothing is contacted until first use."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalStorage(_local_root(url), url=url, public_base_url=public_base_url)
    if parts.scheme == "s3":
        if "@" in parts.netloc:
            # Never echo the URL: whatever precedes '@' may be a secret.
            raise ConfigError(
                "storage URL must not contain credentials; use AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY"
            )
        if not parts.netloc:
            raise ConfigError(f"storage URL {url!r} names no bucket (expected s3://bucket/prefix)")
        if parts.query or parts.fragment:
            raise ConfigError(f"storage URL {url!r} must not have a query or fragment")
        return S3Storage(
            parts.netloc,
            unquote(parts.path).strip("/"),
            url=url,
            public_base_url=public_base_url,
            endpoint_url=endpoint_url,
            region_name=region_name,
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
        )
    raise ConfigError(
        f"unsupported storage URL {url!r}: use file:///path, file://./relative or s3://bucket/prefix"
    )


def _local_root(url: str) -> Path:
    parts = urlsplit(url)
    path = unquote(parts.path)
    if parts.netloc in ("", "localhost"):
        if not path:
            raise ConfigError(f"storage URL {url!r} names no folder")
        return Path(path)
    # file://./assets and file://assets: the "host" is the first segment of a relative path.
    return Path(unquote(parts.netloc) + path)
