"""Tolerant decoding of the AMQP frames that carry a producer's metadata (the RabbitMQ adapter).

RabbitMQ passes a message's properties and routing key through as the producer wrote them; it
does not check that a short string is UTF-8 or that a timestamp is a time. pamqp, which aiormq
and aio-pika decode with, does: a ``content_type`` (or ``message_id``, ``type``, ``app_id``, a
header name, a routing key ...) that is not UTF-8, or a ``timestamp`` beyond year 9999 (a
producer stamping microseconds is enough), raises while the frame is read. aiormq's reader then
dies with the whole connection, the robust connection reconnects, RabbitMQ delivers the same
message first again, and the queue is wedged: 0 consumers most of the time, nothing behind the
message ever delivered, nothing logged as a bad message (measured on RabbitMQ 3.10.8).

:func:`install` makes pamqp decode those frames tolerantly instead. Only a frame the original
decoder refuses takes the tolerant path, so every frame that decoded before decodes exactly as
before. On that path each field is read on its own:

- a short string that is not UTF-8 is decoded with U+FFFD in place of the bad bytes;
- a timestamp pamqp cannot represent is left out (``None``);
- a field table keeps what it can: a name that is not UTF-8 is decoded as above, a timestamp as
  its raw integer, a nested table or array is read the same way (at most
  :data:`MAX_DEPTH` deep); after a value of unknown type the rest of that table is skipped (its
  length is known);

and every one of those is written down. :func:`undecodable` returns that list for a properties
object or a ``basic.deliver`` / ``basic.get-ok`` / ``basic.return`` frame: the adapter hands the
runtime a delivery marked with it, and the runtime quarantines the message as
``malformed_transport_header`` instead of guessing what the producer meant.

Patching pamqp is process-wide: any other pamqp user in the process gets the same tolerance,
which only ever replaces a dead connection with a decoded frame.
"""

from __future__ import annotations

import functools
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["MAX_DEPTH", "install", "undecodable", "undecodable_values"]

#: how deep nested header tables and arrays are read on the tolerant path (deeper ones are left
#: out: pamqp itself recurses, and a deep enough nesting exhausts Python's stack)
MAX_DEPTH = 32
#: the attribute the findings are stored under (pamqp's frames and properties have a __dict__)
_ATTR = "replaysafe_undecodable"
#: what a decoder may raise on bad bytes (UnicodeDecodeError is a ValueError)
_BAD = (ValueError, OverflowError, struct.error, IndexError, RecursionError)
#: method frames that carry a routing key the producer chose
_MESSAGE_METHODS = ("Deliver", "GetOk", "Return")

_installed = False
#: two threads constructing the first brokers at once must not both wrap pamqp (every frame
#: would then go through a wrapper of a wrapper)
_install_lock = threading.Lock()


def undecodable(obj: object) -> tuple[str, ...]:
    """What could not be decoded in ``obj`` (a ``Basic.Properties`` or a method frame), one
    sentence per field; empty when everything decoded."""
    found: tuple[str, ...] = getattr(obj, _ATTR, ())
    return found


def undecodable_values(headers: Mapping[str, Any], names: Iterable[str]) -> tuple[str, ...]:
    """Which of the header values ``names`` are bytes that are not UTF-8, one sentence each.

    pamqp reads such a value without complaint (a long string it cannot decode, or a byte
    array, comes back as bytes), so the frame decodes; it is for the caller to decide. Text
    made of them with U+FFFD in place of the bad bytes loses what the producer sent: two
    different operation ids could become one."""
    found = []
    for name in names:
        value = headers.get(name)
        if isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                found.append(f"header {name!r}: {len(raw)} bytes that are not UTF-8 ({_show(raw)})")
    return tuple(found)


def install() -> None:
    """Make pamqp decode content headers and message method frames tolerantly (idempotent and
    thread-safe: pamqp is patched once per process)."""
    global _installed
    if _installed:
        return
    with _install_lock:
        if not _installed:
            _install()
            _installed = True


def _install() -> None:
    from pamqp import commands, header

    original_header: Callable[[Any, bytes], None] = header.ContentHeader.unmarshal

    @functools.wraps(original_header)
    def content_header_unmarshal(self: Any, data: bytes) -> None:
        try:
            original_header(self, data)
        except _BAD:
            if self.class_id is None:
                raise  # the fixed part (class, body size) is unreadable: not a property
            offset, flags = self._get_flags(data[12:])
            self.properties, found = _properties(flags, data[12 + offset :])
            setattr(self.properties, _ATTR, tuple(found))

    header.ContentHeader.unmarshal = content_header_unmarshal  # type: ignore[method-assign]
    for name in _MESSAGE_METHODS:
        cls = getattr(commands.Basic, name)
        cls.unmarshal = _tolerant_method(cls.unmarshal)


# --------------------------------------------------------------------------- fields


def _show(raw: bytes) -> str:
    return repr(raw[:40]) + ("…" if len(raw) > 40 else "")


def _shortstr(data: bytes) -> tuple[int, str, str | None]:
    """(bytes used, text, finding or None). Raises on a truncated field."""
    length = data[0]
    raw = data[1 : 1 + length]
    if len(raw) < length:
        raise ValueError("short string truncated")
    try:
        return 1 + length, raw.decode("utf-8"), None
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "replace")
        return 1 + length, text, f"{length} bytes that are not UTF-8 ({_show(raw)})"


