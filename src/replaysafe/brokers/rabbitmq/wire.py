"""The adapter's wire format on AMQP: its own headers, and AMQP field values read as text.

Body = the payload bytes; ``content_type`` = the envelope's content type; ``message_id`` = the
operation id; ``timestamp`` = the publish time; headers = :meth:`Envelope.wire_headers` plus
``x-replaysafe-key``. What a plain AMQP client may send instead (ints, bools, bytes, timestamps,
undecodable bytes) is rendered as text here, never raised on.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from replaysafe.envelope import RESERVED_HEADERS

__all__ = ["ATTEMPTS_HEADER", "KEY_HEADER"]

#: the ordering key of the envelope (AMQP has no key of its own; the routing key is rewritten on
#: the retry hop, a header survives it)
KEY_HEADER = "x-replaysafe-key"
#: deliveries a message had before it went through a retry queue (a retry copy is a new message
#: to RabbitMQ, whose x-delivery-count starts again at 0)
ATTEMPTS_HEADER = "x-replaysafe-attempts"
#: broker bookkeeping kept out of ``Delivery.headers`` (they are in ``amqp_headers``)
_TRANSPORT_HEADERS = frozenset(
    {KEY_HEADER, ATTEMPTS_HEADER, "x-delivery-count", "x-acquired-count", "x-death"}
)
_TRANSPORT_PREFIXES = ("x-first-death-", "x-last-death-")
#: the wire format's own headers, in a stable order (for the findings of undecodable values)
_RESERVED_SORTED = tuple(sorted(RESERVED_HEADERS))

#: AMQP delivery_mode 2: RabbitMQ writes the message to disk
_PERSISTENT = 2


def _text(value: Any, *, exact: bool = False) -> str:
    """An AMQP field value as text (plain clients send ints, bools, bytes, timestamps…).
    ``exact``: bytes that are not UTF-8 as ``\\xNN`` escapes, not U+FFFD, so that two values
    stay two (the rs-* headers: such a message is refused, and its quarantine entry must not
    merge with another one's)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        # 'replace', not 'surrogateescape': a lone surrogate would break the ledger's encoders
        return bytes(value).decode("utf-8", "backslashreplace" if exact else "replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        dt = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return dt.isoformat()
    return str(value)


def _undecodable_text(found: Sequence[str]) -> str:
    listed = "; ".join(found)
    if len(listed) > 1000:
        listed = listed[:1000] + "…"
    return (
        f"RabbitMQ delivered AMQP metadata the client could not decode: {listed}. Fix the "
        "producer: AMQP short strings (content type, message id, type, app id, header names, "
        "routing key) and rs-* header values must be UTF-8 and the timestamp seconds since 1970"
    )


def _is_transport(name: str) -> bool:
    return name in _TRANSPORT_HEADERS or name.startswith(_TRANSPORT_PREFIXES)


def _count(value: Any) -> int | None:
    """A non-negative integer header (x-delivery-count, our attempts), or None if unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str | bytes):
        try:
            n = int(value)
        except ValueError:
            return None
        return n if n >= 0 else None
    return None


def _epoch(value: Any) -> float | None:
    if isinstance(value, datetime):
        dt = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return dt.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


# --------------------------------------------------------------------------- deliveries
