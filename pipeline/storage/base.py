"""The storage interface shared by the local-folder and S3 backends.

`put` is idempotent for the same bytes, so a repeated collect is free. Different bytes at an
existing key are refused (StorageConflict) unless the caller asks to replace them: a
manifest item whose prompt changed gets its new image at the same key, while the old
version stays in the lineage database (and, on S3, in the bucket's versions when versioning
is on). Every write is atomic: a reader sees the old bytes or the new, never a mix.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO
from urllib.parse import quote

from pipeline.errors import ChecksumMismatch, PermanentError, StorageTransientError, cut

# A key's bytes change only when its manifest item changes: a CDN may serve a cached copy
# for a day, then revalidates.
CACHE_CONTROL = "public, max-age=86400"

# Bodies up to this size stay in memory while streaming; larger ones spill to a temp file.
SPOOL_MEMORY_LIMIT = 8 * 1024 * 1024

# Hidden top-level folders the local backend keeps beside the outputs; no key may use them.
RESERVED_PREFIXES = (".staging", ".meta")

MAX_KEY_BYTES = 1024

# S3 caps all user metadata (keys and values) at 2 KB; keep well under it.
MAX_METADATA_BYTES = 1800
MAX_METADATA_VALUE = 512

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_METADATA_KEY = re.compile(r"[^a-z0-9_-]+")


@dataclass(frozen=True)
class StoredObject:
    """One stored object and what identifies its bytes."""

    uri: str
    key: str
    sha256: str
    size: int
    public_url: str | None


class Storage(ABC):
    """Where outputs go: a local folder or an S3 bucket (optionally under a prefix)."""

    url: str
    public_base_url: str | None

    @abstractmethod
    def check(self) -> None:
        """Verify the storage is reachable and writable; raise ServiceUnavailable if not."""

    @abstractmethod
    def put(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        content_type: str,
        metadata: Mapping[str, str],
        expected_sha256: str | None = None,
        replace: bool = False,
    ) -> StoredObject:
        """Stream chunks into the object at key and return what was stored.

        Different bytes already at key raise StorageConflict, unless `replace`.
        """

    @abstractmethod
    def head(self, key: str) -> StoredObject | None:
        """The object stored at key, or None."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object at key; a missing object is not an error."""

    @abstractmethod
    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Every stored key that starts with prefix, in sorted order."""

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """The URI naming the object at key."""

    @abstractmethod
    def key_from_uri(self, uri: str) -> str | None:
        """The key a URI of this storage names, or None if it names something else."""

    def key_problem(self, key: str) -> str | None:
        """Why this storage would refuse key, or None; pure string rules, no I/O.

        `pipeline validate` applies it to every output key, so nothing is paid for and then
        refused; put/head apply it too (check_key), so a refusal is permanent and named.
        """
        return _key_problem(key)

    def check_key(self, key: str) -> str:
        """Return key if this storage accepts it; raise PermanentError naming why not."""
        problem = self.key_problem(key)
        if problem:
            raise PermanentError(f"invalid storage key {cut(key)}: {problem}")
        return key

    def verify(self, key: str, sha256: str) -> bool:
        """True when an object exists at key with exactly this sha256."""
        found = self.head(key)
        return found is not None and found.sha256 == sha256.lower()

    def public_url_for(self, key: str) -> str | None:
        """The CDN URL of key when a public base URL is configured."""
        if not self.public_base_url:
            return None
        return self.public_base_url.rstrip("/") + "/" + key

    def _stored(self, key: str, sha256: str, size: int) -> StoredObject:
        return StoredObject(
            uri=self.uri_for(key),
            key=key,
            sha256=sha256,
            size=size,
            public_url=self.public_url_for(key),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def validate_key(key: str) -> str:
    """Return key if it is a safe relative object key; raise PermanentError otherwise."""
    problem = _key_problem(key)
    if problem:
        raise PermanentError(f"invalid storage key {cut(key)}: {problem}")
    return key


def _key_problem(key: object) -> str | None:
    if not isinstance(key, str) or not key:
        return "must be a non-empty string"
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return f"longer than {MAX_KEY_BYTES} bytes"
    if "\\" in key:
        return "backslashes are not allowed"
    if _CONTROL.search(key):
        return "control characters are not allowed"
    if key.startswith("/"):
        return "must be relative (no leading '/')"
    segments = key.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return "empty, '.' and '..' path segments are not allowed"
    if segments[0] in RESERVED_PREFIXES:
        return f"{cut(segments[0], 40)} is reserved for the storage's own files"
    return None


class Spool:
    """A streamed body, hashed while it is written to a spooled temporary file."""

    def __init__(self, file: IO[bytes], sha256: str, size: int) -> None:
        self.file = file
        self.sha256 = sha256
        self.size = size

    @classmethod
    def collect(cls, chunks: Iterable[bytes], expected_sha256: str | None = None) -> Spool:
        """Consume chunks into a spool; raise ChecksumMismatch if expected_sha256 differs."""
        file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_LIMIT)  # noqa: SIM115
        try:
            sha256, size = copy_hashing(chunks, file)
            check_expected(sha256, expected_sha256)
            file.seek(0)
        except BaseException:
            file.close()
            raise
        return cls(file, sha256, size)

    def close(self) -> None:
        """Release the memory or temp file behind the spool."""
        self.file.close()


def copy_hashing(chunks: Iterable[bytes], out: IO[bytes]) -> tuple[str, int]:
    """Write chunks to out; return their sha256 (hex) and total size."""
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        if not chunk:
            continue
        digest.update(chunk)
        try:
            out.write(chunk)
        except OSError as exc:
            # A full or failing disk under the spool or staging file: worth retrying later.
            raise StorageTransientError(f"cannot buffer the body: {exc.strerror or exc}") from exc
        size += len(chunk)
    return digest.hexdigest(), size


def check_expected(sha256: str, expected_sha256: str | None) -> None:
    """Raise ChecksumMismatch when an expected sha256 was given and differs."""
    if expected_sha256 is not None and expected_sha256.lower() != sha256:
        raise ChecksumMismatch(
            f"sha256 mismatch: expected {expected_sha256.lower()}, received {sha256}"
        )


def sanitize_metadata(metadata: Mapping[str, str], sha256: str) -> dict[str, str]:
    """Metadata safe for S3 headers: lowercase keys, printable ASCII values, under 2 KB.

    Non-ASCII values (prompts) are percent-encoded and long ones truncated with '...';
    the sha256 always comes first so it is never the entry that gets cut.
    """
    clean = {"sha256": sha256}
    used = len("sha256") + len(sha256)
    for raw_key, raw_value in metadata.items():
        key = _METADATA_KEY.sub("-", str(raw_key).strip().lower()).strip("-")
        if not key or key in clean:
            continue
        value = _ascii_value(str(raw_value))
        room = min(MAX_METADATA_VALUE, MAX_METADATA_BYTES - used - len(key))
        if room < 8:
            break
        if len(value) > room:
            value = value[: room - 3] + "..."
        clean[key] = value
        used += len(key) + len(value)
    return clean


def _ascii_value(value: str) -> str:
    if value.isascii() and value.isprintable():
        return value
    # Percent-encoding keeps every character recoverable within what HTTP headers allow.
    return quote(value, safe=" !\"#$&'()*+,-./:;<=>?@[]^_`{|}~")
