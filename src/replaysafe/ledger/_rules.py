"""The ledger's rules as pure functions every backend shares: the claim transition, fencing, lease
expiry, the merge of a quarantine entry, and the SQL row shape of an entry.

Private: :mod:`replaysafe.ledger.base` re-exports every public name here, and that is the path to
import them from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from replaysafe.errors import LeaseLost, LedgerError
from replaysafe.ledger._types import (
    Acquired,
    AlreadyDone,
    Claim,
    ClaimOutcome,
    Conflict,
    InFlight,
    OpKey,
    Quarantined,
    QuarantineEntry,
    QuarantineRequest,
    Record,
    State,
)
from replaysafe.quarantine import EffectRisk, QuarantineReason


def decide_claim(
    existing: Record | None,
    key: OpKey,
    fingerprint: str,
    owner: str,
    lease: float,
    now: float,
    next_token: int,
    marks_start: bool = False,
) -> tuple[ClaimOutcome, Record | None]:
    """The claim transition as a pure function: ``(outcome, record to write or None)``.

    Backends that can read-decide-write atomically (memory under a lock, SQLite under
    ``BEGIN IMMEDIATE``) share this one implementation of the state machine. ``next_token`` is only
    used (and must only be consumed) when the outcome is ``Acquired``. ``marks_start``: see
    :attr:`ClaimRequest.marks_start`.
    """
    if existing is None:
        rec = Record(
            key,
            fingerprint,
            State.IN_FLIGHT,
            next_token,
            owner,
            now + lease,
            1,
            None,
            None,
            now,
            now,
            unstarted_attempt=1 if marks_start else None,
        )
        return Acquired(Claim(key, fingerprint, next_token, owner, now + lease, 1)), rec
    if existing.fingerprint != fingerprint:
        return Conflict(existing), None
    if existing.state is State.COMPLETED:
        return AlreadyDone(existing), None
    if existing.state is State.QUARANTINED:
        return Quarantined(existing), None
    if existing.state is State.IN_FLIGHT and not lease_expired(existing, now):
        return InFlight(existing), None
    recovered = existing.state is State.IN_FLIGHT  # lease expired without complete or release
    started = previous_started(existing)
    attempt = existing.attempts + 1
    rec = Record(
        key,
        fingerprint,
        State.IN_FLIGHT,
        next_token,
        owner,
        now + lease,
        attempt,
        None,
        existing.last_error,
        existing.created_at,
        now,
        # a takeover of an attempt that may have started stays "may have started" whatever this
        # attempt does: the effect of that earlier attempt is still unknown
        unstarted_attempt=attempt if marks_start and not (recovered and started) else None,
    )
    claim = Claim(key, fingerprint, next_token, owner, now + lease, attempt, recovered, started)
    return Acquired(claim), rec


def previous_started(existing: Record) -> bool:
    """For a claim taking over ``existing``: False only when ``existing`` is in flight and its
    holder claimed with ``marks_start`` and never marked the effect started."""
    return not (
        existing.state is State.IN_FLIGHT
        and existing.unstarted_attempt is not None
        and existing.unstarted_attempt == existing.attempts
    )


def entry_from_row(row: Sequence[Any]) -> QuarantineEntry:
    """A quarantine entry from a SQL row in the column order the SQL backends share."""
    return QuarantineEntry(
        id=row[0],
        scope=row[1],
        reason=QuarantineReason(row[2]),
        operation_id=row[3],
        fingerprint=row[4],
        risk=EffectRisk(row[5]),
        attempts=row[6],
        first_detail=row[7],
        last_detail=row[8],
        message=None if row[9] is None else bytes(row[9]),
        content_type=row[10],
        created_at=row[11],
        updated_at=row[12],
        seen=row[13],
        published_at=row[14],
        message_size=row[15],
        redriven_at=row[16],
        redrives=row[17],
    )


def merge_quarantine(
    old: QuarantineEntry | None, request: QuarantineRequest, now: float
) -> QuarantineEntry:
    """The entry after quarantining ``request``: a new one, or ``old`` seen once more (the first
    detail, message copy and publish time are kept; attempts only grow)."""
    if old is None:
        return QuarantineEntry(
            request.entry_id(), request.scope, request.reason, request.operation_id,
            request.fingerprint, request.risk, request.attempts, request.detail, request.detail,
            request.capped_message(), request.content_type, now, now, 1, request.published_at,
            len(request.message or b""),
        )  # fmt: skip
    return replace(
        old,
        attempts=max(old.attempts, request.attempts),
        risk=request.risk,
        last_detail=request.detail,
        updated_at=now,
        seen=old.seen + 1,
    )


def check_fence(existing: Record | None, claim: Claim) -> Record:
    """Return the record if ``claim`` is its current holder, else raise ``LeaseLost``."""
    if existing is None or existing.state is not State.IN_FLIGHT or existing.token != claim.token:
        state = "missing" if existing is None else f"{existing.state.value}, token {existing.token}"
        raise LeaseLost(
            f"claim on {claim.key.scope}/{claim.key.operation_id} with fencing token "
            f"{claim.token} is stale (record is {state}); do not complete at the broker, the "
            "current holder owns the outcome"
        )
    return existing


def lease_expired(record: Record, now: float) -> bool:
    return record.state is State.IN_FLIGHT and (record.lease_until or 0.0) <= now


def unknown_entry(entry_id: str) -> LedgerError:
    """What ``redrive`` raises for an entry id the ledger does not hold (every backend)."""
    return LedgerError(
        f"no quarantine entry {entry_id!r} (never quarantined, or purged); list the entries with "
        "`replaysafe quarantine list`"
    )
