"""The pipeline's exceptions, one tree with a transient/permanent split.

    PipelineError
    ├── ConfigError              bad settings or missing credentials (exit 2)
    ├── ManifestError            an invalid manifest; carries every problem (exit 2)
    ├── ServiceUnavailable       broker, database or bucket unreachable (exit 4)
    ├── TransientError           worth retrying later; may carry retry_after seconds
    │   ├── ApiTransientError    429, 5xx, connection reset, timeout
    │   ├── AssetUrlExpired      the CDN refused a signed URL (403): refresh the asset
    │   ├── DownloadIncomplete   a body cut off mid-stream
    │   ├── StorageTransientError
    │   └── DatabaseTransientError
    └── PermanentError           retrying cannot help
        ├── ApiPermanentError    400, 403, 404, 409, 422 with the API's message
        │   └── AuthError        401 (or 403 on the API itself): stops the run
        ├── StorageConflict      an object exists at the key with different bytes
        └── ChecksumMismatch     stored bytes do not match the computed sha256

Third-party errors (httpx, botocore, SQLAlchemy) are translated into these at the module
that talks to them and never leak past it. Messages never contain credentials.
"""

from __future__ import annotations

import re


class PipelineError(Exception):
    """The pipeline failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(PipelineError):
    """The configuration is invalid."""


class ManifestError(PipelineError):
    """The manifest is invalid."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems) or "invalid manifest")


class ServiceUnavailable(PipelineError):
    """A required service could not be reached."""


class TransientError(PipelineError):
    """A transient failure: try again later."""

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(PipelineError):
    """A permanent failure: retrying cannot help."""


class ApiError(PipelineError):
    """The Scenario API answered with an error."""

    status_code: int | None = None
    hint: str | None = None


class ApiTransientError(TransientError, ApiError):
    """The Scenario API is throttling or failing for now."""

    def __init__(
        self,
        message: str | None = None,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        concurrency: bool = False,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.status_code = status_code
        # A generation refused because the plan's parallel-jobs cap is reached: nothing was
        # created or billed, and the rest of the fleet's requests are not to be slowed.
        self.concurrency = concurrency


class ApiPermanentError(PermanentError, ApiError):
    """The Scenario API rejected the request."""

    def __init__(
        self,
        message: str | None = None,
        *,
        status_code: int | None = None,
        name: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.name = name
        self.hint = hint


class AuthError(ApiPermanentError):
    """The Scenario API refused the credentials."""


class AssetUrlExpired(TransientError):
    """The signed asset URL was refused or has expired."""


class DownloadIncomplete(TransientError):
    """The download ended before the whole body arrived."""


class StorageTransientError(TransientError):
    """The storage backend is failing for now."""


class DatabaseTransientError(TransientError):
    """The database is failing for now."""


class StorageConflict(PermanentError):
    """An object with different bytes already exists at this key."""


class ChecksumMismatch(PermanentError):
    """The stored bytes do not match the computed sha256."""


# Values echoed in messages are cut to this many characters: a message stays one readable
# line even when the value is megabytes long.
MESSAGE_VALUE_CHARS = 100


def cut(value: object, limit: int = MESSAGE_VALUE_CHARS) -> str:
    """repr(value) for a message, at most about `limit` characters, cut with an ellipsis."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 300:
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ or a huge number must not hide the real error
        text = f"<a {type(value).__name__}>"
    return shorten(text, limit)


def shorten(text: str, limit: int = MESSAGE_VALUE_CHARS, *, middle: bool = False) -> str:
    """text cut to about `limit` characters with '...'; `middle` keeps both ends."""
    if len(text) <= limit:
        return text
    if middle:
        half = max(1, (limit - 3) // 2)
        return f"{text[:half]}...{text[-half:]}"
    return text[: max(1, limit - 3)] + "..."


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """text with line breaks and control characters escaped, so a message stays one line."""
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)
