"""Rows of the ledger's tables <-> replaysafe values (records, quarantine entries), and the
column lists the statements share. Pure: no connection here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from replaysafe.ledger.base import OpKey, QuarantineEntry, Record, State, entry_from_row

#: the operation record's columns, in :func:`record` order
RECORD_COLUMNS: Final = (
    "scope",
    "operation_id",
    "fingerprint",
    "state",
    "token",
    "owner",
    "lease_until",
    "attempts",
    "result",
    "last_error",
    "created_at",
    "updated_at",
    "completed_at",
    "unstarted_attempt",
)
RECORD_SELECT: Final = ", ".join(RECORD_COLUMNS)

#: the quarantine entry's columns, in :func:`~replaysafe.ledger.base.entry_from_row` order
ENTRY_COLUMNS: Final = (
    "id",
    "scope",
    "reason",
    "operation_id",
    "fingerprint",
    "risk",
    "attempts",
    "first_detail",
    "last_detail",
    "message",
    "content_type",
    "created_at",
    "updated_at",
    "seen",
    "published_at",
    "message_size",
    "redriven_at",
    "redrives",
)
ENTRY_SELECT: Final = ", ".join(ENTRY_COLUMNS)

_STATES: Final = {s.value: s for s in State}


def key_bytes(text: str) -> bytes:
    """A key (scope, operation id, handler) as stored: its UTF-8 bytes, verbatim (a NUL is kept;
    a lone surrogate has no UTF-8 form and raises ``UnicodeEncodeError``, which the store reports
    as ``LedgerDataError``)."""
    return text.encode("utf-8")


def key_text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes | bytearray) else value


def key_params(key: OpKey) -> tuple[bytes, bytes]:
    return key_bytes(key.scope), key_bytes(key.operation_id)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def record(row: Sequence[Any]) -> Record:
    """A record from a row of :data:`RECORD_COLUMNS`."""
    return Record(
        key=OpKey(row[0].decode("utf-8"), row[1].decode("utf-8")),
        fingerprint=row[2],
        state=_STATES[row[3]],
        token=int(row[4]),
        owner=row[5],
        lease_until=_float(row[6]),
        attempts=int(row[7]),
        result=row[8],
        last_error=row[9],
        created_at=float(row[10]),
        updated_at=float(row[11]),
        completed_at=_float(row[12]),
        unstarted_attempt=None if row[13] is None else int(row[13]),
    )


def record_params(rec: Record) -> tuple[Any, ...]:
    """A record's values in :data:`RECORD_COLUMNS` order."""
    scope, op = key_params(rec.key)
    return (
        scope, op, rec.fingerprint, rec.state.value, rec.token, rec.owner, rec.lease_until,
        rec.attempts, rec.result, rec.last_error, rec.created_at, rec.updated_at,
        rec.completed_at, rec.unstarted_attempt,
    )  # fmt: skip


def entry(row: Sequence[Any]) -> QuarantineEntry:
    """A quarantine entry from a row of :data:`ENTRY_COLUMNS` (keys decoded from bytes)."""
    values = list(row)
    values[1] = key_text(values[1])
    values[3] = key_text(values[3])
    for i in (11, 12, 14, 16):
        values[i] = _float(values[i])
    values[15] = int(values[15])
    return entry_from_row(values)


def entry_params(e: QuarantineEntry) -> tuple[Any, ...]:
    """An entry's values in :data:`ENTRY_COLUMNS` order."""
    return (
        e.id, key_bytes(e.scope), e.reason.value,
        None if e.operation_id is None else key_bytes(e.operation_id), e.fingerprint,
        e.risk.value, e.attempts, e.first_detail, e.last_detail, e.message, e.content_type,
        e.created_at, e.updated_at, e.seen, e.published_at, e.message_size, e.redriven_at,
        e.redrives,
    )  # fmt: skip


def placeholders(columns: int, rows: int = 1) -> str:
    """``(%s, …), (%s, …)``: ``rows`` groups of ``columns`` placeholders."""
    one = "(" + ", ".join(["%s"] * columns) + ")"
    return ", ".join([one] * rows)


def upsert_sql(table: str, columns: Sequence[str], rows: int, *, update: bool) -> str:
    """A multi-row ``INSERT`` of ``columns``; with ``update`` every column is overwritten on a
    duplicate key (used only for rows this transaction holds locked, so they exist)."""
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES {placeholders(len(columns), rows)}"
    if update:
        sql += " ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = VALUES({c})" for c in columns)
    return sql


def keys_where(count: int) -> str:
    """``(scope = %s AND operation_id = %s) OR …`` for ``count`` keys: ORed equalities, read
    as primary-key ranges under ``FORCE INDEX (PRIMARY)`` (so a locking read locks only them)."""
    return " OR ".join(["(scope = %s AND operation_id = %s)"] * count)


__all__ = [
    "ENTRY_COLUMNS",
    "ENTRY_SELECT",
    "RECORD_COLUMNS",
    "RECORD_SELECT",
    "entry",
    "entry_params",
    "key_bytes",
    "key_params",
    "key_text",
    "keys_where",
    "placeholders",
    "record",
    "record_params",
    "upsert_sql",
]
