"""One exception tree for the whole library.

Every error says what happened and what to do next. Driver errors (sqlite3, psycopg, aio-pika,
botocore, confluent-kafka) are mapped to this tree at the adapter edge, so application code never
has to catch a driver's exception type::

    ReplaysafeError
    ├── ConfigurationError          the app, a handler or a backend is configured wrongly
    │   ├── CapabilityError         asked a broker/ledger for something it cannot do
    │   └── MissingExtra            an optional dependency is not installed (names the extra)
    ├── BadInput                    a message was refused before any effect (has .reason)
    │   ├── InvalidOperationId
    │   ├── OperationIdMismatch     rs-operation-id disagrees with the handler's key extractor
    │   ├── PayloadTooLarge
    │   ├── MalformedPayload
    │   ├── UnsupportedContentType
    │   ├── LimitExceeded           depth, integer size, header count/size
    │   ├── FingerprintMismatch     rs-fingerprint header disagrees with the payload
    │   ├── MalformedHeader         an rs-* header cannot be parsed
    │   └── MalformedTransportHeader  the broker's own metadata (AMQP properties) cannot be decoded
    ├── OutcomeUnknown              raised BY a handler: it cannot tell whether its effect happened
    ├── EffectNotApplied            raised BY a handler: its effect certainly did not happen
    ├── LedgerError
    │   ├── LeaseLost               a stale fencing token was refused: do not complete at the broker
    │   ├── LedgerUnavailable       the ledger cannot be reached: no effect may start
    │   └── LedgerDataError         the ledger is up but refused this call's data: not an outage
    └── BrokerError
        ├── PublishAmbiguous        the publish outcome is unknown: retry with the SAME operation id
        └── BrokerUnavailable

``SimulatedCrash`` is deliberately *not* in the tree: it derives from ``BaseException`` so that no
``except Exception`` in user code can swallow a failpoint's simulated process death.
"""

from __future__ import annotations

from replaysafe.quarantine import QuarantineReason


class ReplaysafeError(Exception):
    """Root of every error replaysafe raises."""


class ConfigurationError(ReplaysafeError):
    """The app, a handler or a backend is configured in a way replaysafe refuses to run."""


class CapabilityError(ConfigurationError):
    """A broker or ledger was asked for something its capabilities do not include."""


class MissingExtra(ConfigurationError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, extra: str, module: str) -> None:
        self.extra = extra
        self.module = module
        super().__init__(
            f"the {module!r} package is not installed; install it with "
            f"`pip install 'replaysafe[{extra}]'`"
        )


class BadInput(ReplaysafeError):
    """A message was refused before any effect. ``reason`` is the quarantine reason.

    The runtime quarantines the message with this reason on the first attempt and then completes
    it at the broker; it is never retried (retrying cannot make bad bytes good).
    """

    reason: QuarantineReason = QuarantineReason.MALFORMED_PAYLOAD

    def __init__(self, message: str, reason: QuarantineReason | None = None) -> None:
        if reason is not None:
            self.reason = reason
        super().__init__(message)


class InvalidOperationId(BadInput):
    reason = QuarantineReason.INVALID_OPERATION_ID


class OperationIdMismatch(BadInput):
    """The ``rs-operation-id`` header names another operation than the handler's key extractor
    derives from the payload: the extractor decides, and the message is refused."""

    reason = QuarantineReason.OPERATION_ID_MISMATCH


class PayloadTooLarge(BadInput):
    reason = QuarantineReason.PAYLOAD_TOO_LARGE


class MalformedPayload(BadInput):
    reason = QuarantineReason.MALFORMED_PAYLOAD


class UnsupportedContentType(BadInput):
    reason = QuarantineReason.UNSUPPORTED_CONTENT_TYPE


class LimitExceeded(BadInput):
    reason = QuarantineReason.LIMIT_EXCEEDED


class FingerprintMismatch(BadInput):
    reason = QuarantineReason.FINGERPRINT_MISMATCH


