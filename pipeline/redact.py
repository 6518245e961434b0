"""Values made fit for one-line messages: secrets in URLs hidden, long values cut.

Settings, database URLs and storage URLs are echoed in error messages so the user sees
what was wrong; a password inside one must not be, and a megabyte-long value must not
become a megabyte-long line.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

SHOWN_MAX = 80
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
_TOKEN_SCHEMES = {"http", "https", "s3"}


def shorten(text: str, limit: int = SHOWN_MAX) -> str:
    """One printable line of at most about `limit` characters."""
    clipped = text[: limit + 1]
    printable = "".join(c if c.isprintable() else repr(c)[1:-1] for c in clipped)
    if len(text) > limit or len(printable) > limit:
        return printable[: limit - 1] + "…"
    return printable


def redact_url(url: str) -> str:
    """The URL with its password hidden (and, for http/s3, any userinfo, often a token)."""
    try:
        parts = urlsplit(url)
        password, username = parts.password, parts.username
    except ValueError:
        return _USERINFO.sub("***@", url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    if password is not None:
        userinfo = f"{username or ''}:***"
    elif parts.scheme.lower() in _TOKEN_SCHEMES:
        userinfo = "***"
    else:
        userinfo = username or ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def shown(value: object, *, secret: bool = False, limit: int = SHOWN_MAX) -> str:
    """A setting's value as a message shows it: secrets as ***, URLs redacted, cut short."""
    if secret:
        return "***"
    text = value if isinstance(value, str) else repr(value)
    if "://" in text:
        text = redact_url(text)
    return shorten(text, limit)
