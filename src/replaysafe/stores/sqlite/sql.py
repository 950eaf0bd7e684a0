"""The SQLite ledger's statements: every query and write of the operation records, the
quarantine, the pause flags, the purges and the summary, in one place (the tables themselves are
in :mod:`replaysafe.stores.sqlite.schema`). Constants only: nothing here touches a connection.
Values are always bound parameters, never interpolated."""

from __future__ import annotations

from typing import Final

from replaysafe.ledger.base import State

RECORD_COLUMNS = (
    "scope, operation_id, fingerprint, state, token, owner, lease_until, attempts, result, "
    "last_error, created_at, updated_at, completed_at, unstarted_attempt"
)
ENTRY_COLUMNS = (
    "id, scope, reason, operation_id, fingerprint, risk, attempts, first_detail, last_detail, "
    "message, content_type, created_at, updated_at, seen, published_at, message_size, "
    "redriven_at, redrives"
)

SELECT_RECORD = (
    f"SELECT {RECORD_COLUMNS} FROM replaysafe_operations WHERE scope = ? AND operation_id = ?"
)
SAVE_RECORD = f"""
    INSERT INTO replaysafe_operations ({RECORD_COLUMNS})
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (scope, operation_id) DO UPDATE SET
        fingerprint = excluded.fingerprint, state = excluded.state, token = excluded.token,
        owner = excluded.owner, lease_until = excluded.lease_until,
        attempts = excluded.attempts, result = excluded.result,
        last_error = excluded.last_error, created_at = excluded.created_at,
        updated_at = excluded.updated_at, completed_at = excluded.completed_at,
        unstarted_attempt = excluded.unstarted_attempt"""
#: mark_started: the row was read and fenced in the same ``BEGIN IMMEDIATE`` transaction
MARK_STARTED: Final = """
    UPDATE replaysafe_operations SET unstarted_attempt = NULL
    WHERE scope = ? AND operation_id = ?"""
#: The batch paths' narrow write of an EFFECTED operation: the row was read (and fenced) in the
#: same ``BEGIN IMMEDIATE`` transaction, so only the columns that change are written.
COMPLETE_RECORD = f"""
    UPDATE replaysafe_operations
    SET state = '{State.COMPLETED.value}', result = ?, lease_until = NULL, updated_at = ?,
        completed_at = ?
    WHERE scope = ? AND operation_id = ?"""
#: keys one batched read binds at most (far below SQLite's host-parameter limit)
READ_CHUNK: Final = 256
SELECT_ENTRY = f"SELECT {ENTRY_COLUMNS} FROM replaysafe_quarantine WHERE id = ?"
PAUSE = """
    INSERT INTO replaysafe_paused (handler, reason, paused_by, since) VALUES (?, ?, ?, ?)
    ON CONFLICT (handler) DO UPDATE SET
        reason = excluded.reason, paused_by = excluded.paused_by, since = excluded.since"""
RESUME = "DELETE FROM replaysafe_paused WHERE handler = ?"
LIST_PAUSED = "SELECT handler, reason, paused_by, since FROM replaysafe_paused ORDER BY handler"
SAVE_ENTRY = f"""
    INSERT INTO replaysafe_quarantine ({ENTRY_COLUMNS})
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET
        risk = excluded.risk, attempts = excluded.attempts,
        last_detail = excluded.last_detail, updated_at = excluded.updated_at,
        seen = excluded.seen, redriven_at = excluded.redriven_at,
        redrives = excluded.redrives"""
LIST_ENTRIES = f"""
    SELECT {ENTRY_COLUMNS} FROM replaysafe_quarantine
    WHERE ?1 IS NULL OR reason = ?1
    ORDER BY created_at, id
    LIMIT ?2"""
#: One bounded statement: the subquery walks the (state, completed_at) index oldest first and stops
#: after ``limit`` rows, so a purge never scans or locks more than it deletes.
PURGE_SQL: Final = """
    DELETE FROM replaysafe_operations
    WHERE (scope, operation_id) IN (
        SELECT scope, operation_id FROM replaysafe_operations
        WHERE state = ? AND completed_at < ?
        ORDER BY completed_at
        LIMIT ?
    )"""
#: One bounded statement: walks the (created_at, id) index oldest first, up to ``older_than``
#: (infinity when not filtering, so it is always an index range), and stops after ``limit``
#: matches. ids (NULL: not filtering) travel as one JSON array: any number of them, one statement,
#: no host-parameter limit.
PURGE_QUARANTINE_SQL: Final = """
    DELETE FROM replaysafe_quarantine
    WHERE id IN (
        SELECT id FROM replaysafe_quarantine
        WHERE created_at < ?3
          AND (?1 IS NULL OR id IN (SELECT value FROM json_each(?1)))
          AND (?2 IS NULL OR reason = ?2)
        ORDER BY created_at, id
        LIMIT ?4
    )"""
# summary(): each query is answered from an index. Counts by state scan only the (state,
# completed_at) index (it covers them); the in-flight rows (few: one per running handler, plus
# crashed ones) and the last hour's completions are ranges of that index.
SUMMARY_BY_STATE: Final = "SELECT state, count(*) FROM replaysafe_operations GROUP BY state"
SUMMARY_IN_FLIGHT: Final = """
    SELECT coalesce(sum(lease_until <= ?), 0), min(updated_at)
    FROM replaysafe_operations WHERE state = 'in_flight'"""
SUMMARY_RECENT: Final = """
    SELECT count(*) FROM replaysafe_operations WHERE state = 'completed' AND completed_at >= ?"""
SUMMARY_HOT: Final = """
    SELECT scope, operation_id, attempts FROM replaysafe_operations
    WHERE attempts > 1
    ORDER BY attempts DESC, scope, operation_id
    LIMIT ?"""
SUMMARY_REASONS: Final = "SELECT reason, count(*) FROM replaysafe_quarantine GROUP BY reason"


def select_many_sql(n: int) -> str:
    return (
        f"SELECT {RECORD_COLUMNS} FROM replaysafe_operations "
        f"WHERE scope = ? AND operation_id IN ({', '.join('?' * n)})"
    )


#: the batched read for 1, 2, 4 … ``READ_CHUNK`` keys: a batch is padded to the next size (with
#: a repeated key), so a handful of statements stay prepared in the connection's cache
SELECT_MANY: Final = {1 << i: select_many_sql(1 << i) for i in range(READ_CHUNK.bit_length())}
