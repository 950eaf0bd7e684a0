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

import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import FrozenInstanceError, dataclass
from datetime import UTC, datetime
from typing import Any

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

JSON = "application/json"
TEXT = "text/plain"
BYTES = "application/octet-stream"

MAX_OPERATION_ID_BYTES = 255

KeyExtractor = Callable[[Any], "str | OperationIdParts"]
OperationIdParts = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bad-input limits, all checked before any effect. Defaults follow DESIGN §5."""

    max_payload_bytes: int = 1024 * 1024
    max_depth: int = 64
    #: integers must fit in a signed integer of this many bits (other languages' parsers and
    #: databases silently lose precision beyond it)
    max_int_bits: int = 64
    max_headers: int = 64
    max_header_bytes: int = 16 * 1024
    allowed_content_types: frozenset[str] = frozenset({JSON, TEXT, BYTES})


DEFAULT_LIMITS = Limits()


# --------------------------------------------------------------------------- operation ids


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


# --------------------------------------------------------------------------- canonical JSON


#: one encoder for every call: ``json.dumps`` with options builds a new one each time
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_json(value: Any) -> bytes:
    """The canonical encoding of a JSON value (sorted keys, compact, UTF-8).

    Raises ``MalformedPayload`` for values JSON cannot carry faithfully (NaN, Infinity, non-string
    keys, objects of other types).
    """
    try:
        text = _CANONICAL.encode(value)
    except (TypeError, ValueError) as exc:
        raise MalformedPayload(
            f"payload cannot be encoded as canonical JSON: {exc}; send JSON-native values only"
        ) from exc
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # a lone surrogate (e.g. from the JSON escape "\ud800") has no UTF-8 encoding
        raise MalformedPayload(
            f"payload contains a lone UTF-16 surrogate: {exc}; send valid Unicode text"
        ) from exc


def fingerprint_bytes(canonical: bytes) -> str:
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def fingerprint(value: Any) -> str:
    """SHA-256 fingerprint of a JSON value's canonical form (``sha256:<hex>``)."""
    return fingerprint_bytes(canonical_json(value))


class _Reject(Exception):
    def __init__(self, error: Exception) -> None:
        self.error = error


