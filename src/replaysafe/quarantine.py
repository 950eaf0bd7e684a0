"""Quarantine reasons: why an operation was set aside instead of applied.

One place for the words, so the ledger, runtime, metrics and CLI agree on them.
"""

from __future__ import annotations

from enum import StrEnum


class QuarantineReason(StrEnum):
    # bad input (decided before any effect)
    INVALID_OPERATION_ID = "invalid_operation_id"
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
