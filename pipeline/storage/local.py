"""Local-folder storage: the embedded default.

Layout under the root folder:
    <key>                      the output files, exactly where users expect them
    .meta/<key>.json           sha256, size, content type and lineage (so `head` is cheap)
    .staging/                  temp files being written; linked into place when complete

A file is written to `.staging`, fsynced, then hard-linked to its key: the link fails if
the key exists, so two writers can never silently replace each other's bytes, and a
reader never sees a partial file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.errors import ServiceUnavailable, StorageConflict, StorageTransientError, cut
from pipeline.storage.base import (
    Storage,
    StoredObject,
    _key_problem,
    check_expected,
    copy_hashing,
)

STAGING = ".staging"
META = ".meta"
SIDECAR_SUFFIX = ".json"

# Linux limits: one path segment (NAME_MAX) and a whole path (PATH_MAX, with its NUL).
MAX_SEGMENT_BYTES = 255
MAX_PATH_BYTES = 4095

# Filesystems without hard links (some FUSE and SMB mounts) answer with these.
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV}


class LocalStorage(Storage):
    """Objects as files under a root folder, with metadata sidecars under `.meta/`."""

    def __init__(
        self, root: str | Path, *, url: str | None = None, public_base_url: str | None = None
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = url or self.root.as_uri()
        self.public_base_url = public_base_url
        # <root>/.meta/<key>.json is the longest path a key makes.
        self._meta_bytes = len(f"{self.root.as_posix()}/{META}/{SIDECAR_SUFFIX}".encode())

    def key_problem(self, key: str) -> str | None:
        """The shared key rules, plus what the filesystem refuses (segment and path lengths)."""
        problem = _key_problem(key)
        if problem:
            return problem
        size = len(key.encode("utf-8", "surrogatepass"))
        if size + self._meta_bytes > MAX_PATH_BYTES:
            return f"the path under {cut(str(self.root), 40)} is longer than {MAX_PATH_BYTES} bytes"
        if size + len(SIDECAR_SUFFIX) <= MAX_SEGMENT_BYTES:
            return None  # no segment can be too long
        for segment in key.split("/"):
            if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
                return (
                    f"a path segment is longer than {MAX_SEGMENT_BYTES} bytes ({cut(segment, 40)})"
                )
        # The metadata sidecar adds a suffix to the last segment, and lives under .meta/.
        last = key.rsplit("/", 1)[-1] + SIDECAR_SUFFIX
        if len(last.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            return (
                f"the last path segment is longer than {MAX_SEGMENT_BYTES - len(SIDECAR_SUFFIX)} "
                f"bytes (its metadata file adds {SIDECAR_SUFFIX!r})"
            )
        return None

    def check(self) -> None:
        """Create the folder if needed and prove a file can be written there."""
        try:
            staging = self._staging()
            fd, probe = tempfile.mkstemp(dir=staging, prefix="check-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ServiceUnavailable(
                f"storage folder {self.root} is not writable: {exc.strerror or exc}"
            ) from exc

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
        """Stream chunks to a staged file, then link it into place (or replace, if asked)."""
        self.check_key(key)
        try:
            fd, temp = tempfile.mkstemp(dir=self._staging(), prefix="put-")
        except OSError as exc:
            raise _transient("stage", key, exc) from exc
        try:
            with os.fdopen(fd, "wb") as out:
                # Errors raised by the chunks themselves (a failed download) pass through.
                sha256, size = copy_hashing(chunks, out)
                try:
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise _transient("write", key, exc) from exc
            check_expected(sha256, expected_sha256)
            return self._place(key, temp, sha256, size, content_type, metadata, replace)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    def _place(
        self,
        key: str,
        temp: str,
        sha256: str,
        size: int,
        content_type: str,
        metadata: Mapping[str, str],
        replace: bool = False,
    ) -> StoredObject:
        """Link a complete staged file to key unless the key already holds an object."""
        target = self._path(key)
        try:
            existing = self.head(key)
            if existing is not None and existing.sha256 != sha256 and replace:
                os.replace(temp, target)  # atomic: readers see the old file or the new
                _fsync_dir(target.parent)
                self._write_sidecar(key, sha256, size, content_type, metadata)
                return self._stored(key, sha256, size)
            if existing is None:
                target.parent.mkdir(parents=True, exist_ok=True)
                if self._link_into_place(temp, target):
                    _fsync_dir(target.parent)
                else:
                    # Another writer won the race between our head and our link, or the
                    # key names something that is not a file (a folder of other keys).
                    existing = self.head(key)
                    if existing is None:
                        raise FileExistsError(errno.EEXIST, "not a regular file", str(target))
            if existing is not None:
                self._same_or_conflict(key, existing, sha256)
                if not self._sidecar_path(key).exists():
                    self._write_sidecar(key, existing.sha256, existing.size, content_type, metadata)
                return existing
            self._write_sidecar(key, sha256, size, content_type, metadata)
            return self._stored(key, sha256, size)
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
            raise StorageConflict(f"{self.uri_for(key)} collides with an existing path") from exc
        except OSError as exc:
            raise _transient("write", key, exc) from exc

    def head(self, key: str) -> StoredObject | None:
        """The stored file at key; the sha256 comes from its sidecar or is recomputed."""
        self.check_key(key)
        path = self._path(key)
        try:
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _transient("stat", key, exc) from exc
        if not path.is_file():
            return None
        sidecar = self._read_sidecar(key)
        if sidecar is not None and sidecar.get("size") == stat.st_size:
            return self._stored(key, str(sidecar["sha256"]), stat.st_size)
        try:
            # No trustworthy sidecar (crash between link and sidecar write): hash the file.
            with path.open("rb") as file:
                sha256 = hashlib.file_digest(file, "sha256").hexdigest()
        except OSError as exc:
            raise _transient("read", key, exc) from exc
        return self._stored(key, sha256, stat.st_size)

    def read_metadata(self, key: str) -> dict[str, str] | None:
        """The lineage metadata stored with key, or None."""
        sidecar = self._read_sidecar(self.check_key(key))
        if sidecar is None:
            return None
        stored = sidecar.get("metadata")
        return {str(k): str(v) for k, v in stored.items()} if isinstance(stored, dict) else {}

    def delete(self, key: str) -> None:
        """Remove the file and its sidecar."""
        self.check_key(key)
        try:
            self._path(key).unlink(missing_ok=True)
            self._sidecar_path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise _transient("delete", key, exc) from exc

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys under the root that start with prefix, sorted; hidden folders excluded."""
        start = self.root
        if "/" in prefix:
            folder = prefix.rsplit("/", 1)[0]
            if _key_problem(folder):
                return  # no key can start with this prefix (and it must not escape the root)
            start = self.root.joinpath(*folder.split("/"))
        keys: list[str] = []
        try:
            for folder, dirnames, filenames in os.walk(start):
                if Path(folder) == self.root:
                    dirnames[:] = [d for d in dirnames if d not in (STAGING, META)]
                relative = Path(folder).relative_to(self.root).as_posix()
                base = "" if relative == "." else relative + "/"
                keys.extend(base + name for name in filenames if (base + name).startswith(prefix))
        except OSError as exc:
            raise _transient("list", prefix, exc) from exc
        yield from sorted(keys)

    def uri_for(self, key: str) -> str:
        """file:// URI of the stored file."""
        return (self.root / key).as_uri()

    def key_from_uri(self, uri: str) -> str | None:
        """Inverse of uri_for; None for URIs outside this root."""
        parts = urlsplit(uri)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            return None
        path = unquote(parts.path)
        root = self.root.as_posix().rstrip("/") + "/"
        if not path.startswith(root):
            return None
        key = path[len(root) :]
        return None if _key_problem(key) else key

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _sidecar_path(self, key: str) -> Path:
        return self.root.joinpath(META, *key.split("/")).with_name(key.rsplit("/", 1)[-1] + ".json")

    def _staging(self) -> Path:
        staging = self.root / STAGING
        staging.mkdir(parents=True, exist_ok=True)
        return staging

    def _link_into_place(self, temp: str, target: Path) -> bool:
        """Link temp to target; False if target already exists."""
        try:
            os.link(temp, target)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
        # No hard links here: fall back to a rename, checking for a winner just before.
        if target.exists():
            return False
        os.replace(temp, target)
        return True

    def _same_or_conflict(self, key: str, existing: StoredObject, sha256: str) -> None:
        if existing.sha256 != sha256:
            raise StorageConflict(
                f"{self.uri_for(key)} already holds different bytes "
                f"(sha256 {existing.sha256}, refusing {sha256})"
            )

    def _read_sidecar(self, key: str) -> dict[str, object] | None:
        try:
            data = json.loads(self._sidecar_path(key).read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("sha256"), str) else None

    def _write_sidecar(
        self, key: str, sha256: str, size: int, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        sidecar = self._sidecar_path(key)
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "key": key,
            "sha256": sha256,
            "size": size,
            "content_type": content_type,
            "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metadata": {str(k): str(v) for k, v in metadata.items()},
        }
        fd, temp = tempfile.mkstemp(dir=self._staging(), prefix="meta-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(body, out, indent=2, sort_keys=True)
            os.replace(temp, sidecar)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


def _fsync_dir(path: Path) -> None:
    # Make the new directory entry durable, not only the file's bytes.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _transient(action: str, key: str, exc: OSError) -> StorageTransientError:
    return StorageTransientError(
        f"local storage could not {action} {cut(key)}: {exc.strerror or exc}"
    )
