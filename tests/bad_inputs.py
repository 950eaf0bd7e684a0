"""Bad inputs that several test modules send: the DESIGN §5 payload and header cases (any
broker, :func:`_cases`) and AMQP frames a client cannot decode (:data:`BAD`, written raw by
:func:`send_frame` with the :func:`raw_encoder` fixture, as a producer in another language may
write them; issue 13 item 13)."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from replaysafe import QuarantineReason
from replaysafe.envelope import HEADER_OPERATION_ID, HEADER_PUBLISHED_AT, format_time

OP = HEADER_OPERATION_ID

Case = tuple[bytes, dict[str, str]]


def _cases(now: float) -> dict[str, tuple[Case, QuarantineReason]]:
    good_body = b'{"order": "x", "amount": 1}'
    deep = b"[" * 65 + b"]" * 65
    return {
        "missing operation id": ((good_body, {}), QuarantineReason.INVALID_OPERATION_ID),
        "empty operation id": ((good_body, {OP: ""}), QuarantineReason.INVALID_OPERATION_ID),
        "too long operation id": (
            (good_body, {OP: "x" * 256}), QuarantineReason.INVALID_OPERATION_ID),
        "control character in operation id": (
            (good_body, {OP: "charge:\x00evil"}), QuarantineReason.INVALID_OPERATION_ID),
        "undecodable bytes": ((b"\xff\xfe\x00garbage", {OP: "b:1"}),
                              QuarantineReason.MALFORMED_PAYLOAD),
        "truncated json": ((b'{"order": ', {OP: "b:2"}), QuarantineReason.MALFORMED_PAYLOAD),
        "pickle content type": (
            (b"\x80\x04\x95cos\nsystem\n",
             {OP: "b:3", "content-type": "application/x-python-pickle"}),
            QuarantineReason.UNSUPPORTED_CONTENT_TYPE),
        "oversize payload": ((b'"' + b"a" * (1024 * 1024) + b'"', {OP: "b:4"}),
                             QuarantineReason.PAYLOAD_TOO_LARGE),
        "deep nesting": ((deep, {OP: "b:5"}), QuarantineReason.LIMIT_EXCEEDED),
        "NaN": ((b'{"amount": NaN}', {OP: "b:6"}), QuarantineReason.MALFORMED_PAYLOAD),
        "Infinity literal overflow": ((b'{"amount": 1e999}', {OP: "b:7"}),
                                      QuarantineReason.MALFORMED_PAYLOAD),
        "duplicate keys": ((b'{"amount": 1, "amount": 2}', {OP: "b:8"}),
                           QuarantineReason.MALFORMED_PAYLOAD),
        "huge integer": ((b'{"amount": 99999999999999999999999}', {OP: "b:9"}),
                         QuarantineReason.LIMIT_EXCEEDED),
        "header flood": ((good_body, {OP: "b:10", **{f"h{i}": "v" for i in range(100)}}),
                         QuarantineReason.LIMIT_EXCEEDED),
        "header bytes flood": ((good_body, {OP: "b:11", "big": "v" * 20_000}),
                               QuarantineReason.LIMIT_EXCEEDED),
        "fingerprint mismatch": ((good_body, {OP: "b:12", "rs-fingerprint": "sha256:00"}),
                                 QuarantineReason.FINGERPRINT_MISMATCH),
        "garbage publish time": ((good_body, {OP: "b:13", HEADER_PUBLISHED_AT: "yesterday"}),
                                 QuarantineReason.MALFORMED_HEADER),
        "beyond the horizon": (
            (good_body, {OP: "b:14", HEADER_PUBLISHED_AT: format_time(now - 30 * 86_400)}),
            QuarantineReason.BEYOND_HORIZON),
        "future timestamp": (
            (good_body, {OP: "b:15", HEADER_PUBLISHED_AT: format_time(now + 86_400)}),
            QuarantineReason.FUTURE_TIMESTAMP),
    }  # fmt: skip


# ---------------------------------------------------------------------- AMQP frames


def shortstr(raw: bytes) -> bytes:
    return struct.pack("B", len(raw)) + raw


def table(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack(">I", len(body)) + body


def text_entry(key: str, value: str) -> bytes:
    raw = value.encode()
    return shortstr(key.encode()) + b"S" + struct.pack(">I", len(raw)) + raw


def nested(depth: int) -> bytes:
    inner = table()
    for _ in range(depth):
        inner = table(shortstr(b"n") + b"F" + inner)
    return inner


class Raw(bytes):
    """A property value pamqp's patched encoder writes as these exact bytes (its length
    prefix included), whatever the property's type."""


@pytest.fixture
def raw_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """pamqp writes a :class:`Raw` value as it is: for short strings, timestamps and tables.
    Every other value is encoded as before (normal code never passes ``Raw``)."""
    from pamqp import encode

    for kind in ("shortstr", "timestamp", "table"):
        real = encode.METHODS[kind]

        def patched(value: Any, real: Callable[[Any], bytes] = real) -> bytes:
            return bytes(value) if isinstance(value, Raw) else real(value)

        monkeypatch.setitem(encode.METHODS, kind, patched)


