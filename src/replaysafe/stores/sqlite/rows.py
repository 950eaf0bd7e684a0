"""Operation records and quarantine entries to and from SQLite rows, and the reads and writes
the state transitions are made of (one record, a batch read, a fenced batch write). Each runs on
the connection it is given, inside the caller's transaction; none begins or commits."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Final

from replaysafe.errors import LeaseLost
from replaysafe.ledger._fast import new_record
from replaysafe.ledger.base import Claim, OpKey, QuarantineEntry, Record, State, check_fence
from replaysafe.stores.sqlite.sql import (
    READ_CHUNK,
    SAVE_ENTRY,
    SAVE_RECORD,
    SELECT_MANY,
    SELECT_RECORD,
)


def load(conn: sqlite3.Connection, key: OpKey) -> Record | None:
    """The stored record of ``key``, or None."""
    row = conn.execute(SELECT_RECORD, (key.scope, key.operation_id)).fetchone()
    return None if row is None else record_from_row(row)


def save(conn: sqlite3.Connection, rec: Record) -> None:
    """Insert or overwrite the whole row of ``rec``."""
    conn.execute(SAVE_RECORD, record_params(rec))


def record_from_row(row: tuple[Any, ...]) -> Record:
    state = STATES.get(row[3])
    return new_record(
        OpKey(row[0], row[1]),
        row[2],
        State(row[3]) if state is None else state,  # an unknown value raises as before
        row[4], row[5], row[6], row[7], row[8], row[9], row[10], row[11], row[12], row[13],
    )  # fmt: skip


#: ``State`` by stored value (the enum's own lookup costs more than the rest of a row)
STATES: Final = {s.value: s for s in State}


def record_params(rec: Record) -> tuple[Any, ...]:
    """``rec`` as the parameters of ``SAVE_RECORD`` (the order of ``RECORD_COLUMNS``)."""
    return (
        rec.key.scope,
        rec.key.operation_id,
        rec.fingerprint,
        rec.state.value,
        rec.token,
        rec.owner,
        rec.lease_until,
        rec.attempts,
        rec.result,
        rec.last_error,
        rec.created_at,
        rec.updated_at,
        rec.completed_at,
        rec.unstarted_attempt,
    )


def save_entry(conn: sqlite3.Connection, entry: QuarantineEntry) -> None:
    conn.execute(
        SAVE_ENTRY,
        (
            entry.id,
            entry.scope,
            entry.reason.value,
            entry.operation_id,
            entry.fingerprint,
            entry.risk.value,
            entry.attempts,
            entry.first_detail,
            entry.last_detail,
            entry.message,
            entry.content_type,
            entry.created_at,
            entry.updated_at,
            entry.seen,
            entry.published_at,
            entry.message_size,
            entry.redriven_at,
            entry.redrives,
        ),
    )


def load_many(conn: sqlite3.Connection, keys: list[OpKey]) -> dict[tuple[str, str], Record]:
    """The stored records of ``keys`` by ``(scope, operation_id)`` (a key without a record is
    absent), read with one indexed statement per scope and ``READ_CHUNK`` keys. The ids are bound
    as parameters, exactly as the single-row statements bind them, so a key matches here if and
    only if ``SELECT_RECORD`` would find it."""
    if len(keys) == 1:
        # batch 1 (every claim/complete): the same statement, without the grouping and padding
        # (measured: most of this function's own cost at batch 1)
        row = conn.execute(SELECT_MANY[1], (keys[0].scope, keys[0].operation_id)).fetchone()
        return {} if row is None else {(row[0], row[1]): record_from_row(row)}
    by_scope: dict[str, list[str]] = {}
    for key in keys:
        by_scope.setdefault(key.scope, []).append(key.operation_id)
    found: dict[tuple[str, str], Record] = {}
    for scope, ids in by_scope.items():
        distinct = list(dict.fromkeys(ids))
        for start in range(0, len(distinct), READ_CHUNK):
            chunk = distinct[start : start + READ_CHUNK]
            size = 1 << (len(chunk) - 1).bit_length()
            params = [scope, *chunk]
            params += [chunk[-1]] * (size - len(chunk))
            for row in conn.execute(SELECT_MANY[size], params):
                found[(row[0], row[1])] = record_from_row(row)
    return found


def completed(rec: Record, result: str | None, now: float) -> tuple[Record, tuple[Any, ...]]:
    """``rec`` (fenced) completed at ``now``, and the parameters of ``COMPLETE_RECORD``."""
    done = new_record(
        rec.key, rec.fingerprint, State.COMPLETED, rec.token, rec.owner, None, rec.attempts,
        result, rec.last_error, rec.created_at, now, now, rec.unstarted_attempt,
    )  # fmt: skip
    return done, (result, now, now, rec.key.scope, rec.key.operation_id)


def fence_each(
    conn: sqlite3.Connection,
    claims: Sequence[Claim],
    sql: str,
    step: Callable[[int, Record], tuple[Record, tuple[Any, ...]] | None],
) -> list[Record | LeaseLost]:
    """The batch paths' fenced write, inside the caller's ``BEGIN IMMEDIATE``: the records of
    ``claims`` are read with one batched statement, then each claim is fenced in order
    (:func:`check_fence`) against what the earlier items made of its record. A stale claim yields
    its ``LeaseLost`` in place and writes nothing; for a current one, ``step(index, record)``
    returns the record it becomes and the parameters of ``sql`` that write it (None: nothing to
    write; the record is returned as it is). The writes go out in one ``executemany``."""
    current = load_many(conn, [claim.key for claim in claims])
    out: list[Record | LeaseLost] = []
    writes: list[tuple[Any, ...]] = []
    for i, claim in enumerate(claims):
        k = (claim.key.scope, claim.key.operation_id)
        try:
            rec = check_fence(current.get(k), claim)
        except LeaseLost as exc:
            out.append(exc)
            continue
        changed = step(i, rec)
        if changed is not None:
            rec, params = changed
            current[k] = rec
            writes.append(params)
        out.append(rec)
    if writes:
        conn.executemany(sql, writes)
    return out
