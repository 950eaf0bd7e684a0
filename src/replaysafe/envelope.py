"""The envelope: one operation's identity, payload and metadata, and the wire format.

Wire format (documented so producers in any language interoperate): the payload is the message
body, typed by ``content-type`` (default ``application/json``). Metadata travels in the broker's
native headers:

- ``rs-operation-id``: the stable business identity of the operation (required unless the handler
  has a key extractor that derives it from the payload; where it has one, the extractor decides
  and a header naming another id is refused as ``operation_id_mismatch``).
- ``rs-published-at``: RFC 3339 UTC time of the *first* publish of the operation; a retry of the
  same operation keeps it. Falls back to the broker's own timestamp when absent.
- ``rs-fingerprint`` (optional): ``sha256:<hex>`` of the canonical payload; the consumer recomputes
  and compares.
- ``rs-malformed-transport-header`` is never sent by a producer: a broker adapter sets it on a
  delivery whose transport metadata it could not decode (saying what), and decoding refuses such
  a message (``malformed_transport_header``). A producer that sends it gets the same refusal.

Canonical payload (what the fingerprint covers): for JSON, the UTF-8 encoding of the value with
object keys sorted, no insignificant whitespace and non-ASCII characters kept as UTF-8
(``json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``); for any other
allowed content type, the body bytes as they are. A message without a content type is JSON
(:func:`payload_fingerprint` is the one definition). docs/wire-format.md says it all for
producers in other languages.

Decoding enforces the limits of DESIGN §5 and raises a :class:`~replaysafe.errors.BadInput`
subclass whose ``reason`` is the quarantine reason. The size cap is checked on the raw bytes
before any parser sees them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime
from typing import Any

# the operation id rules and the payload rules live in private modules; their names are
# re-exported here (the same objects), which stays the path to import them from
from replaysafe._opid import MAX_OPERATION_ID_BYTES as MAX_OPERATION_ID_BYTES
from replaysafe._opid import KeyExtractor as KeyExtractor
from replaysafe._opid import OperationIdParts as OperationIdParts
from replaysafe._opid import _derive_operation_id
from replaysafe._opid import operation_id as operation_id
from replaysafe._opid import validate_operation_id as validate_operation_id
from replaysafe._payload import BYTES as BYTES
from replaysafe._payload import DEFAULT_LIMITS as DEFAULT_LIMITS
from replaysafe._payload import JSON as JSON
from replaysafe._payload import TEXT as TEXT
from replaysafe._payload import Limits as Limits
from replaysafe._payload import canonical_json as canonical_json
from replaysafe._payload import content_type_base as content_type_base
from replaysafe._payload import decode_json as decode_json
from replaysafe._payload import fingerprint as fingerprint
from replaysafe._payload import fingerprint_bytes as fingerprint_bytes
from replaysafe._payload import payload_fingerprint as payload_fingerprint
from replaysafe.errors import (
    FingerprintMismatch,
    InvalidOperationId,
    LimitExceeded,
    MalformedHeader,
    MalformedPayload,
    MalformedTransportHeader,
    OperationIdMismatch,
    PayloadTooLarge,
    UnsupportedContentType,
)

HEADER_OPERATION_ID = "rs-operation-id"
HEADER_PUBLISHED_AT = "rs-published-at"
HEADER_FINGERPRINT = "rs-fingerprint"
#: set by a broker adapter (never by a producer) on a delivery whose transport metadata could not
#: be decoded; its value says what. Decoding refuses such a delivery (see decode_wire)
HEADER_MALFORMED_TRANSPORT = "rs-malformed-transport-header"
RESERVED_HEADERS = frozenset(
    {HEADER_OPERATION_ID, HEADER_PUBLISHED_AT, HEADER_FINGERPRINT, HEADER_MALFORMED_TRANSPORT}
)


# --------------------------------------------------------------------------- the envelope


def format_time(ts: float) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2026-11-26T14:31:47.123456Z``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> float:
    """Parse an RFC 3339 time; naive times are refused (ambiguous zone), and so is anything
    but printable ASCII (CPython 3.11's ``fromisoformat`` reads a time followed by a NUL and
    anything at all as the time before the NUL)."""
    try:
        if not (value.isascii() and value.isprintable()):
            raise ValueError("not printable ASCII")
        dt = datetime.fromisoformat(value)
    except ValueError as exc:
        raise MalformedHeader(
            f"{HEADER_PUBLISHED_AT} is not an RFC 3339 time: {value[:60]!r}; "
            "send UTC such as '2026-11-26T14:31:47.123456Z'"
        ) from exc
    if dt.tzinfo is None:
        raise MalformedHeader(
            f"{HEADER_PUBLISHED_AT} has no time zone: {value[:60]!r}; send UTC ending in 'Z'"
        )
    return dt.timestamp()


class Envelope:
    """One transport-independent copy of an operation (immutable).

    ``payload`` holds the encoded body bytes; ``value`` the decoded payload (JSON value, ``str``
    for text, ``bytes`` otherwise). Build envelopes with :meth:`of` on the producer side; the
    runtime builds them with :func:`decode_wire` on the consumer side.

    ``fingerprint`` is the SHA-256 of the canonical payload (see the module docstring). Passing
    ``None`` to the constructor defers it: it is computed from ``payload`` (never from ``value``,
    which a handler may have mutated) the first time it is read, so a consumer that never needs
    it (at-least-once, at-most-once) never pays for the canonical encoding.
    """

    __slots__ = (
        "_fingerprint",
        "content_type",
        "headers",
        "key",
        "operation_id",
        "payload",
        "published_at",
        "value",
    )
    __match_args__ = (
        "operation_id",
        "payload",
        "value",
        "fingerprint",
        "content_type",
        "key",
        "headers",
        "published_at",
    )

    operation_id: str
    payload: bytes
    value: Any
    content_type: str
    key: str | None
    headers: Mapping[str, str]
    published_at: float | None
    _fingerprint: str | None

    def __init__(
        self,
        operation_id: str,
        payload: bytes,
        value: Any,
        fingerprint: str | None,
        content_type: str = JSON,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        published_at: float | None = None,
    ) -> None:
        # through the slot descriptors: a frozen __setattr__ refuses every assignment
        _SET_OPERATION_ID(self, operation_id)
        _SET_PAYLOAD(self, payload)
        _SET_VALUE(self, value)
        _SET_FINGERPRINT(self, fingerprint)
        _SET_CONTENT_TYPE(self, content_type)
        _SET_KEY(self, key)
        _SET_HEADERS(self, {} if headers is None else headers)
        _SET_PUBLISHED_AT(self, published_at)

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the canonical payload (computed on first use when deferred)."""
        fp = self._fingerprint
        if fp is None:
            fp = payload_fingerprint(self.payload, self.content_type)
            _SET_FINGERPRINT(self, fp)
        return fp

    def _fields(self) -> tuple[Any, ...]:
        return (
            self.operation_id,
            self.payload,
            self.value,
            self.fingerprint,
            self.content_type,
            self.key,
            self.headers,
            self.published_at,
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Envelope)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        names = self.__match_args__
        inner = ", ".join(f"{n}={v!r}" for n, v in zip(names, self._fields(), strict=True))
        return f"{type(self).__name__}({inner})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def _args(
        self,
    ) -> tuple[str, bytes, Any, str | None, str, str | None, Mapping[str, str], float | None]:
        """The constructor's arguments, in order, the fingerprint left deferred if it still is
        (pickling and copies rebuild from these; ``_fields`` computes it, for equality)."""
        return (
            self.operation_id,
            self.payload,
            self.value,
            self._fingerprint,
            self.content_type,
            self.key,
            self.headers,
            self.published_at,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._args())

    @classmethod
    def of(
        cls,
        operation_id: str,
        value: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        published_at: float | None = None,
    ) -> Envelope:
        """An envelope with a JSON payload (canonically encoded). ``key`` is the ordering key."""
        validate_operation_id(operation_id)
        body = canonical_json(value)
        hdrs = dict(headers or {})
        clash = RESERVED_HEADERS.intersection(hdrs)
        if clash:
            raise ValueError(
                f"headers {sorted(clash)} are reserved for replaysafe's metadata; pass the "
                "operation id and publish time as arguments and rename your own headers"
            )
        return cls(
            operation_id, body, value, fingerprint_bytes(body), JSON, key, hdrs, published_at
        )

    def wire_headers(self) -> dict[str, str]:
        """Headers to put on the broker message (user headers plus the rs-* metadata)."""
        out = dict(self.headers)
        out[HEADER_OPERATION_ID] = self.operation_id
        out[HEADER_FINGERPRINT] = self.fingerprint
        if self.published_at is not None:
            out[HEADER_PUBLISHED_AT] = format_time(self.published_at)
        return out

    def with_published_at(self, ts: float) -> Envelope:
        """The same envelope stamped with its first publish time (kept by retries)."""
        if self.published_at is not None:
            return self
        return Envelope(*self._args()[:-1], ts)


