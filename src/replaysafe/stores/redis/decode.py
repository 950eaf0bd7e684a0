"""What the Redis ledger's scripts and reads answer, as replaysafe values: records, quarantine
entries, claim outcomes, completions and fences. No I/O: the async ledger and its sync twin
decode the very same replies here (the scripts' reply shapes are described in :mod:`.scripts`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from replaysafe.errors import ConfigurationError, LeaseLost, LedgerError
from replaysafe.ledger._fast import new_acquired, new_claim, new_record
from replaysafe.ledger.base import (
    AlreadyDone,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    Conflict,
    InFlight,
    OpKey,
    Quarantined,
    QuarantineEntry,
    Record,
    State,
    check_fence,
)
from replaysafe.quarantine import EffectRisk, QuarantineReason

_US: Final = 1_000_000  # microseconds per second: times are integer microseconds in Redis


def _b(text: str) -> bytes:
    # surrogatepass: a str that Python can hold must never turn into a raw UnicodeEncodeError
    return text.encode("utf-8", "surrogatepass")


def _s(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "surrogatepass")


def _us(seconds: float, what: str) -> int:
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(f"{what} must be a finite number of seconds >= 0, got {seconds!r}")
    return round(seconds * _US)


def _pairs(flat: Sequence[Any]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _opt_time(h: Mapping[bytes, bytes], field: bytes) -> float | None:
    raw = h.get(field)
    return None if raw is None else int(raw) / _US


def _opt_str(h: Mapping[bytes, bytes], field: bytes) -> str | None:
    raw = h.get(field)
    return None if raw is None else _s(raw)


def _record(key: OpKey, h: Mapping[bytes, bytes]) -> Record | None:
    if b"state" not in h:
        return None
    return Record(
        key=key,
        fingerprint=_s(h[b"fingerprint"]),
        state=State(_s(h[b"state"])),
        token=int(h[b"token"]),
        owner=_opt_str(h, b"owner"),
        lease_until=_opt_time(h, b"lease_until"),
        attempts=int(h[b"attempts"]),
        result=_opt_str(h, b"result"),
        last_error=_opt_str(h, b"last_error"),
        created_at=int(h[b"created_at"]) / _US,
        updated_at=int(h[b"updated_at"]) / _US,
        completed_at=_opt_time(h, b"completed_at"),
        unstarted_attempt=int(h[b"unstarted_attempt"]) if b"unstarted_attempt" in h else None,
    )


def _entry(h: Mapping[bytes, bytes]) -> QuarantineEntry:
    return QuarantineEntry(
        id=_s(h[b"id"]),
        scope=_s(h[b"scope"]),
        reason=QuarantineReason(_s(h[b"reason"])),
        operation_id=_opt_str(h, b"operation_id"),
        fingerprint=_opt_str(h, b"fingerprint"),
        risk=EffectRisk(_s(h[b"risk"])),
        attempts=int(h[b"attempts"]),
        first_detail=_s(h[b"first_detail"]),
        last_detail=_s(h[b"last_detail"]),
        message=h.get(b"message"),
        content_type=_opt_str(h, b"content_type"),
        created_at=int(h[b"created_at"]) / _US,
        updated_at=int(h[b"updated_at"]) / _US,
        seen=int(h[b"seen"]),
        published_at=_opt_time(h, b"published_at"),
        # entries written before message_size was kept: the copy is all that is known
        message_size=int(h.get(b"message_size") or len(h.get(b"message") or b"")),
        redriven_at=_opt_time(h, b"redriven_at"),
        redrives=int(h.get(b"redrives") or 0),
    )


def _refused_claim(key: OpKey, kind: bytes, item: Sequence[Any]) -> ClaimOutcome:
    """The outcome of a claim the script did not grant: ``item`` = {kind, field, value, ...}."""
    rec = _record(key, _pairs(item[1:]))
    if rec is None:  # pragma: no cover - every refused claim carries the record
        raise LedgerError(f"claim on {key} returned no record; this is a replaysafe bug")
    if kind == b"in_flight":
        return InFlight(rec)
    if kind == b"already_done":
        return AlreadyDone(rec)
    if kind == b"conflict":
        return Conflict(rec)
    return Quarantined(rec)


def _fence(claim: Claim, reply: Sequence[Any], *, fields_at: int = 2) -> None:
    """Raise ``LeaseLost`` (through ``check_fence``, one wording) for a refused fenced call:
    ``reply[0] == b'lease_lost'``, the record's fields and values from ``reply[fields_at]``."""
    if reply[0] == b"lease_lost":
        check_fence(_record(claim.key, _pairs(reply[fields_at:])), claim)
        # check_fence found the claim current, yet the script refused it: never ignore that
        raise LedgerError(
            f"the Redis ledger refused claim token {claim.token} on {claim.key} although the "
            "record names it current; this is a replaysafe bug, please report it"
        )


