"""The ledger's value types: keys, records, claims, claim outcomes, quarantine requests and entries,
pause states and the summary ``inspect`` shows (the state machine is in
:mod:`replaysafe.ledger.base`'s docstring).

Private: :mod:`replaysafe.ledger.base` re-exports every public name here, and that is the path to
import them from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from enum import StrEnum

from replaysafe.ledger._text import storable_text
from replaysafe.quarantine import EffectRisk, QuarantineReason

#: quarantined message copies are capped so one huge poison message cannot bloat the ledger
MAX_QUARANTINE_COPY = 64 * 1024


class State(StrEnum):
    IN_FLIGHT = "in_flight"
    RELEASED = "released"
    COMPLETED = "completed"
    QUARANTINED = "quarantined"


@dataclass(frozen=True, slots=True, order=True)
class OpKey:
    """Ledger key: the operation scoped by handler (or tenant). A composite, never a concatenated
    string, so ``("a:b", "c")`` and ``("a", "b:c")`` can never collide."""

    scope: str
    operation_id: str


@dataclass(frozen=True, slots=True)
class Record:
    """What the ledger knows about one operation."""

    key: OpKey
    fingerprint: str
    state: State
    token: int
    owner: str | None
    lease_until: float | None
    attempts: int
    result: str | None
    last_error: str | None
    created_at: float
    #: the last change of state or holder (claim, completion, release, quarantine, redrive); an
    #: ``extend`` moves only ``lease_until``, so for an in-flight record this is its claim time
    updated_at: float
    completed_at: float | None = None
    #: the attempt number of a claim made with ``marks_start`` whose ``mark_started`` has not
    #: been recorded (while it equals ``attempts`` on an in-flight record, its holder has not
    #: started the effect); None when no such claim is pending. Only read on an in-flight
    #: record: a record whose attempt ended may keep its last value (Redis drops it at completion)
    unstarted_attempt: int | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """Proof of a current claim. ``token`` is the fencing token every later call presents."""

    key: OpKey
    fingerprint: str
    token: int
    owner: str
    lease_until: float
    attempt: int
    #: True when this claim took over an expired lease: the previous attempt may or may not have
    #: produced its effect (outcome unknown)
    recovered: bool = False
    #: for a recovered claim: False only when the ledger knows that the previous holder never
    #: started its effect (it claimed with ``marks_start`` and never called ``mark_started``);
    #: True otherwise, conservatively (also for records older than this field). Not meaningful
    #: when ``recovered`` is False.
    previous_started: bool = True


@dataclass(frozen=True, slots=True)
class Acquired:
    claim: Claim


@dataclass(frozen=True, slots=True)
class InFlight:
    """Someone else holds a live lease: do not run; retry after ``record.lease_until``."""

    record: Record


@dataclass(frozen=True, slots=True)
class AlreadyDone:
    record: Record


@dataclass(frozen=True, slots=True)
class Conflict:
    """Same operation id, different payload: a key-reuse conflict. Never applied."""

    record: Record


@dataclass(frozen=True, slots=True)
class Quarantined:
    """The operation itself is quarantined; deliveries of it are completed without running until
    it is redriven."""

    record: Record


ClaimOutcome = Acquired | InFlight | AlreadyDone | Conflict | Quarantined


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    key: OpKey
    fingerprint: str
    owner: str
    lease: float
    #: the holder will call :meth:`Ledger.mark_started` right before its effect starts (unkeyed
    #: effects): until it does, the attempt is recorded as not started, so a claim that takes it
    #: over after a crash learns ``previous_started=False``. Honoured by ``claim_many`` only.
    marks_start: bool = False


@dataclass(frozen=True, slots=True)
class QuarantineRequest:
    """One message (or operation) set aside, with enough to decide later what to do with it."""

    scope: str
    reason: QuarantineReason
    operation_id: str | None = None
    fingerprint: str | None = None
    risk: EffectRisk = EffectRisk.NEVER_CLAIMED
    attempts: int = 0
    detail: str = ""
    message: bytes | None = None
    content_type: str | None = None
    #: extra identity for messages that could not be decoded: what the transport said about them
    #: (the raw operation-id header, content type), stable across redeliveries of one message
    identity: str = ""
    #: the operation's first publish time (kept so a redrive can be checked against the horizon)
    published_at: float | None = None

    def entry_id(self) -> str:
        """Stable id: the same message quarantined twice for the same reason is one entry.

        Without an operation id or fingerprint (bad input), the message bytes and ``identity``
        identify it, so two different bad messages with equal bodies stay two entries.
        """
        h = hashlib.sha256()
        for part in (
            self.scope,
            self.reason.value,
            self.operation_id or "",
            self.fingerprint or hashlib.sha256(self.message or b"").hexdigest(),
            self.identity,
        ):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        return h.hexdigest()[:32]

    def capped_message(self) -> bytes | None:
        return None if self.message is None else self.message[:MAX_QUARANTINE_COPY]

    def storable(self) -> QuarantineRequest:
        """This request with its free text (``detail``, ``content_type``) made storable by
        :func:`storable_text`: what every backend writes. ``identity`` is only hashed into
        :meth:`entry_id` (never stored) and the message is stored as bytes, so both stay as
        they are; so does the entry id."""
        detail, ctype = storable_text(self.detail), storable_text(self.content_type)
        if detail is self.detail and ctype is self.content_type:
            return self
        return replace(self, detail=detail, content_type=ctype)


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    id: str
    scope: str
    reason: QuarantineReason
    operation_id: str | None
    fingerprint: str | None
    risk: EffectRisk
    attempts: int
    first_detail: str
    last_detail: str
    message: bytes | None
    content_type: str | None
    created_at: float
    updated_at: float
    seen: int
    published_at: float | None = None
    #: length of the original message; larger than ``len(message)`` when the copy was capped
    message_size: int = 0
    redriven_at: float | None = None
    redrives: int = 0

    @property
    def truncated(self) -> bool:
        return self.message is not None and self.message_size > len(self.message)


@dataclass(frozen=True, slots=True)
class LedgerSummary:
    """What ``replaysafe inspect`` shows about a ledger."""

    now: float
    #: operation records by state
    by_state: dict[str, int]
    #: in-flight records whose lease has expired: crashed or stalled holders, outcome unknown
    #: until a redelivery claims them again (the open ambiguity the ledger can see)
    expired_leases: int
    #: claim time of the oldest in-flight record (``updated_at``, which an extend leaves alone:
    #: a handler kept alive by its heartbeat still shows how long it has been running)
    oldest_in_flight_at: float | None
    #: operations with the most attempts (retried or recovered the most), most first
    hot_operations: list[tuple[OpKey, int]]
    quarantined_by_reason: dict[str, int]
    #: completions in the hour before ``now`` (the rate for the size projection)
    completed_last_hour: int
    #: storage used by the ledger's records, where the backend can measure it
    approx_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class PauseState:
    """A paused handler, as the ledger records it (``Ledger.paused``)."""

    handler: str
    #: why it was paused (free text from the operator; may be empty)
    reason: str
    #: who paused it (free text: a user, a tool; may be empty)
    by: str
    #: when it was paused, by the ledger's clock (POSIX seconds)
    since: float
