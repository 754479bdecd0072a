"""Keeps credentials out of logs, errors, metrics and messages."""

from __future__ import annotations


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`.

    Parsed by hand rather than with urlsplit: a password holding an unencoded
    '/', '?', '#' or '@' makes urlsplit take part of it for the path, and the
    password would leak. Everything between '//' and the last '@' is taken for
    userinfo, which errs on the side of hiding too much.
    """
    head, at, host = url.rpartition("@")
    if not at:
        return url
    slashes = head.find("//")
    prefix, userinfo = (head[: slashes + 2], head[slashes + 2 :]) if slashes >= 0 else ("", head)
    user, colon, _password = userinfo.partition(":")
    return f"{prefix}{user}:***@{host}" if colon else url
