"""Quarantine reasons: why an operation was set aside instead of applied; and what of a
quarantined message may be written down (:func:`disclose`, the app's redaction hook).

One place for the words, so the ledger, runtime, metrics and CLI agree on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class QuarantineReason(StrEnum):
    # bad input (decided before any effect)
    INVALID_OPERATION_ID = "invalid_operation_id"
    #: the rs-operation-id header disagrees with the handler's key extractor
    OPERATION_ID_MISMATCH = "operation_id_mismatch"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    MALFORMED_PAYLOAD = "malformed_payload"
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    LIMIT_EXCEEDED = "limit_exceeded"
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"
    MALFORMED_HEADER = "malformed_header"
    #: the broker delivered metadata its client could not decode (an AMQP property that is not
    #: UTF-8, a timestamp that is not a time ...): refused, never guessed
    MALFORMED_TRANSPORT_HEADER = "malformed_transport_header"
    # identity and time
    KEY_REUSE_CONFLICT = "key_reuse_conflict"
    BEYOND_HORIZON = "beyond_horizon"
    FUTURE_TIMESTAMP = "future_timestamp"
    # execution
    MAX_ATTEMPTS = "max_attempts"
    NON_RETRYABLE_ERROR = "non_retryable_error"
    OUTCOME_UNKNOWN = "outcome_unknown"


class EffectRisk(StrEnum):
    """Whether the effect may already have happened when an operation was quarantined (a DLQ alone
    cannot tell this)."""

    NEVER_CLAIMED = "never_claimed"
    RELEASED_CLEANLY = "released_cleanly"
    OUTCOME_UNKNOWN = "outcome_unknown"


#: ``App(redact=...)``: bytes in, bytes out (strip card numbers, e-mails, personal data)
Redactor = Callable[[bytes], bytes]


@dataclass(frozen=True, slots=True)
class Disclosure:
    """What of one quarantined message may be stored in the ledger and written to the log, once
    the app's redaction hook has seen it (:func:`disclose`)."""

    #: the copy of the body to store; None when the hook failed on it (nothing of it is kept)
    message: bytes | None
    #: the detail to store and log
    detail: str
    #: the operation id as a log line may show it (None: unknown, or withheld)
    operation_id: str | None
    #: the type of the exception the hook raised on the body (None: it did not)
    hook_error: str | None = None


def _through(redact: Redactor, data: bytes) -> bytes:
    out = redact(data)
    if not isinstance(out, bytes | bytearray | memoryview):
        raise TypeError(f"the redaction hook returned {type(out).__name__}, not bytes")
    return bytes(out)


def disclose(
    redact: Redactor | None, body: bytes, detail: str, operation_id: str | None
) -> Disclosure:
    """Pass everything a quarantine writes down about a message through ``redact``.

    Without a hook everything is kept as it is. With one, the hook sees the body copy AND the
    text that can carry payload values: the detail (exception reprs, bad-input messages quote
    what they refused) and the operation id in the log line (ids are derived from business
    fields). Text goes through the same bytes hook as UTF-8, so a hook that masks patterns
    (``re.sub``) covers both; one that parses the body (JSON) fails on text, and text it fails on
    is withheld. A hook that fails on the body never blocks the quarantine: nothing of the body
    is kept and the detail says so (the caller logs it). Never raises for the hook's sake; only
    the exception's type is reported, as its message may quote the body.
    """
    if redact is None:
        return Disclosure(body, detail, operation_id)
    error: str | None = None
    message: bytes | None
    try:
        message = _through(redact, body)
    except Exception as exc:
        message, error = None, type(exc).__name__
    shown = redact_text(redact, detail)
    if shown is None:
        shown = "(detail withheld: the redaction hook failed on it)"
    if error is not None:
        shown += f"; the redaction hook raised {error} on the body: no copy of it was stored"
    op = None if operation_id is None else redact_text(redact, operation_id)
    return Disclosure(message, shown, op, error)


def redact_text(redact: Redactor, text: str) -> str | None:
    """``text`` through the bytes hook as UTF-8; None when the hook fails on it (withhold the
    text then). For any text about a message that leaves the process (a log line, a stored
    error)."""
    try:
        return _through(redact, text.encode("utf-8", "replace")).decode("utf-8", "replace")
    except Exception:
        return None


def shown_text(redact: Redactor | None, text: str) -> str:
    """``text`` as a log line or a stored error may show it: unchanged without a hook, through
    the hook with one, ``(withheld: the redaction hook failed on it)`` when the hook fails on it
    (log lines must never carry what the hook was meant to strip)."""
    if redact is None:
        return text
    shown = redact_text(redact, text)
    return "(withheld: the redaction hook failed on it)" if shown is None else shown
