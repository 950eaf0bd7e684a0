"""Free text and handler names as every ledger stores them: the one escaping of text from outside
(:func:`storable_text`), the cut of pause texts and the check of handler names.

Private: :mod:`replaysafe.ledger.base` re-exports every public name here, and that is the path to
import them from.
"""

from __future__ import annotations

import re
from typing import Final, overload

from replaysafe.errors import ConfigurationError

#: longest handler name, pause reason and pause author the ledger stores (UTF-8 bytes)
MAX_HANDLER_NAME = 255
MAX_PAUSE_TEXT = 1000


def check_handler_name(handler: object) -> str:
    """``handler`` if it can name a handler in the ledger's control flags, else
    ``ConfigurationError``: a non-empty string of at most :data:`MAX_HANDLER_NAME` UTF-8 bytes
    without control characters (every backend stores exactly this)."""
    if (
        not isinstance(handler, str)
        or not handler
        or len(handler.encode("utf-8", "surrogatepass")) > MAX_HANDLER_NAME
        or any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 or 0xD800 <= ord(ch) < 0xE000
               for ch in handler)
    ):  # fmt: skip
        raise ConfigurationError(
            f"handler name {handler!r} cannot be paused or resumed: use the handler's registered "
            f"name (1-{MAX_HANDLER_NAME} bytes, no control characters); "
            "`replaysafe handler list MODULE:APP` shows them"
        )
    return handler


#: what no store can hold in a text column: NUL (PostgreSQL refuses it, SQLite's SQL functions
#: stop at it) and lone surrogates (no UTF-8 encoding: the drivers raise before sending)
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")


def _escape_unstorable(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:
        # surrogateescape's stand-in for a byte that was not UTF-8: show the byte itself
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


@overload
def storable_text(text: str) -> str: ...
@overload
def storable_text(text: None) -> None: ...


def storable_text(text: str | None) -> str | None:
    """``text`` as every ledger stores free text that comes from outside (content types,
    details, error texts, pause reasons): unchanged unless it holds a NUL or a lone surrogate,
    each of which becomes a backslash escape (``\\x00``; ``\\xff`` for a byte that was not
    UTF-8 and reached Python as a ``surrogateescape`` surrogate; ``\\ud800`` for any other lone
    surrogate). None stays None.

    One-way on purpose: the stored text is what an operator reads (``quarantine show``,
    ``inspect``), identical on every backend, and valid in every store's text columns. Keys
    (scope, operation id), fingerprints, owners and results are never escaped (an escape could
    make two keys one): a backend that cannot hold one verbatim refuses it with
    ``LedgerDataError``."""
    if text is None or (text.isascii() and "\x00" not in text):  # the common case: no regex
        return text
    return _UNSTORABLE.sub(_escape_unstorable, text)


def pause_text(text: str) -> str:
    """``text`` made storable (:func:`storable_text`) and cut to at most
    :data:`MAX_PAUSE_TEXT` UTF-8 bytes (never inside a character)."""
    raw = storable_text(text).encode("utf-8")[:MAX_PAUSE_TEXT]
    return raw.decode("utf-8", "ignore")