def _timestamp(data: bytes) -> tuple[int, None, str]:
    (value,) = struct.unpack(">Q", data[:8])
    why = (
        f"{value} is not a time (seconds since 1970, or milliseconds up to year 9999): a "
        "producer stamping microseconds or nanoseconds?"
    )
    return 8, None, why


def _end(data: bytes, what: str) -> int:
    """Where a length-prefixed table or array ends (its 4-byte length included)."""
    end: int = 4 + struct.unpack(">I", data[:4])[0]
    if end > len(data):
        raise ValueError(f"field {what} longer than its frame")
    return end


def _table(data: bytes, depth: int) -> tuple[int, dict[str, Any], list[str]]:
    """A field table read entry by entry: (bytes used, entries, findings)."""
    end = _end(data, "table")
    out: dict[str, Any] = {}
    found: list[str] = []
    offset = 4
    while offset < end:
        used, key, bad = _shortstr(data[offset:end])
        offset += used
        if bad is not None:
            found.append(f"a header name of {bad}")
        try:
            used, value, more = _value(data[offset:end], depth)
        except _BAD as exc:
            found.append(f"header {key!r}: {exc}; the headers after it were not read")
            break
        found += [f"header {key!r}: {m}" for m in more]
        out[key] = value
        offset += used
    return end, out, found


def _array(data: bytes, depth: int) -> tuple[int, list[Any], list[str]]:
    end = _end(data, "array")
    out: list[Any] = []
    found: list[str] = []
    offset = 4
    while offset < end:
        try:
            used, value, more = _value(data[offset:end], depth)
        except _BAD as exc:
            found.append(f"item {len(out)}: {exc}; the items after it were not read")
            break
        found += [f"item {len(out)}: {m}" for m in more]
        out.append(value)
        offset += used
    return end, out, found


def _value(data: bytes, depth: int) -> tuple[int, Any, list[str]]:
    """One typed field value: (bytes used, value, findings). pamqp first; if it refuses, the
    kinds whose length is known are read here; anything else raises."""
    from pamqp import decode

    kind = data[:1]
    if kind not in (b"F", b"A"):
        try:
            used, value = decode.embedded_value(data)
        except _BAD:
            if kind != b"T":
                raise
            used, value = 9, struct.unpack(">Q", data[1:9])[0]  # kept as its raw integer
            return used, value, [_timestamp(data[1:])[2]]
        if used <= 0:
            raise ValueError("empty field value")
        return used, value, []
    if depth >= MAX_DEPTH:
        (length,) = struct.unpack(">I", data[1:5])
        return 5 + length, None, [f"nested deeper than {MAX_DEPTH} levels, not read"]
    reader = _table if kind == b"F" else _array
    used, value, found = reader(data[1:], depth + 1)
    return 1 + used, value, found


# --------------------------------------------------------------------------- frames


def _properties(flags: int, data: bytes) -> tuple[Any, list[str]]:
    """``Basic.Properties`` read field by field, with what could not be decoded."""
    from pamqp import commands, decode

    props = commands.Basic.Properties()
    found: list[str] = []
    for name in props.__slots__:
        if not flags & props.flags[name]:
            continue
        kind = props.amqp_type(name)
        value: Any
        try:
            if kind == "shortstr":
                used, value, bad = _shortstr(data)
                if bad is not None:
                    found.append(f"property {name}: {bad}")
            elif kind == "table":
                used, value, more = _table(data, 0)
                found += [f"property headers: {m}" for m in more]
            elif kind == "timestamp":
                try:
                    used, value = decode.timestamp(data)
                except _BAD:
                    used, value, why = _timestamp(data)
                    found.append(f"property timestamp: {why}")
            else:
                used, value = decode.by_type(data, kind)
        except _BAD as exc:
            found.append(f"property {name}: {exc}; the properties after it were not read")
            break
        setattr(props, name, value)
        data = data[used:]
    return props, found


def _tolerant_method(original: Callable[[Any, bytes], None]) -> Callable[[Any, bytes], None]:
    """``Frame.unmarshal`` for a message method frame, with short strings read tolerantly on
    the path where the original refuses the frame."""

    @functools.wraps(original)
    def unmarshal(self: Any, data: bytes) -> None:
        try:
            original(self, data)
            return
        except _BAD as exc:
            refused = exc
        try:
            found = _method_fields(self, data)
        except _BAD:
            raise refused from None  # not a matter of text: the frame is broken, as before
        setattr(self, _ATTR, tuple(found))

    return unmarshal


def _method_fields(frame: Any, data: bytes) -> list[str]:
    """pamqp's ``Frame.unmarshal`` loop with short strings read by :func:`_shortstr`."""
    from pamqp import decode

    found: list[str] = []
    offset, bitset = 0, False
    for name in frame.__slots__:
        kind = frame.amqp_type(name)
        value: Any
        if bitset and (kind != "bit" or offset == 8):
            data, offset, bitset = data[1:], 0, False
        if kind == "shortstr":
            used, value, bad = _shortstr(data)
            if bad is not None:
                found.append(f"{name}: {bad}")
        else:
            used, value = decode.by_type(data, kind, offset)
        if kind == "bit":
            offset, bitset, used = offset + 1, True, 0
        setattr(frame, name, value)
        data = data[used:]
    return found
