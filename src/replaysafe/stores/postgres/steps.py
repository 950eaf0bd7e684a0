"""Sans-IO steps: work of more than one statement whose logic must exist once for both flavours,
written as a generator. It yields each statement (:data:`~replaysafe.stores.postgres.sql.Step`)
and is sent back its rows; a driver per flavour (:func:`drive_on` / :func:`drive_on_sync` on one
connection, the claim drivers on pooled connections) runs the statements. The generator's return
value is the call's answer."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Final, TypeVar

from replaysafe.errors import LeaseLost, LedgerUnavailable
from replaysafe.ledger._fast import new_acquired, new_claim
from replaysafe.ledger.base import (
    Acquired,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    OpKey,
    Record,
    decide_claim,
)
from replaysafe.stores.postgres.codec import (
    acquired_record,
    fence_error,
    fence_params,
    get_params,
    record_or_none,
)
from replaysafe.stores.postgres.sql import Rows, Step

if TYPE_CHECKING:
    from psycopg import AsyncConnection, Connection

    from replaysafe.stores.postgres.connection import Shared

T = TypeVar("T")

#: how often a claim is re-run when a concurrent transaction committed the row between this
#: statement's snapshot and its conflict check (rare: it needs two claims of one new key at once)
CLAIM_RACE_RETRIES: Final = 5


async def drive_on(conn: AsyncConnection[Any], steps: Generator[Step, Rows, T]) -> T:
    """Run ``steps`` on one async connection (see the section comment); its return value."""
    rows: Any = None  # a generator's first send must be None
    while True:
        try:
            query, params = steps.send(rows)
        except StopIteration as done:
            result: T = done.value
            return result
        cur = await conn.execute(query, params)
        rows = await cur.fetchall() if cur.description is not None else []


def drive_on_sync(conn: Connection[Any], steps: Generator[Step, Rows, T]) -> T:
    """Run ``steps`` on one sync connection: :func:`drive_on` for the sync twin."""
    rows: Any = None
    while True:
        try:
            query, params = steps.send(rows)
        except StopIteration as done:
            result: T = done.value
            return result
        cur = conn.execute(query, params)
        rows = cur.fetchall() if cur.description is not None else []


def complete_in_steps(
    s: Shared, claim: Claim, result: str | None
) -> Generator[Step, Rows, LeaseLost | None]:
    """Both flavours' ``complete_in``, on the transaction's connection: the fenced completion;
    when it changed no row, the record read for the ``LeaseLost`` to raise (returned, not raised:
    the driver maps only driver errors)."""
    rows = yield s.sql("complete"), fence_params(claim, result=result)
    if rows:
        return None
    current = yield s.sql("get"), get_params(claim.key)
    return fence_error(record_or_none(current[0] if current else None), claim)


def claim_steps(
    s: Shared, requests: list[ClaimRequest]
) -> Generator[Step, Rows, list[ClaimOutcome]]:
    """Claims with the semantics of sequential single claims (both flavours' ``claim`` and
    ``claim_many``; each statement may run on its own pooled connection, in binary).

    Round one sends the first request per key; a later copy of a key is decided from what the
    earlier copy left (``decide_claim`` on that record) and only goes to the database when
    that record is claimable (a copy after a Conflict on a released row) — a second round.
    """
    if len(requests) == 1 or len({(r.key.scope, r.key.operation_id) for r in requests}) == len(
        requests
    ):  # no key repeats (the common case): one round, nothing to remember
        return [outcome for outcome, _, _ in (yield from _claim_round(s, requests))]
    out: list[ClaimOutcome | None] = [None] * len(requests)
    known: dict[OpKey, tuple[Record | None, float]] = {}
    pending = list(enumerate(requests))
    while pending:
        send: list[tuple[int, ClaimRequest]] = []
        later: list[tuple[int, ClaimRequest]] = []
        sending: set[OpKey] = set()
        for idx, r in pending:
            if r.key in sending:
                later.append((idx, r))
                continue
            if r.key in known:
                record, db_now = known[r.key]
                outcome, _ = decide_claim(record, r.key, r.fingerprint, r.owner, r.lease, db_now, 0)
                if not isinstance(outcome, Acquired):
                    out[idx] = outcome
                    continue
            sending.add(r.key)
            send.append((idx, r))
        if send:
            results = yield from _claim_round(s, [r for _, r in send])
            for (idx, r), (outcome, row, db_now) in zip(send, results, strict=True):
                out[idx] = outcome
                known[r.key] = (
                    acquired_record(r, row) if row[1] else record_or_none(row, 2),
                    db_now,
                )
        pending = later
    return [o for o in out if o is not None]


def _claim_round(
    s: Shared, requests: list[ClaimRequest]
) -> Generator[Step, Rows, list[tuple[ClaimOutcome, tuple[Any, ...], float]]]:
    """One statement for distinct keys; per request ``(outcome, row, database now)``. For a
    refused claim ``row[2:15]`` is the record; an acquired claim's row carries only what the
    request does not say (see ``_ACQUIRED_COLUMNS``; ``acquired_record`` rebuilds the record
    where it is needed). The row is kept raw: building a Record for every acquired claim
    would cost more than the statement's own parsing."""
    results: list[tuple[ClaimOutcome, tuple[Any, ...], float] | None] = [None] * len(requests)
    todo = list(range(len(requests)))
    for _ in range(CLAIM_RACE_RETRIES):
        batch = [requests[i] for i in todo]
        rows = yield _claim_statement(s, batch)
        retry: list[int] = []
        for row in rows:
            i = todo[row[0] - 1]
            r = requests[i]
            if row[1]:  # written: this claim holds the operation now
                # row: ord, written, -, -, -, -, token(6), -, lease_until(8), attempts(9), -,
                # last_error(11), created_at(12), updated_at(13), -, unstarted_attempt(15),
                # recovered(16), -, previous_started(18)
                claim = new_claim(
                    r.key, r.fingerprint, row[6], r.owner, row[8], row[9], row[16], row[18]
                )
                results[i] = (new_acquired(claim), row, row[13])
                continue
            existing = record_or_none(row, 2)
            db_now = float(row[17])
            outcome, _ = decide_claim(existing, r.key, r.fingerprint, r.owner, r.lease, db_now, 0)
            if isinstance(outcome, Acquired):
                # Nothing was written, yet the row as this statement's snapshot saw it is
                # claimable (or absent): a concurrent claim committed it after the snapshot
                # was taken. A new statement sees the committed row.
                retry.append(i)
            else:
                results[i] = (outcome, row, db_now)
        if not retry:
            break
        todo = retry
    else:
        raise LedgerUnavailable(
            f"claims of {len(todo)} operation(s) kept racing with concurrent claims after "
            f"{CLAIM_RACE_RETRIES} tries (first: {requests[todo[0]].key}); nothing was "
            "written for them: retry later"
        )
    return [r for r in results if r is not None]


def _claim_statement(s: Shared, batch: list[ClaimRequest]) -> Step:
    if len(batch) == 1:
        r = batch[0]
        return s.sql("claim_one"), {
            "scope": r.key.scope,
            "op": r.key.operation_id,
            "fp": r.fingerprint,
            "owner": r.owner,
            "lease": float(r.lease),
            "marks": r.marks_start,
        }
    return s.sql("claim_many"), {
        "scope": [r.key.scope for r in batch],
        "op": [r.key.operation_id for r in batch],
        "fp": [r.fingerprint for r in batch],
        "owner": [r.owner for r in batch],
        "lease": [float(r.lease) for r in batch],
        "marks": [r.marks_start for r in batch],
    }
