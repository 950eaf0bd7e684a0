"""Operation ids: what makes one usable, the deterministic builder, and deriving one from a
payload with a handler's key extractor.

Private: :mod:`replaysafe.envelope` re-exports every public name here, and that is the path to
import them from.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import Any

from replaysafe.errors import InvalidOperationId

MAX_OPERATION_ID_BYTES = 255

KeyExtractor = Callable[[Any], "str | OperationIdParts"]
OperationIdParts = tuple[str, ...]


def _escape_part(part: str | int) -> str:
    if isinstance(part, bool) or not isinstance(part, str | int):
        raise InvalidOperationId(
            f"operation id parts must be str or int, not {type(part).__name__}; "
            "pass the business field's value"
        )
    # ':' separates parts and '%' escapes: escaping both keeps ("a:b", "c") and ("a", "b:c") apart
    return str(part).replace("%", "%25").replace(":", "%3A")


def operation_id(namespace: str, *parts: str | int) -> str:
    """The deterministic operation id ``namespace:part1:part2…`` of a logical action.

    The same inputs always give the same id (choose them from business fields, never a fresh uuid
    per retry). Parts are escaped so that different tuples never collide.

    >>> operation_id("capture-payment", "order-91827")
    'capture-payment:order-91827'
    """
    if not parts:
        raise InvalidOperationId(
            "operation_id() needs at least one business part after the namespace, "
            "e.g. operation_id('capture-payment', order_id)"
        )
    op = ":".join(_escape_part(p) for p in (namespace, *parts))
    return validate_operation_id(op)


def validate_operation_id(value: object) -> str:
    """Return ``value`` if it is a usable operation id, else raise ``InvalidOperationId``.

    Rules: a non-empty string of at most 255 UTF-8 bytes, no control or format characters, no
    leading or trailing whitespace (invisible differences must not split one operation in two).
    """
    if not isinstance(value, str):
        raise InvalidOperationId(
            f"operation id must be a string, got {type(value).__name__}; "
            "set the rs-operation-id header or give the handler a key extractor"
        )
    if not value:
        raise InvalidOperationId(
            "operation id is empty; set the rs-operation-id header or give the handler a key "
            "extractor that derives it from business fields"
        )
    if len(value.encode("utf-8", "surrogatepass")) > MAX_OPERATION_ID_BYTES:
        raise InvalidOperationId(
            f"operation id is longer than {MAX_OPERATION_ID_BYTES} bytes "
            f"({value[:40]!r}…); derive a shorter id from the business key"
        )
    # fast path: printable text has no control, format or line/paragraph separator characters
    for ch in "" if value.isprintable() else value:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            raise InvalidOperationId(
                f"operation id contains control character U+{ord(ch):04X}: {value[:60]!r}; "
                "use printable characters only"
            )
    if value != value.strip():
        raise InvalidOperationId(
            f"operation id has leading or trailing whitespace: {value!r}; strip it at the producer"
        )
    return value


def _derive_operation_id(key_extractor: KeyExtractor, value: Any, base: str) -> str:
    """The operation id ``key_extractor`` derives from the decoded ``value`` (validated)."""
    try:
        derived = key_extractor(value)
    except Exception as exc:
        # the extractor is user code written for one payload shape: say which shape it got
        raise InvalidOperationId(
            f"the key extractor could not derive an operation id from the payload (content "
            f"type {base}, so it received a {type(value).__name__}): {exc!r}; make it accept "
            "what this content type decodes to (JSON: the decoded value, text/plain: str, "
            "other types: bytes) or fix the producer's content type"
        ) from exc
    if derived is None or derived == ():
        raise InvalidOperationId(
            f"the key extractor returned {derived!r}; return a str or a tuple "
            "(namespace, part, ...) of business fields"
        )
    return validate_operation_id(operation_id(*derived) if isinstance(derived, tuple) else derived)
