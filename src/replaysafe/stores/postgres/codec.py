"""Pack and decode: the single-statement calls' parameters from the arguments ("pack") and their
answer from the rows ("decode"), pure, for both flavours. A fenced write that changed no row reads
the record (``get``) to say why, which each flavour does with its own driver (see
:func:`fence_error`)."""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any, Final

from replaysafe.errors import LeaseLost
from replaysafe.ledger._fast import new_record
from replaysafe.ledger.base import (
    Claim,
    ClaimRequest,
    OpKey,
    QuarantineRequest,
    Record,
    State,
    check_fence,
)
from replaysafe.stores.postgres.sql import Rows

_STATES: Final = {s.value: s for s in State}


def fence_params(claim: Claim, **extra: Any) -> dict[str, Any]:
    return {
        "f_scope": claim.key.scope,
        "f_op": claim.key.operation_id,
        "f_token": claim.token,
        **extra,
    }


def get_params(key: OpKey) -> dict[str, Any]:
    return {"scope": key.scope, "op": key.operation_id}


def extended(claim: Claim, lease_until: float) -> Claim:
    """``claim`` with the lease an extend statement returned."""
    return Claim(
        claim.key,
        claim.fingerprint,
        claim.token,
        claim.owner,
        lease_until,
        claim.attempt,
        claim.recovered,
        claim.previous_started,
    )


def complete_many_params(items: Sequence[tuple[Claim, str | None]]) -> dict[str, Any]:
    return {
        "scope": [c.key.scope for c, _ in items],
        "op": [c.key.operation_id for c, _ in items],
        "token": [c.token for c, _ in items],
        "result": [r for _, r in items],
    }


def complete_many_outcomes(
    items: Sequence[tuple[Claim, str | None]], rows: Rows
) -> list[Record | LeaseLost]:
    """complete_many's answer from its statement's rows (one per item, in any order)."""
    rows.sort(key=_ORD)  # updated rows and refused rows come from two branches
    if all(row[1] for row in rows):  # the common case: every claim was current
        return [
            completed_record(c, result, row) for (c, result), row in zip(items, rows, strict=True)
        ]
    out: list[Record | LeaseLost] = []
    done: dict[OpKey, Record] = {}
    for (claim, result), row in zip(items, rows, strict=True):
        if row[1]:
            rec = completed_record(claim, result, row)
            done[claim.key] = rec
            out.append(rec)
        else:
            # what the record is now: completed by an earlier item of this batch, or as read
            current = done.get(claim.key) or record_or_none(row, 2)
            out.append(fence_error(current, claim))
    return out


def mark_started_params(claims: Sequence[Claim]) -> dict[str, Any]:
    return {
        "scope": [c.key.scope for c in claims],
        "op": [c.key.operation_id for c in claims],
        "token": [c.token for c in claims],
    }


def marked_claims(claims: Sequence[Claim], rows: Rows) -> list[Claim | None]:
    """Per claim: itself when the mark_started statement marked it, None when its fence was
    refused (the caller reads the record to build the ``LeaseLost``)."""
    marked = {(scope, op, token) for scope, op, token in rows}
    return [c if (c.key.scope, c.key.operation_id, c.token) in marked else None for c in claims]


def pack_entry(request: QuarantineRequest) -> dict[str, Any]:
    """The quarantine entry's parameters (``request`` is already ``storable()``)."""
    return {
        "id": request.entry_id(),
        "scope": request.scope,
        "reason": request.reason.value,
        "op": request.operation_id,
        "fp": request.fingerprint,
        "risk": request.risk.value,
        "attempts": request.attempts,
        "detail": request.detail,
        "message": request.capped_message(),
        "ctype": request.content_type,
        "published": request.published_at,
        "size": len(request.message or b""),
    }


def decode_record(row: Sequence[Any], o: int = 0) -> Record:
    """The record in ``row[o:o + 14]`` (columns in ``_REC_NAMES`` order), positionally: this runs
    for every item of every batch."""
    return Record(
        OpKey(row[o], row[o + 1]),
        row[o + 2],
        _STATES[row[o + 3]],
        row[o + 4],
        row[o + 5],
        row[o + 6],
        row[o + 7],
        row[o + 8],
        row[o + 9],
        row[o + 10],
        row[o + 11],
        row[o + 12],
        row[o + 13],
    )


def acquired_record(r: ClaimRequest, row: Sequence[Any]) -> Record:
    """The record an acquired claim left: the request's key, fingerprint and owner, the row's
    token, lease, attempts, last_error and times (the columns of ``_ACQUIRED_COLUMNS``)."""
    return Record(
        r.key, r.fingerprint, State.IN_FLIGHT, row[6], r.owner, row[8], row[9], None, row[11],
        row[12], row[13], None, row[15],
    )  # fmt: skip


def completed_record(claim: Claim, result: str | None, row: Sequence[Any]) -> Record:
    """The record a current ``claim`` completed with ``result``: the row of complete_many carries
    only last_error, created_at, updated_at and completed_at (``_COMPLETED_COLUMNS``)."""
    return new_record(
        claim.key, claim.fingerprint, State.COMPLETED, claim.token, claim.owner, None,
        claim.attempt, result, row[11], row[12], row[13], row[14], row[15],
    )  # fmt: skip


def record_or_none(row: Sequence[Any] | None, o: int = 0) -> Record | None:
    return None if row is None or row[o] is None else decode_record(row, o)


_ORD: Final = itemgetter(0)


def fence_error(current: Record | None, claim: Claim) -> LeaseLost:
    """``check_fence``'s ``LeaseLost`` for ``claim`` against ``current``.

    A fenced write can change no row while the record read afterwards still names this claim's
    token: a concurrent call with the same claim won the row in between. That is a lost fence too.
    """
    try:
        check_fence(current, claim)
    except LeaseLost as exc:
        return exc
    return LeaseLost(
        f"claim on {claim.key.scope}/{claim.key.operation_id} with fencing token {claim.token} "
        "lost to a concurrent call with the same claim; do not complete at the broker, the other "
        "call owns the outcome"
    )
