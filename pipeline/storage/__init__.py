"""Where outputs are stored: `open_storage(url)` picks the backend from the URL scheme.

file://./assets            a folder relative to the current directory
file:///srv/assets         an absolute folder
s3://bucket                a bucket (endpoint from `endpoint_url`, e.g. AWS_ENDPOINT_URL)
s3://bucket/some/prefix    keys stored under a prefix
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.errors import ConfigError
from pipeline.redact import shorten
from pipeline.storage.base import Storage, StoredObject, validate_key
from pipeline.storage.local import LocalStorage
from pipeline.storage.s3 import S3Storage

__all__ = [
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StoredObject",
    "endpoint_url_problem",
    "http_url_problem",
    "open_storage",
    "url_problem",
    "validate_key",
]

# Bucket names as S3-compatible stores accept them (AWS's rule, plus legacy capitals and _).
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a storage URL, without echoing it (it may hold a secret), or None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a URL (expected file:///path, file://./relative or s3://bucket/prefix)"
    if parts.scheme == "file":
        if parts.query or parts.fragment:
            return "a file:// URL must not have a query or fragment"
        if parts.netloc in ("", "localhost") and not unquote(parts.path):
            return "names no folder"
        return None
    if parts.scheme == "s3":
        if "@" in parts.netloc:
            return "must not contain credentials; use AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        if not parts.netloc:
            return "names no bucket (expected s3://bucket/prefix)"
        if not _BUCKET.fullmatch(parts.netloc):
            return (
                f"{shorten(parts.netloc, 70)!r} is not a bucket name "
                "(3-63 letters, digits, dots and hyphens)"
            )
        if parts.query or parts.fragment:
            return "must not have a query or fragment"
        return None
    return (
        "unsupported storage URL scheme: use file:///path, file://./relative or s3://bucket/prefix"
    )


def http_url_problem(url: str, example: str | None = None) -> str | None:
    """Why `url` cannot be an http(s) service URL, or None (for settings and endpoints)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "not a valid URL" + (f" (expected e.g. {example})" if example else "")
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "names no host"
    if port == 0:
        return "port 0 is not a port"
    if any(c.isspace() or not c.isprintable() for c in url):
        return "must not contain spaces or control characters"
    return None


def endpoint_url_problem(url: str) -> str | None:
    """Why `url` cannot be an S3 endpoint (AWS_ENDPOINT_URL), or None."""
    return http_url_problem(url, example="http://127.0.0.1:9000")


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
    problem = url_problem(url)
    if problem:
        # Never echo a URL with '@' in it: whatever precedes it may be a secret.
        shown_url = "" if "@" in url else f" {shorten(url)!r}"
        raise ConfigError(f"storage URL{shown_url}: {problem}")
    if endpoint_url is not None:
        endpoint_problem = endpoint_url_problem(endpoint_url)
        if endpoint_problem:
            raise ConfigError(f"AWS_ENDPOINT_URL={shorten(endpoint_url)}: {endpoint_problem}")
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalStorage(_local_root(url), url=url, public_base_url=public_base_url)
    if parts.scheme == "s3":
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
    raise AssertionError("unreachable: url_problem() accepts only file:// and s3://")


def _local_root(url: str) -> Path:
    parts = urlsplit(url)
    path = unquote(parts.path)
    if parts.netloc in ("", "localhost"):
        return Path(path)
    # file://./assets and file://assets: the "host" is the first segment of a relative path.
    return Path(unquote(parts.netloc) + path)