_SET_OPERATION_ID: Callable[[Envelope, Any], None] = Envelope.__dict__["operation_id"].__set__
_SET_PAYLOAD: Callable[[Envelope, Any], None] = Envelope.__dict__["payload"].__set__
_SET_VALUE: Callable[[Envelope, Any], None] = Envelope.__dict__["value"].__set__
_SET_FINGERPRINT: Callable[[Envelope, Any], None] = Envelope.__dict__["_fingerprint"].__set__
_SET_CONTENT_TYPE: Callable[[Envelope, Any], None] = Envelope.__dict__["content_type"].__set__
_SET_KEY: Callable[[Envelope, Any], None] = Envelope.__dict__["key"].__set__
_SET_HEADERS: Callable[[Envelope, Any], None] = Envelope.__dict__["headers"].__set__
_SET_PUBLISHED_AT: Callable[[Envelope, Any], None] = Envelope.__dict__["published_at"].__set__


def decode_wire(
    body: bytes,
    headers: Mapping[str, str],
    *,
    content_type: str | None = None,
    key: str | None = None,
    broker_timestamp: float | None = None,
    key_extractor: KeyExtractor | None = None,
    limits: Limits = DEFAULT_LIMITS,
    check_fingerprint: bool = True,
) -> Envelope:
    """Build an ``Envelope`` from a broker message, enforcing ``limits``.

    The operation id: with a ``key_extractor``, what it derives from the decoded value (a JSON
    value for JSON content, ``str`` for ``text/plain``, ``bytes`` otherwise); an
    ``rs-operation-id`` header that names another id is refused (``OperationIdMismatch``) so that
    one operation can never run under two ids. Without an extractor, the header (required). The
    publish time from ``rs-published-at``, else ``broker_timestamp``, else unknown (``None``).
    Raises a ``BadInput`` subclass; never a driver or parser exception.

    ``check_fingerprint`` (default) computes the payload fingerprint now and refuses a
    disagreeing ``rs-fingerprint`` header (``FingerprintMismatch``). The runtime turns it off
    where nothing compares fingerprints (at-least-once, at-most-once: no ledger): the header is
    then not checked and ``Envelope.fingerprint`` is computed only if something reads it (a
    quarantine record). Every other check runs either way.

    A delivery the adapter marked with ``rs-malformed-transport-header`` is refused first
    (``MalformedTransportHeader``): nothing of it is trusted.
    """
    undecodable = headers.get(HEADER_MALFORMED_TRANSPORT)
    if undecodable is not None:
        raise MalformedTransportHeader(
            f"transport metadata could not be decoded, so nothing of the message is trusted: "
            f"{undecodable[:1500]}"
        )
    if len(headers) > limits.max_headers:
        raise LimitExceeded(
            f"message carries {len(headers)} headers, over the limit of {limits.max_headers}; "
            "send fewer headers or move data into the payload"
        )
    chars = sum(map(len, headers)) + sum(map(len, headers.values()))
    # a UTF-8 character is at most 4 bytes: only encode when the cheap bound is not enough
    header_bytes = (
        chars
        if chars * 4 <= limits.max_header_bytes
        else sum(
            len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
            for k, v in headers.items()
        )
    )
    if header_bytes > limits.max_header_bytes:
        raise LimitExceeded(
            f"message headers total {header_bytes} bytes, over the limit of "
            f"{limits.max_header_bytes}; move large values into the payload"
        )
    if len(body) > limits.max_payload_bytes:
        raise PayloadTooLarge(
            f"payload is {len(body)} bytes, over the {limits.max_payload_bytes}-byte cap; "
            "store large data elsewhere and send a reference"
        )
    # header names are case-insensitive on the wire (AMQP/HTTP habits differ between clients)
    ctype = (
        content_type
        or next((v for k, v in headers.items() if k.lower() == "content-type"), None)
        or JSON
    )
    base = content_type_base(ctype)
    if base not in limits.allowed_content_types:
        raise UnsupportedContentType(
            f"content type {base!r} is not allowed (allowed: "
            f"{', '.join(sorted(limits.allowed_content_types))}); pickle and other executable "
            "formats are never decoded; send application/json"
        )
    value: Any
    canonical: bytes | None
    if base == JSON:
        value = decode_json(body, limits)
        # the canonical form also refuses what JSON escapes can smuggle in (lone surrogates)
        canonical = canonical_json(value) if check_fingerprint or b"\\u" in body else None
    elif base == TEXT:
        try:
            value = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPayload(
                f"text payload is not valid UTF-8: {exc}; encode text bodies as UTF-8 or send "
                f"{BYTES}"
            ) from exc
        canonical = body
    else:
        value = body
        canonical = body
    fp = fingerprint_bytes(canonical) if check_fingerprint and canonical is not None else None
    sent_fp = headers.get(HEADER_FINGERPRINT) if check_fingerprint else None
    if sent_fp is not None and sent_fp != fp:
        raise FingerprintMismatch(
            f"{HEADER_FINGERPRINT} {sent_fp[:80]!r} does not match the payload ({fp}); "
            "the body was altered or the producer fingerprints differently; fingerprint the "
            "canonical JSON (see replaysafe.envelope) or omit the header"
        )
    raw_op = headers.get(HEADER_OPERATION_ID)
    if key_extractor is not None:
        # a declared extractor decides the identity; the header may only agree with it
        op = _derive_operation_id(key_extractor, value, base)
        if raw_op is not None and raw_op != op:
            raise OperationIdMismatch(
                f"the {HEADER_OPERATION_ID} header {raw_op[:80]!r} disagrees with the operation "
                f"id {op[:80]!r} that the handler's key extractor derives from the payload; the "
                "extractor decides, so the message was not applied: fix the producer's header "
                "(or drop it) and resend"
            )
    elif raw_op is None:
        raise InvalidOperationId(
            f"message has no {HEADER_OPERATION_ID} header and the handler has no key extractor; "
            "set the header at the producer or declare key=..."
        )
    else:
        op = validate_operation_id(raw_op)
    sent_at = headers.get(HEADER_PUBLISHED_AT)
    published_at = parse_time(sent_at) if sent_at is not None else broker_timestamp
    user_headers = {
        k: v
        for k, v in headers.items()
        if k not in RESERVED_HEADERS and k.lower() != "content-type"
    }
    return Envelope(op, body, value, fp, ctype, key, user_headers, published_at)