#: (name, properties (a Raw value is sent as its bytes), header table entries sent raw after an
#: rs-operation-id entry (None: headers are just the rs-operation-id), routing key, what the
#: quarantine says). Unfixed, each one killed the consuming connection in a loop (measured on
#: RabbitMQ 3.10.8) and nothing behind it was delivered.
BAD: list[tuple[str, dict[str, Any], bytes | None, str | Raw, str]] = [
    ("timestamp 2**63-1", {"timestamp": Raw(struct.pack(">Q", 2**63 - 1))}, None, "",
     "property timestamp: 9223372036854775807 is not a time"),
    ("timestamp in microseconds", {"timestamp": Raw(struct.pack(">Q", 1_700_000_000_000_000))},
     None, "", "property timestamp: 1700000000000000 is not a time"),
    ("content_type \\xff\\xfe", {"content_type": Raw(shortstr(b"\xff\xfe"))}, None, "",
     "property content_type: 2 bytes that are not UTF-8"),
    ("content_encoding", {"content_encoding": Raw(shortstr(b"gz\xffip"))}, None, "",
     "property content_encoding: 5 bytes that are not UTF-8"),
    ("message_id", {"message_id": Raw(shortstr(b"id-\xc3\x28"))}, None, "",
     "property message_id: 5 bytes that are not UTF-8"),
    ("correlation_id", {"correlation_id": Raw(shortstr(b"\xff"))}, None, "",
     "property correlation_id: 1 bytes that are not UTF-8"),
    ("reply_to", {"reply_to": Raw(shortstr(b"\xfe"))}, None, "",
     "property reply_to: 1 bytes that are not UTF-8"),
    ("type", {"message_type": Raw(shortstr(b"t\xff"))}, None, "",
     "property message_type: 2 bytes that are not UTF-8"),
    ("app_id", {"app_id": Raw(shortstr(b"\xffapp"))}, None, "",
     "property app_id: 4 bytes that are not UTF-8"),
    ("header name", {}, shortstr(b"k\xff") + b"b\x01", "",
     "a header name of 2 bytes that are not UTF-8"),
    ("header timestamp", {}, shortstr(b"t") + b"T" + b"\xff" * 8, "",
     "header 't': 18446744073709551615 is not a time"),
    ("nested header name", {}, shortstr(b"n") + b"F" + table(shortstr(b"\xfe") + b"b\x01"), "",
     "header 'n': a header name of 1 bytes"),
    ("array item timestamp", {},
     shortstr(b"a") + b"A" + struct.pack(">I", 9) + b"T" + struct.pack(">Q", 2**64 - 2), "",
     "header 'a': item 0: 18446744073709551614 is not a time"),
    ("headers nested 600 deep", {}, shortstr(b"n") + b"F" + nested(599), "",
     "nested deeper than 32 levels"),
    ("routing key", {}, None, Raw(shortstr(b"\xff\xfe")),
     "routing_key: 2 bytes that are not UTF-8"),
    # pamqp decodes it (as bytes): U+FFFD in its place would make two ids one (see _amqp_decode)
    ("rs-* header value", {}, shortstr(b"rs-published-at") + b"S" + struct.pack(">I", 2)
     + b"\xff\xfe", "", "header 'rs-published-at': 2 bytes that are not UTF-8"),
]  # fmt: skip


def frame_headers(op: str, entries: bytes | None) -> dict[str, str] | Raw:
    """The headers of a :data:`BAD` message: ``rs-operation-id`` = ``op``, then its raw table
    entries (None: none)."""
    if entries is None:
        return {"rs-operation-id": op}
    return Raw(table(text_entry("rs-operation-id", op) + entries))


async def send_frame(
    channel: Any, exchange: str, props: dict[str, Any], body: bytes, routing_key: str | Raw = ""
) -> None:
    """Publish through the aiormq ``channel`` (publisher confirms on) as a plain producer
    would: ``props`` as AMQP properties, a :class:`Raw` value written as its bytes (with the
    :func:`raw_encoder` fixture); RabbitMQ must confirm it."""
    import aiormq

    props.setdefault("message_id", f"m-{uuid.uuid4().hex[:8]}")
    ok = await channel.basic_publish(
        body, exchange=exchange, routing_key=routing_key,
        properties=aiormq.spec.Basic.Properties(**props),
    )  # fmt: skip
    assert isinstance(ok, aiormq.spec.Basic.Ack)  # RabbitMQ stored it as it was


async def _consumers(url: str, queue: str) -> int:
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        q = await channel.declare_queue(queue, passive=True)
        return int(q.declaration_result.consumer_count or 0)
    finally:
        await conn.close()