class MalformedHeader(BadInput):
    reason = QuarantineReason.MALFORMED_HEADER


class MalformedTransportHeader(BadInput):
    """The broker adapter could not decode the message's transport metadata (e.g. an AMQP
    property that is not UTF-8, or a timestamp that is not a time); the adapter marks such a
    delivery with the header ``rs-malformed-transport-header`` and decoding refuses it."""

    reason = QuarantineReason.MALFORMED_TRANSPORT_HEADER


class OutcomeUnknown(ReplaysafeError):
    """Raise it from a handler that cannot tell whether its downstream applied the effect: the
    request was sent but the answer never came (a timeout after sending, a connection lost before
    the reply). Wrap the driver's error: ``raise OutcomeUnknown("payments-api timed out") from
    exc``.

    What the runtime does with it depends on the handler's guarantee and effect
    (:attr:`replaysafe.Effect.reruns_when_unknown`):

    - effectively-once with a ``keyed`` or ``transactional`` effect: retried like any retryable
      error under the retry budget (the idempotency key, or the rolled-back transaction, makes
      the re-run safe);
    - effectively-once with an ``unkeyed`` effect: quarantined at once as ``outcome_unknown``
      with risk ``outcome_unknown`` (never blindly re-run), unless the effect opted into
      ``on_unknown="retry"`` (then retried: at-least-once at that downstream);
    - at-least-once: retried (that guarantee accepts duplicates); at-most-once: completed
      already, never retried.

    Every case is counted in ``replaysafe_outcome_unknown_total``; a quarantine that follows one
    (retry budget spent, or the policy does not retry it) records risk ``outcome_unknown``.
    """


class EffectNotApplied(ReplaysafeError):
    """Raise it from a handler whose effect certainly did not happen: the request never left
    (connection refused, DNS failure, a validation error before sending) or the downstream
    refused it without applying anything. Wrap the driver's error: ``raise
    EffectNotApplied("smtp refused the connection") from exc``.

    It matters for an ``unkeyed`` effect under effectively-once, where any other exception is
    read as an unknown outcome (the request may have left before the failure) and quarantined as
    ``outcome_unknown``: ``EffectNotApplied`` (or an exception type the effect lists in
    ``Effect.unkeyed(..., not_applied_on=(...))``) is a clean failure instead, released and
    retried under the retry budget. Everywhere else it is an ordinary retryable error.
    """


class LedgerError(ReplaysafeError):
    """The ledger refused or failed an operation."""


class LeaseLost(LedgerError):
    """The claim's fencing token is no longer current (the lease expired and someone else claimed,
    or the operation was completed/quarantined). The holder must not complete at the broker: the
    current holder owns the outcome."""


class LedgerUnavailable(LedgerError):
    """The ledger cannot be reached. No effect may start without a confirmed claim; the runtime
    pauses consumption and retries."""


class LedgerDataError(LedgerError):
    """The ledger is reachable but refused the *data* of one call: a value its store cannot hold
    verbatim (a NUL byte or a lone surrogate in an operation id, scope or result on PostgreSQL or
    SQLite), a number out of a column's range, a violated constraint. Retrying the same call fails
    the same way, so it is never an outage: do not pause consumption or count the ledger as down
    for it. Set the message aside instead (quarantine it without the offending value, or
    dead-letter it) and fix whatever produced the value.

    Text that reaches a ledger from outside (content types, details, error texts, pause reasons)
    never causes it: every backend stores such text escaped
    (:func:`replaysafe.ledger.base.storable_text`)."""


class BrokerError(ReplaysafeError):
    """The broker refused or failed an operation."""


class PublishAmbiguous(BrokerError):
    """The broker may or may not have accepted the publish (timeout, lost confirm, connection
    dropped after send). Retry with the SAME operation id; consumers deduplicate on it."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached."""


class SimulatedCrash(BaseException):
    """Raised by a failpoint's ``kill`` action inside one process: the current worker dies on the
    spot. Nothing is settled, released or completed, exactly as after SIGKILL."""
