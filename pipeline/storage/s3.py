"""S3 storage: AWS, MinIO, R2, SeaweedFS and other S3-compatible stores via endpoint_url.

Each object is written with one `PutObject` (atomic: readers see all of it or nothing, and
no multipart parts can be orphaned) carrying `x-amz-checksum-sha256`, so the server itself
rejects a body that was damaged on the way. `If-None-Match: *` makes the write conditional
where the server supports it, so two writers racing on a key cannot replace each other.
Every botocore error is translated here into the pipeline's exceptions.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import (
    ChecksumMismatch,
    ConfigError,
    PermanentError,
    PipelineError,
    ServiceUnavailable,
    StorageConflict,
    StorageTransientError,
    cut,
)
from pipeline.redact import shorten
from pipeline.storage.base import (
    CACHE_CONTROL,
    MAX_KEY_BYTES,
    Spool,
    Storage,
    StoredObject,
    _key_problem,
    sanitize_metadata,
)

_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "OperationAborted",
}
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
    "403",
}
_CHECKSUM_CODES = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"}
_MISSING_KEY_CODES = {"404", "NoSuchKey", "NotFound"}
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_UNSUPPORTED_CODES = {"NotImplemented", "501"}


class S3Storage(Storage):
    """Objects in one bucket, optionally under a key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        url: str | None = None,
        public_base_url: str | None = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = url or f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.public_base_url = public_base_url
        self.endpoint_url = endpoint_url
        self._client_options: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "region_name": region_name,
            "aws_access_key_id": aws_access_key_id,
            "aws_secret_access_key": aws_secret_access_key,
        }
        self._timeouts = (connect_timeout, read_timeout, max_attempts)
        self._client_pid: int | None = None
        self._client_obj: Any = None
        self._lock = threading.Lock()
        # Cleared if the server answers NotImplemented to a conditional write.
        self._conditional_writes = True

    def key_problem(self, key: str) -> str | None:
        """The shared key rules, and S3's 1024-byte limit on the full key (prefix included)."""
        problem = _key_problem(key)
        if problem:
            return problem
        full = self._full_key(key).encode("utf-8", "surrogatepass")
        if len(full) > MAX_KEY_BYTES:
            where = f" with the prefix {cut(self.prefix, 40)}" if self.prefix else ""
            return f"longer than S3's {MAX_KEY_BYTES} bytes{where} ({len(full)} bytes)"
        return None

    def check(self) -> None:
        """HeadBucket: the endpoint answers, the credentials work and the bucket exists."""
        try:
            self._client().head_bucket(Bucket=self.bucket)
        except ConfigError:
            raise  # a client that cannot be built is bad configuration, not an outage
        except Exception as exc:
            error = self._translate(exc, "check", None)
            if isinstance(error, ConfigError):
                raise error from None
            raise ServiceUnavailable(self._unavailable_line(exc, error)) from exc

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
        """Spool and hash the body, then write it with one checksummed PutObject."""
        self.check_key(key)
        spool = Spool.collect(chunks, expected_sha256)
        try:
            if replace and self._put_new(key, spool, content_type, metadata):
                return self._stored(key, spool.sha256, spool.size)
            existing = self.head(key)
            if existing is not None and (existing.sha256 == spool.sha256 or not replace):
                self._same_or_conflict(key, existing, spool.sha256)
                return existing
            # A replaced object's old version stays in the bucket when versioning is on.
            self._put_object(key, spool, content_type, metadata, conditional=existing is None)
            return self._stored(key, spool.sha256, spool.size)
        finally:
            spool.close()

    def _put_new(
        self, key: str, spool: Spool, content_type: str, metadata: Mapping[str, str]
    ) -> bool:
        """Write the object if the key is free, without looking first: most keys are new,
        and a HeadObject costs as much as the write. False (nothing written) when the key
        is taken, or when the server cannot write conditionally; the caller looks then."""
        if not self._conditional_writes:
            return False
        request = self._put_request(key, spool, content_type, metadata)
        try:
            self._client().put_object(**request, IfNoneMatch="*")
            return True
        except Exception as exc:
            code = _error_code(exc)
            if code in _UNSUPPORTED_CODES:
                self._conditional_writes = False
            elif code not in _PRECONDITION_CODES:
                raise self._translate(exc, "write", key) from exc
        spool.file.seek(0)
        return False

    def _put_request(
        self, key: str, spool: Spool, content_type: str, metadata: Mapping[str, str]
    ) -> dict[str, Any]:
        return {
            "Bucket": self.bucket,
            "Key": self._full_key(key),
            "Body": spool.file,
            "ContentLength": spool.size,
            "ContentType": content_type,
            "CacheControl": CACHE_CONTROL,
            "ChecksumSHA256": base64.b64encode(bytes.fromhex(spool.sha256)).decode("ascii"),
            "Metadata": sanitize_metadata(metadata, spool.sha256),
        }

    def _put_object(
        self,
        key: str,
        spool: Spool,
        content_type: str,
        metadata: Mapping[str, str],
        conditional: bool = True,
    ) -> None:
        request = self._put_request(key, spool, content_type, metadata)
        if self._conditional_writes and conditional:
            request["IfNoneMatch"] = "*"
        try:
            self._client().put_object(**request)
        except Exception as exc:
            code = _error_code(exc)
            if code in _PRECONDITION_CODES:
                # Another writer stored this key between our head and our put.
                existing = self.head(key)
                if existing is None:
                    raise StorageTransientError(
                        f"S3 write of {self.uri_for(key)} raced with a delete; try again"
                    ) from exc
                self._same_or_conflict(key, existing, spool.sha256)
                return
            if code in _UNSUPPORTED_CODES and self._conditional_writes:
                self._conditional_writes = False
                spool.file.seek(0)
                self._put_object(key, spool, content_type, metadata, conditional)
                return
            raise self._translate(exc, "write", key) from exc

    def head(self, key: str) -> StoredObject | None:
        """HeadObject; the sha256 comes from the object's metadata or its SHA-256 checksum."""
        self.check_key(key)
        try:
            answer = self._client().head_object(
                Bucket=self.bucket, Key=self._full_key(key), ChecksumMode="ENABLED"
            )
        except Exception as exc:
            if _error_code(exc) in _MISSING_KEY_CODES:
                return None
            raise self._translate(exc, "read", key) from exc
        size = int(answer.get("ContentLength", 0))
        sha256 = _sha256_of(answer) or self._hash_body(key)
        return self._stored(key, sha256, size)

    def read_metadata(self, key: str) -> dict[str, str] | None:
        """The x-amz-meta-* lineage stored with key, or None."""
        self.check_key(key)
        try:
            answer = self._client().head_object(Bucket=self.bucket, Key=self._full_key(key))
        except Exception as exc:
            if _error_code(exc) in _MISSING_KEY_CODES:
                return None
            raise self._translate(exc, "read", key) from exc
        return dict(answer.get("Metadata") or {})

    def delete(self, key: str) -> None:
        """DeleteObject (S3 treats a missing key as success)."""
        self.check_key(key)
        try:
            self._client().delete_object(Bucket=self.bucket, Key=self._full_key(key))
        except Exception as exc:
            raise self._translate(exc, "delete", key) from exc

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """ListObjectsV2 under the storage prefix, in S3's (sorted) order."""
        base = self._full_key("")
        try:
            pages = self._client().get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.bucket, Prefix=base + prefix):
                for item in page.get("Contents", ()):
                    yield str(item["Key"])[len(base) :]
        except Exception as exc:
            raise self._translate(exc, "list", prefix or None) from exc

    def uri_for(self, key: str) -> str:
        """s3://bucket/prefix/key."""
        return f"s3://{self.bucket}/{self._full_key(key)}"

    def key_from_uri(self, uri: str) -> str | None:
        """Inverse of uri_for; None for other buckets or outside the prefix."""
        parts = urlsplit(uri)
        if parts.scheme != "s3" or parts.netloc != self.bucket:
            return None
        full = parts.path.lstrip("/")
        base = self._full_key("")
        if not full.startswith(base):
            return None
        key = full[len(base) :]
        return None if _key_problem(key) else key

    def _full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _same_or_conflict(self, key: str, existing: StoredObject, sha256: str) -> None:
        if existing.sha256 != sha256:
            raise StorageConflict(
                f"{self.uri_for(key)} already holds different bytes "
                f"(sha256 {existing.sha256}, refusing {sha256})"
            )

    def _hash_body(self, key: str) -> str:
        """Stream an object without our metadata (written by someone else) to hash it."""
        try:
            body = self._client().get_object(Bucket=self.bucket, Key=self._full_key(key))["Body"]
            digest = hashlib.sha256()
            for chunk in body.iter_chunks(1024 * 1024):
                digest.update(chunk)
            return digest.hexdigest()
        except Exception as exc:
            raise self._translate(exc, "read", key) from exc

    def _client(self) -> Any:
        """The boto3 client of this process, built on first use (never shared across fork)."""
        pid = os.getpid()
        if self._client_obj is None or self._client_pid != pid:
            with self._lock:
                if self._client_obj is None or self._client_pid != pid:
                    self._client_obj = self._build_client()
                    self._client_pid = pid
        return self._client_obj

    def _build_client(self) -> Any:
        import boto3
        from botocore.config import Config

        connect_timeout, read_timeout, max_attempts = self._timeouts
        config = Config(
            # boto3 >= 1.36 adds CRC checksums that MinIO, R2 and SeaweedFS reject; we send
            # our own SHA-256 instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        options = {name: value for name, value in self._client_options.items() if value}
        try:
            # A fresh session per client: boto3's default session is not fork- or thread-safe.
            return boto3.session.Session().client("s3", config=config, **options)
        except Exception as exc:
            what = f"AWS_ENDPOINT_URL={shorten(self._where())}" if self.endpoint_url else "S3"
            raise ConfigError(
                f"{what}: cannot configure the S3 client: {type(exc).__name__}"
            ) from None

    def _where(self) -> str:
        if not self.endpoint_url:
            return "the default AWS endpoint"
        parts = urlsplit(self.endpoint_url)
        # Drop any user:password@ from the endpoint before it goes into a message.
        host = parts.netloc.rsplit("@", 1)[-1]
        return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else host

    def _translate(self, exc: Exception, action: str, key: str | None) -> PipelineError:
        """A one-line pipeline error for a botocore failure; never includes credentials."""
        if isinstance(exc, PipelineError):
            return exc
        target = self.uri_for(key) if key is not None else f"s3://{self.bucket}"
        code = _error_code(exc)
        status = _http_status(exc)
        kind = type(exc).__name__
        if code is None:
            return _translate_client_side(exc, kind, f"S3 {action} {target} at {self._where()}")
        if code in _CHECKSUM_CODES:
            return ChecksumMismatch(f"S3 rejected the body of {target}: {code} (sha256 mismatch)")
        if code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
            return StorageTransientError(f"S3 {action} {target} failed for now: {code} ({status})")
        if code == "NoSuchBucket" or (code == "404" and key is None):
            return PermanentError(f"S3 bucket {self.bucket!r} does not exist at {self._where()}")
        if code in _AUTH_CODES:
            return PermanentError(
                f"S3 refused to {action} {target}: {code} (check the AWS credentials and the "
                "bucket policy)"
            )
        return PermanentError(f"S3 {action} {target} failed: {code} ({status})")

    def _unavailable_line(self, exc: Exception, error: PipelineError) -> str:
        code = _error_code(exc)
        if code in ("NoSuchBucket", "404"):
            return f"S3 bucket {self.bucket!r} does not exist at {self._where()}"
        if code in _AUTH_CODES:
            return (
                f"S3 refused access to bucket {self.bucket!r} at {self._where()}: {code} "
                "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            )
        if isinstance(error, StorageTransientError):
            setting = " (AWS_ENDPOINT_URL)" if self.endpoint_url else ""
            return (
                f"cannot reach the bucket s3://{self.bucket} at {self._where()}{setting}: {error}"
            )
        return str(error)


def _translate_client_side(exc: Exception, kind: str, what: str) -> PipelineError:
    # Imported lazily so importing the pipeline never imports botocore.
    from botocore import exceptions as boto

    if isinstance(exc, boto.NoCredentialsError | boto.PartialCredentialsError):
        return ConfigError(
            f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    if isinstance(exc, boto.ParamValidationError):
        return PermanentError(f"{what}: invalid request ({kind})")
    if isinstance(exc, boto.EndpointConnectionError | boto.ConnectionClosedError):
        return StorageTransientError(f"{what}: cannot connect ({kind})")
    if isinstance(exc, boto.ConnectTimeoutError | boto.ReadTimeoutError):
        return StorageTransientError(f"{what}: timed out ({kind})")
    if isinstance(exc, boto.BotoCoreError | OSError):
        return StorageTransientError(f"{what}: {kind}")
    return StorageTransientError(f"{what}: unexpected {kind}")


def _error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    return str(code) if code else None


def _http_status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status else None


def _sha256_of(answer: Mapping[str, Any]) -> str | None:
    """The object's sha256 from our metadata, else from its SHA-256 checksum."""
    stored = str((answer.get("Metadata") or {}).get("sha256", "")).lower()
    if len(stored) == 64 and all(c in "0123456789abcdef" for c in stored):
        return stored
    checksum = answer.get("ChecksumSHA256")
    # A checksum with a "-N" suffix covers multipart parts, not the whole body.
    if isinstance(checksum, str) and "-" not in checksum:
        try:
            raw = base64.b64decode(checksum, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(raw) == 32:
            return raw.hex()
    return None
