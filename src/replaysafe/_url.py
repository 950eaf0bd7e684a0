"""A backend URL's own options: replaysafe's query parameters, taken out before the driver sees
the URL (one grammar: ``?schema=…`` on a PostgreSQL URL, ``?prefix=…`` on a Redis one). Each
backend's ``from_url`` names its options and their types here; the rest of the query stays for
the driver (libpq, redis-py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from replaysafe._redact import redact
from replaysafe.errors import ConfigurationError

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def flag(text: str) -> bool:
    """A boolean query value: 1/true/yes/on or 0/false/no/off (any case)."""
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(text)


def take_options(
    url: str, options: Mapping[str, Callable[[str], Any]], *, what: str
) -> tuple[str, dict[str, Any]]:
    """``url`` without the query parameters named in ``options``, and those parameters converted
    (``options[name](value)``). ``ConfigurationError`` (password redacted) for a value the
    converter refuses or a parameter given twice. A URL without any comes back unchanged."""
    parts = urlsplit(url)
    if not parts.query:
        return url, {}
    kept: list[str] = []
    taken: dict[str, Any] = {}
    for segment in parts.query.split("&"):
        pair = parse_qsl(segment, keep_blank_values=True)
        convert = options.get(pair[0][0]) if pair else None
        if convert is None:
            # the driver's parameter, kept byte for byte: re-encoding would turn libpq's
            # "options=-c%20x%3D1" into "-c+x%3D1", which libpq does not read as a space
            kept.append(segment)
            continue
        name, value = pair[0]
        if name in taken:
            raise ConfigurationError(f"{what} URL {redact(url)} gives {name!r} twice; keep one")
        try:
            taken[name] = convert(value)
        except ValueError:
            kind = getattr(convert, "__name__", "value")
            raise ConfigurationError(
                f"{what} URL {redact(url)}: {name}={value!r} is not a valid {kind}"
            ) from None
    if not taken:
        return url, {}
    return urlunsplit(parts._replace(query="&".join(kept))), taken
