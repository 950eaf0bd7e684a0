"""The payload: content types, bad-input limits, canonical JSON, fingerprints and the JSON
decoder that enforces the limits (the wire format's body rules, stated in
:mod:`replaysafe.envelope`'s docstring).

Private: :mod:`replaysafe.envelope` re-exports every public name here, and that is the path to
import them from.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from replaysafe.errors import LimitExceeded, MalformedPayload, PayloadTooLarge

JSON = "application/json"
TEXT = "text/plain"
BYTES = "application/octet-stream"


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


def content_type_base(content_type: str | None) -> str:
    """The media type that decides decoding and fingerprinting: parameters dropped, lower case;
    a missing or empty content type is the wire format's default, ``application/json``."""
    if not content_type or content_type == JSON:
        return JSON
    return content_type.split(";", 1)[0].strip().lower()


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
