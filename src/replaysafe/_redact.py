"""Secrets out of reprs, logs and errors: one redaction for every URL and DSN the library takes.

Handles ``scheme://user:password@host…`` (user info), ``?password=…`` query parameters and
libpq's ``key=value`` form (``password='…'``). The password becomes ``***``; the rest stays so the
message still says which server it was about.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:\\.|[^'\\])*'|\S+)", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"((?:^|&)password=)[^&]*", re.IGNORECASE)


def redact(url: str) -> str:
    """``url`` (or a ``key=value`` DSN) with its password replaced by ``***``.

    >>> redact("amqp://guest:s3cret@127.0.0.1:5672/")
    'amqp://guest:***@127.0.0.1:5672/'
    >>> redact("host=db user=app password='s e c' dbname=orders")
    'host=db user=app password=*** dbname=orders'
    >>> redact("redis://127.0.0.1:6379/0?password=x")
    'redis://127.0.0.1:6379/0?password=***'
    """
    if "://" not in url:
        return _KV_PASSWORD.sub(r"\1***", url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostinfo}" if colon else parts.netloc
    query = _QUERY_PASSWORD.sub(r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def secrets_of(url: str) -> list[str]:
    """Every spelling of ``url``'s password (raw and percent-decoded), to scrub from driver
    messages that echo them back."""
    found: list[str] = []
    if "://" in url:
        try:
            parts = urlsplit(url)
        except ValueError:
            return [url]  # cannot tell where the password is: scrub the whole string
        userinfo, at, _ = parts.netloc.rpartition("@")
        if at and ":" in userinfo:
            found.append(userinfo.partition(":")[2])
        found += [m.group(0).split("=", 1)[1] for m in _QUERY_PASSWORD.finditer(parts.query)]
    else:
        found += [m.group(2).strip("'") for m in _KV_PASSWORD.finditer(url)]
    # a query's '+' is a space to drivers that parse it as a form (redis-py does)
    found += [d for s in found for d in (unquote(s), unquote_plus(s))]
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` (a driver's message) with each of ``secrets`` replaced by ``***``, in the order
    given: pass :func:`secrets_of`'s list (longest first, so a password containing another
    spelling of itself goes whole).

    >>> scrub("auth failed for 'p@ss'", secrets_of("redis://u:p%40ss@h/0"))
    "auth failed for '***'"
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