def decode_json(body: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Parse a JSON body under ``limits``; raise a ``BadInput`` subclass on anything unsafe.

    Refused: bodies over the size cap (checked before parsing), invalid UTF-8, syntax errors,
    duplicate object keys, NaN/Infinity (also overflowing literals such as ``1e999``), integers
    beyond ``max_int_bits``, nesting deeper than ``max_depth``.
    """
    if len(body) > limits.max_payload_bytes:
        raise PayloadTooLarge(
            f"payload is {len(body)} bytes, over the {limits.max_payload_bytes}-byte cap; "
            "store large data elsewhere and send a reference"
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPayload(
            f"payload is not valid UTF-8: {exc}; encode JSON bodies as UTF-8"
        ) from exc
    _check_depth(text, limits.max_depth)
    decode: Callable[[str], Any]
    if _risky_numbers(limits.max_int_bits).search(text) is None:
        # no number that could break a limit: ints and floats parse in C, no hook per literal
        decode = _FAST_JSON.decode
    else:
        decode = _checked_decoder(limits.max_int_bits).decode
    try:
        return decode(text)
    except _Reject as rej:
        raise rej.error from None
    except RecursionError:
        raise LimitExceeded(
            f"payload nests deeper than {limits.max_depth} levels; flatten the structure"
        ) from None
    except json.JSONDecodeError as exc:
        raise MalformedPayload(
            f"payload is not valid JSON: {exc}; fix the producer's encoder"
        ) from exc


@functools.lru_cache(maxsize=8)
def _checked_decoder(max_int_bits: int) -> json.JSONDecoder:
    """The slow path: every number literal through a hook that enforces the limits."""
    max_int = 2 ** (max_int_bits - 1) - 1

    def parse_int(s: str) -> int:
        # bound the digit count before int() so a huge literal costs nothing
        if len(s.lstrip("-")) > 40 or not -max_int - 1 <= int(s) <= max_int:
            raise _Reject(
                LimitExceeded(
                    f"integer {s[:30]}… does not fit in {max_int_bits} bits; send it as a string"
                )
            )
        return int(s)

    def parse_float(s: str) -> float:
        f = float(s)
        if f in (float("inf"), float("-inf")):
            raise _Reject(
                MalformedPayload(f"number {s[:30]} overflows to infinity; send finite numbers only")
            )
        return f

    return json.JSONDecoder(
        object_pairs_hook=_unique_pairs,
        parse_int=parse_int,
        parse_float=parse_float,
        parse_constant=_no_constant,
    )


def _duplicate_key(items: list[tuple[str, Any]]) -> _Reject:
    seen: set[str] = set()
    for k, _ in items:
        if k in seen:
            break
        seen.add(k)
    return _Reject(
        MalformedPayload(
            f"duplicate JSON key {k!r}: parsers disagree on which value wins; send each key once"
        )
    )


def _unique_pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(items)
    if len(out) != len(items):
        raise _duplicate_key(items)
    return out


def _no_constant(s: str) -> Any:
    raise _Reject(MalformedPayload(f"{s} is not valid JSON; send finite numbers only"))


#: built once: ``json.loads`` with hooks builds a decoder per call
_FAST_JSON = json.JSONDecoder(object_pairs_hook=_unique_pairs, parse_constant=_no_constant)


@functools.lru_cache(maxsize=8)
def _risky_numbers(max_int_bits: int) -> re.Pattern[str]:
    """Text that may hold a number outside the limits: a digit run as long as the largest
    allowed integer (shorter integers always fit), or an exponent (a float can only overflow to
    infinity with one, or with more digits than that). Matches inside strings only cost the
    slow, hooked parse; they never skip a check."""
    digits = len(str(2 ** (max_int_bits - 1) - 1))
    return re.compile(rf"[0-9]{{{digits},}}|[eE][-+]?[0-9]")


# an unterminated string runs to the end of the text: every match attempt then succeeds without
# backtracking, so a body of many unclosed quotes is scanned in linear, not quadratic, time
_STRING = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def _check_depth(text: str, max_depth: int) -> None:
    """Refuse deep nesting before the recursive parser sees it.

    Cheap on the hot path: when the document has fewer brackets than the limit nothing is scanned;
    otherwise strings are blanked in C (regex) and only the brackets are walked.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        if m.group() in "[{":
            depth += 1
            if depth > max_depth:
                raise LimitExceeded(
                    f"payload nests deeper than {max_depth} levels; flatten the structure"
                )
        else:
            depth -= 1


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


def content_type_base(content_type: str | None) -> str:
    """The media type that decides decoding and fingerprinting: parameters dropped, lower case;
    a missing or empty content type is the wire format's default, ``application/json``."""
    if not content_type or content_type == JSON:
        return JSON
    return content_type.split(";", 1)[0].strip().lower()


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


def payload_fingerprint(payload: bytes, content_type: str | None = None) -> str:
    """THE fingerprint of a body as it travels, given the content type it travelled with.

    The one definition every component uses: the runtime (through :func:`decode_wire` and
    ``Envelope.fingerprint``), quarantine entries, redrive's check of a stored copy and the outbox
    (through :func:`decode_wire`). A missing or empty ``content_type`` means ``application/json``,
    the wire format's default, exactly as :func:`decode_wire` reads it: plain aio-pika,
    confluent-kafka and SQS producers send no content type. It covers :func:`canonical_json` of
    the decoded value for JSON, the body bytes as they are otherwise. Raises ``MalformedPayload``
    for a JSON body it cannot parse. No size or depth limit is applied here: the body already
    passed them when it was decoded.
    """
    base = content_type_base(content_type)
    if base != JSON:
        return fingerprint_bytes(payload)
    try:
        value = _FAST_JSON.decode(payload.decode("utf-8"))
    except _Reject as rej:
        raise rej.error from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedPayload(
            f"payload is not valid JSON: {exc}; fix the producer's encoder"
        ) from exc
    return fingerprint_bytes(canonical_json(value))


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