def _claim_outcomes(
    requests: Sequence[ClaimRequest], lease_us: Mapping[float, int], reply: list[Any]
) -> list[ClaimOutcome]:
    """The outcomes of one claim script reply (``reply[0]`` Redis TIME, then one item per
    request, in order; see ``_CLAIM``)."""
    # lease_until exactly as the script stored it: integer us (now + lease), / 1e6
    until = {lease: (reply[0] + us) / _US for lease, us in lease_us.items()}
    out: list[ClaimOutcome] = []
    for r, item in zip(requests, reply[1:], strict=True):
        if type(item) is int:  # a new operation acquired: its token
            claim = new_claim(r.key, r.fingerprint, item, r.owner, until[r.lease], 1, False, True)
            out.append(new_acquired(claim))
        elif type(item[0]) is int:  # {token, attempts, recovered, previous_started}
            claim = new_claim(
                r.key, r.fingerprint, item[0], r.owner, until[r.lease], item[1],
                item[2] == 1, item[3] == 1,
            )  # fmt: skip
            out.append(new_acquired(claim))
        else:
            out.append(_refused_claim(r.key, item[0], item))
    return out


def _completions(
    items: Sequence[tuple[Claim, str | None]], reply: list[Any]
) -> list[Record | LeaseLost]:
    """The results of one complete script reply (``reply[0]`` Redis TIME, then one item per
    request, in order; see ``_COMPLETE``)."""
    now = reply[0] / _US
    completed = State.COMPLETED
    out: list[Record | LeaseLost] = []
    for (claim, result), item in zip(items, reply[1:], strict=True):
        # completed: created_at, or {created_at, last_error}; the fingerprint, owner and
        # attempts are the claim's (the token was current, see the script); the result is what
        # the script stored, byte for byte
        if type(item) is int:
            error, created = None, item
        elif type(item[0]) is int:
            error, created = item[1].decode("utf-8", "surrogatepass"), item[0]
        else:
            try:
                _fence(claim, item, fields_at=1)
            except LeaseLost as exc:
                out.append(exc)
            continue
        record = new_record(
            claim.key, claim.fingerprint, completed, claim.token, claim.owner, None,
            claim.attempt, result, error, created / _US, now, now, None,
        )  # fmt: skip
        out.append(record)
    return out


def _marked(claims: Sequence[Claim], reply: list[Any]) -> list[Claim | LeaseLost]:
    """The results of one mark_started script reply (see ``_MARK_STARTED``)."""
    out: list[Claim | LeaseLost] = []
    for c, item in zip(claims, reply[1:], strict=True):
        if type(item) is int:
            out.append(c)
            continue
        try:
            _fence(c, item, fields_at=1)
        except LeaseLost as exc:
            out.append(exc)
    return out


def _extended(claim: Claim, reply: list[Any]) -> Claim:
    _fence(claim, reply)
    return Claim(
        claim.key, claim.fingerprint, claim.token, claim.owner, int(reply[2]) / _US,
        claim.attempt, claim.recovered, claim.previous_started,
    )  # fmt: skip
