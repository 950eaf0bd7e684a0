"""SQLite ledger: one durable file, safe for many coroutines and for several processes sharing it.

How it stays correct:

- **One writer at a time, decided by SQLite.** Every read-decide-write (claim, extend, complete,
  release, quarantine, redrive, purge, purge_quarantine) runs inside ``BEGIN IMMEDIATE``: the
  write lock is taken *before* the record is read, so two processes can never both read "free"
  and both claim. The state machine itself is ``decide_claim`` / ``check_fence`` from
  :mod:`replaysafe.ledger.base`, shared with every other backend.
- **Fencing tokens come from a one-row meta table** bumped in the same transaction as the claim, so
  they strictly increase across the whole file: across operations, processes and restarts.
- **Durability.** WAL journal, ``PRAGMA synchronous=FULL`` by default: a call that returned has been
  fsynced. ``claim_many`` and ``complete_many`` are one transaction (one fsync) per batch.
- **The event loop never blocks on disk.** The connection lives on one dedicated thread (a
  single-worker executor); an ``asyncio.Lock`` serialises use of it. The lock is what lets an open
  :meth:`SQLiteLedger.transaction` keep the connection across ``await`` points.
- **Time** is the injected :class:`~replaysafe.clock.Clock`, stored as REAL POSIX seconds; leases
  are judged by it (processes sharing a file must share a sane wall clock, as with any lease).

What a caller can lose or see twice: a call that was cancelled, or that raised
``LedgerUnavailable`` on a disk error at commit, may or may not have committed. That is never
unsafe: an unknown claim expires and is taken over with ``recovered=True``; an unknown completion is
found by the next claim as ``AlreadyDone``. The caller must only *not* complete at the broker
after such an error, exactly as after ``LeaseLost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, ClassVar, Final, Self, TypeVar

from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.errors import (
    ConfigurationError,
    LeaseLost,
    LedgerDataError,
    LedgerError,
    LedgerUnavailable,
)
from replaysafe.ledger._fast import new_record
from replaysafe.ledger.base import (
    Acquired,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    LedgerSummary,
    OpKey,
    PauseState,
    QuarantineEntry,
    QuarantineRequest,
    Record,
    State,
    Transaction,
    TransactionalLedger,
    check_fence,
    check_handler_name,
    decide_claim,
    entry_from_row,
    merge_quarantine,
    pause_text,
    storable_text,
    unknown_entry,
)
from replaysafe.ledger.durability import Durability, assess_sqlite
from replaysafe.quarantine import QuarantineReason

T = TypeVar("T")


def _noop() -> None:
    return None


#: errors caused by the data of a call, not by the file or the disk (a retry cannot help): a
#: violated constraint, a value SQLite or the driver cannot bind (a str with a lone surrogate has
#: no UTF-8 form; an int beyond 64 bits), a value of a type it cannot store
_DATA_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    UnicodeEncodeError,
    OverflowError,
)

#: accepted values of ``PRAGMA synchronous`` (anything else is refused, never interpolated)
SYNCHRONOUS_MODES: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})

#: ``PRAGMA synchronous`` answers with a number
_SYNCHRONOUS_NAMES: Final = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}

#: 2: quarantine entries keep ``published_at``, ``message_size``, ``redriven_at``, ``redrives``;
#: index of retried operations for :meth:`SQLiteLedger.summary`.
#: 3: ``replaysafe_paused``, the handlers paused by ``replaysafe handler pause``.
#: 4: ``replaysafe_operations.unstarted_attempt`` (``mark_started``); NULL in older rows, which a
#: recovering claim reads conservatively as "may have started".
SCHEMA_VERSION: Final = 4

_RECORD_COLUMNS = (
    "scope, operation_id, fingerprint, state, token, owner, lease_until, attempts, result, "
    "last_error, created_at, updated_at, completed_at, unstarted_attempt"
)
_ENTRY_COLUMNS = (
    "id, scope, reason, operation_id, fingerprint, risk, attempts, first_detail, last_detail, "
    "message, content_type, created_at, updated_at, seen, published_at, message_size, "
    "redriven_at, redrives"
)

_SCHEMA: Final = (
    # The key is the composite (scope, operation_id): ("a:b", "c") and ("a", "b:c") never collide.
    """CREATE TABLE IF NOT EXISTS replaysafe_operations (
        scope        TEXT    NOT NULL,
        operation_id TEXT    NOT NULL,
        fingerprint  TEXT    NOT NULL,
        state        TEXT    NOT NULL,
        token        INTEGER NOT NULL,
        owner        TEXT,
        lease_until  REAL,
        attempts     INTEGER NOT NULL,
        result       TEXT,
        last_error   TEXT,
        created_at   REAL    NOT NULL,
        updated_at   REAL    NOT NULL,
        completed_at REAL,
        unstarted_attempt INTEGER,
        PRIMARY KEY (scope, operation_id)
    ) WITHOUT ROWID""",
    # purge walks only completed rows, oldest first, and stops at its limit
    """CREATE INDEX IF NOT EXISTS replaysafe_operations_purge
        ON replaysafe_operations (state, completed_at)""",
    """CREATE TABLE IF NOT EXISTS replaysafe_quarantine (
        id           TEXT    PRIMARY KEY,
        scope        TEXT    NOT NULL,
        reason       TEXT    NOT NULL,
        operation_id TEXT,
        fingerprint  TEXT,
        risk         TEXT    NOT NULL,
        attempts     INTEGER NOT NULL,
        first_detail TEXT    NOT NULL,
        last_detail  TEXT    NOT NULL,
        message      BLOB,
        content_type TEXT,
        created_at   REAL    NOT NULL,
        updated_at   REAL    NOT NULL,
        seen         INTEGER NOT NULL,
        published_at REAL,
        message_size INTEGER NOT NULL DEFAULT 0,
        redriven_at  REAL,
        redrives     INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE INDEX IF NOT EXISTS replaysafe_quarantine_by_reason
        ON replaysafe_quarantine (reason, created_at)""",
    # listing and purge_quarantine walk entries oldest first and stop at their limit
    """CREATE INDEX IF NOT EXISTS replaysafe_quarantine_by_time
        ON replaysafe_quarantine (created_at, id)""",
    # summary()'s hot operations: only retried rows are indexed (most operations succeed on their
    # first attempt), so it stays small and a first claim never touches it
    """CREATE INDEX IF NOT EXISTS replaysafe_operations_hot
        ON replaysafe_operations (attempts DESC, scope, operation_id) WHERE attempts > 1""",
    # One row: the last fencing token issued by any connection to this file.
    """CREATE TABLE IF NOT EXISTS replaysafe_meta (
        id             INTEGER PRIMARY KEY CHECK (id = 1),
        last_token     INTEGER NOT NULL,
        schema_version INTEGER NOT NULL
    )""",
    f"""INSERT OR IGNORE INTO replaysafe_meta (id, last_token, schema_version)
        VALUES (1, 0, {SCHEMA_VERSION})""",
    # Version 3: one row per paused handler (no row: running). Created IF NOT EXISTS on every
    # open, so an older file gains it before _upgrade moves its version.
    """CREATE TABLE IF NOT EXISTS replaysafe_paused (
        handler   TEXT PRIMARY KEY,
        reason    TEXT NOT NULL,
        paused_by TEXT NOT NULL,
        since     REAL NOT NULL
    ) WITHOUT ROWID""",
)

#: Columns a version-1 file lacks, added by ``ALTER TABLE`` when the file is opened (SQLite has no
#: ``ADD COLUMN IF NOT EXISTS``: ``PRAGMA table_info`` decides). Constant definitions only.
_ADDED_QUARANTINE_COLUMNS: Final = (
    ("published_at", "REAL"),
    ("message_size", "INTEGER NOT NULL DEFAULT 0"),
    ("redriven_at", "REAL"),
    ("redrives", "INTEGER NOT NULL DEFAULT 0"),
)

#: Columns an older file lacks in ``replaysafe_operations``, added by ``ALTER TABLE`` on open.
_ADDED_OPERATION_COLUMNS: Final = (("unstarted_attempt", "INTEGER"),)

_SELECT_RECORD = (
    f"SELECT {_RECORD_COLUMNS} FROM replaysafe_operations WHERE scope = ? AND operation_id = ?"
)
_SAVE_RECORD = f"""
    INSERT INTO replaysafe_operations ({_RECORD_COLUMNS})
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (scope, operation_id) DO UPDATE SET
        fingerprint = excluded.fingerprint, state = excluded.state, token = excluded.token,
        owner = excluded.owner, lease_until = excluded.lease_until,
        attempts = excluded.attempts, result = excluded.result,
        last_error = excluded.last_error, created_at = excluded.created_at,
        updated_at = excluded.updated_at, completed_at = excluded.completed_at,
        unstarted_attempt = excluded.unstarted_attempt"""
#: mark_started: the row was read and fenced in the same ``BEGIN IMMEDIATE`` transaction
_MARK_STARTED: Final = """
    UPDATE replaysafe_operations SET unstarted_attempt = NULL
    WHERE scope = ? AND operation_id = ?"""
#: The batch paths' narrow write of an EFFECTED operation: the row was read (and fenced) in the
#: same ``BEGIN IMMEDIATE`` transaction, so only the columns that change are written.
_COMPLETE_RECORD = f"""
    UPDATE replaysafe_operations
    SET state = '{State.COMPLETED.value}', result = ?, lease_until = NULL, updated_at = ?,
        completed_at = ?
    WHERE scope = ? AND operation_id = ?"""
#: keys one batched read binds at most (far below SQLite's host-parameter limit)
_READ_CHUNK: Final = 256
_SELECT_ENTRY = f"SELECT {_ENTRY_COLUMNS} FROM replaysafe_quarantine WHERE id = ?"
_PAUSE = """
    INSERT INTO replaysafe_paused (handler, reason, paused_by, since) VALUES (?, ?, ?, ?)
    ON CONFLICT (handler) DO UPDATE SET
        reason = excluded.reason, paused_by = excluded.paused_by, since = excluded.since"""
_RESUME = "DELETE FROM replaysafe_paused WHERE handler = ?"
_LIST_PAUSED = "SELECT handler, reason, paused_by, since FROM replaysafe_paused ORDER BY handler"
_SAVE_ENTRY = f"""
    INSERT INTO replaysafe_quarantine ({_ENTRY_COLUMNS})
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET
        risk = excluded.risk, attempts = excluded.attempts,
        last_detail = excluded.last_detail, updated_at = excluded.updated_at,
        seen = excluded.seen, redriven_at = excluded.redriven_at,
        redrives = excluded.redrives"""
_LIST_ENTRIES = f"""
    SELECT {_ENTRY_COLUMNS} FROM replaysafe_quarantine
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
_SUMMARY_BY_STATE: Final = "SELECT state, count(*) FROM replaysafe_operations GROUP BY state"
_SUMMARY_IN_FLIGHT: Final = """
    SELECT coalesce(sum(lease_until <= ?), 0), min(updated_at)
    FROM replaysafe_operations WHERE state = 'in_flight'"""
_SUMMARY_RECENT: Final = """
    SELECT count(*) FROM replaysafe_operations WHERE state = 'completed' AND completed_at >= ?"""
_SUMMARY_HOT: Final = """
    SELECT scope, operation_id, attempts FROM replaysafe_operations
    WHERE attempts > 1
    ORDER BY attempts DESC, scope, operation_id
    LIMIT ?"""
_SUMMARY_REASONS: Final = "SELECT reason, count(*) FROM replaysafe_quarantine GROUP BY reason"


@dataclass(frozen=True, slots=True)
class SQLiteResult:
    """What :meth:`SQLiteTransaction.execute` returns.

    Rows are fetched on the connection's thread before returning: handing a live ``sqlite3.Cursor``
    to the event loop would touch the connection from two threads.
    """

    rowcount: int
    lastrowid: int | None
    rows: list[tuple[Any, ...]]


class SQLiteTransaction(Transaction):
    """An open ``BEGIN IMMEDIATE`` transaction on the ledger's connection.

    Valid only inside its ``async with ledger.transaction()`` block. Errors of the caller's own
    SQL propagate unchanged (``sqlite3.IntegrityError`` …) so a handler can react to them; the
    block then rolls back when the exception leaves it.
    """

    def __init__(self, ledger: SQLiteLedger, generation: int) -> None:
        self._ledger = ledger
        self._generation = generation
        self._open = True

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> SQLiteResult:
        self._check_open()
        core = self._ledger._core
        return await self._ledger._run(partial(core.tx_execute, self._generation, sql, params))

    async def fetchall(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[tuple[Any, ...]]:
        return (await self.execute(sql, params)).rows

    def _check_open(self) -> None:
        if not self._open:
            raise LedgerError(
                "this transaction is finished (committed or rolled back); open a new one with "
                "`async with ledger.transaction() as tx`"
            )

    def __repr__(self) -> str:
        return f"SQLiteTransaction({self._ledger.path!r}, open={self._open})"


class SyncSQLiteTransaction:
    """An open ``BEGIN IMMEDIATE`` transaction on a :class:`SyncSQLiteLedger`'s connection: the
    sync mirror of :class:`SQLiteTransaction` (the same placeholders, ``?`` or ``:name``, and the
    same :class:`SQLiteResult`, its rows fetched, so no live cursor outlives the block).

    Valid only inside its ``with ledger.transaction()`` block, and from the thread running that
    block (or one it waits for): the connection runs one statement at a time. Errors of the
    caller's own SQL propagate unchanged (``sqlite3.IntegrityError`` …) so a handler can react to
    them; the block then rolls back when the exception leaves it.
    """

    def __init__(self, ledger: SyncSQLiteLedger, generation: int) -> None:
        self._ledger = ledger
        self._generation = generation
        self._open = True

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> SQLiteResult:
        """Run one statement inside the transaction; its rows are fetched into the result."""
        self._check_open()
        return self._ledger._core.tx_execute(self._generation, sql, params)

    def fetchall(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[tuple[Any, ...]]:
        """Run a query inside the transaction and return all rows."""
        return self.execute(sql, params).rows

    def _check_open(self) -> None:
        if not self._open:
            raise LedgerError(
                "this transaction is finished (committed or rolled back); open a new one with "
                "`with ledger.transaction() as tx`"
            )

    def __repr__(self) -> str:
        return f"SyncSQLiteTransaction({self._ledger.path!r}, open={self._open})"


class SQLiteLedger(TransactionalLedger):
    """The replay ledger in a SQLite file (WAL). See the module docstring for the design.

    While a :meth:`transaction` is open, every other call on this ledger object waits for it (the
    connection and SQLite's single write lock belong to that transaction), and other processes'
    writes wait up to ``busy_timeout``. Keep transactions short: the business rows and
    :meth:`complete_in`, not network calls. Calling this ledger's other methods from *inside* its
    own transaction, in the same task, raises ``ConfigurationError`` instead of deadlocking.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock = SYSTEM_CLOCK,
        synchronous: str = "FULL",
        busy_timeout: float = 30.0,
    ) -> None:
        # the options (validated there), the connection and every statement: shared with the
        # sync twin (see SQLiteCore); touched only on the executor thread, under self._lock
        self._core = SQLiteCore(
            path, clock=clock, synchronous=synchronous, busy_timeout=busy_timeout
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replaysafe-sqlite")
        # Touched only on the event loop.
        self._lock = asyncio.Lock()
        self._tx_task: asyncio.Task[Any] | None = None
        self._closed = False

    @property
    def path(self) -> str:
        return self._core.path

    async def durability(self) -> Durability:
        """What the ledger's own connection uses, read from it (``PRAGMA journal_mode`` and
        ``PRAGMA synchronous``): WAL with FULL/EXTRA fsyncs every commit (durable); WAL with
        NORMAL survives a process crash but a machine crash can roll back the latest commits
        (loses recent); OFF syncs nothing, and a ``:memory:`` database (or journal MEMORY/OFF)
        dies with the process or can be corrupted by a crash (not durable)."""

        def pragmas(conn: sqlite3.Connection) -> tuple[str, str]:
            (journal,) = conn.execute("PRAGMA journal_mode").fetchone()
            (sync,) = conn.execute("PRAGMA synchronous").fetchone()
            return str(journal).lower(), _SYNCHRONOUS_NAMES.get(int(sync), str(sync))

        journal, sync = await self._read(pragmas)
        return assess_sqlite(f"sqlite:{self.path}", journal, sync)

    def now(self) -> float:
        return self._core.clock.now()

    def sync(self) -> SyncSQLiteLedger:
        """The sync twin: a :class:`SyncSQLiteLedger` on the same file with the same options
        (clock, ``synchronous``, ``busy_timeout``) and its own connection, for plain threads.
        Each call returns a new one; close it (closing this ledger does not)."""
        core = self._core
        return SyncSQLiteLedger(
            core.path, clock=core.clock, synchronous=core.synchronous,
            busy_timeout=core.busy_timeout,
        )  # fmt: skip

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return f"SQLiteLedger({self.path!r}, synchronous={self._core.synchronous!r}{state})"

    # ------------------------------------------------------------------ ledger API

    async def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        """Try to take the operation for ``lease`` seconds (judged by the injected clock).

        Loses nothing and duplicates nothing by itself; if the caller never learns the outcome
        (cancelled, ``LedgerUnavailable`` after the commit), the claim simply expires and the next
        claim takes over with ``recovered=True``.
        """
        req = ClaimRequest(key, fingerprint, owner, lease)
        return (await self._write(partial(self._core.claim_rows, [req])))[0]

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        """Claim a batch in one transaction (one fsync). Same outcomes as calling :meth:`claim` for
        each request in order, including repeated keys within the batch."""
        if not requests:
            return []
        return await self._write(partial(self._core.claim_rows, list(requests)))

    async def extend(self, claim: Claim, lease: float) -> Claim:
        return await self._write(partial(self._core.extend_rows, claim, lease))

    async def complete(self, claim: Claim, result: str | None = None) -> Record:
        return await self._write(partial(self._core.complete_rows, claim, result))

    async def complete_many(
        self, items: Sequence[tuple[Claim, str | None]]
    ) -> list[Record | LeaseLost]:
        """Complete a batch in one transaction (one fsync). A stale claim yields its ``LeaseLost``
        in place and does not stop the others."""
        if not items:
            return []
        return await self._write(partial(self._core.complete_many_rows, list(items)))

    async def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        """Mark a batch started in one transaction (one fsync): fenced per claim, a stale one
        yields its ``LeaseLost`` in place and writes nothing."""
        if not claims:
            return []
        return await self._write(partial(self._core.mark_started_rows, list(claims)))

    async def release(self, claim: Claim, error: str | None = None) -> None:
        await self._write(partial(self._core.release_rows, claim, error))

    async def quarantine(
        self, request: QuarantineRequest, claim: Claim | None = None
    ) -> QuarantineEntry:
        """Record the entry (and, with ``claim``, move the record to QUARANTINED under fencing) in
        one fsynced transaction, so it is durable before the caller completes at the broker."""
        return await self._write(partial(self._core.quarantine_rows, request, claim))

    async def get(self, key: OpKey) -> Record | None:
        return await self._read(partial(self._core.load, key=key))

    async def quarantined(
        self, *, reason: QuarantineReason | None = None, limit: int = 100
    ) -> list[QuarantineEntry]:
        if limit <= 0:
            return []  # SQLite reads a negative LIMIT as "no limit"
        reason_value = None if reason is None else reason.value

        def rows(conn: sqlite3.Connection) -> list[QuarantineEntry]:
            cur = conn.execute(_LIST_ENTRIES, (reason_value, limit))
            return [_entry_from_row(r) for r in cur.fetchall()]

        return await self._read(rows)

    async def quarantine_entry(self, entry_id: str) -> QuarantineEntry | None:
        """One quarantine entry by id, or None. Reads only."""

        def row(conn: sqlite3.Connection) -> QuarantineEntry | None:
            found = conn.execute(_SELECT_ENTRY, (entry_id,)).fetchone()
            return None if found is None else _entry_from_row(found)

        return await self._read(row)

    async def redrive(self, entry_id: str) -> QuarantineEntry:
        """Record a redrive of the entry and, if its operation is QUARANTINED, release it with
        ``attempts`` reset, in one ``BEGIN IMMEDIATE`` transaction (both or neither).

        A COMPLETED, in-flight or released operation is left as it is: the republished copy of a
        completed one is answered ``AlreadyDone``, never re-run. Moves no boundary and publishes
        nothing: republishing the copy is the caller's job, after this returned. Raises
        ``LedgerError`` for an unknown entry (nothing written)."""
        return await self._write(partial(self._core.redrive_rows, entry_id))

    async def purge_quarantine(
        self,
        entry_ids: Sequence[str] | None = None,
        *,
        reason: QuarantineReason | None = None,
        older_than: float | None = None,
        limit: int = 10_000,
    ) -> int:
        """Delete up to ``limit`` quarantine entries matching every given filter (``entry_ids``,
        ``reason``, created before ``older_than``), oldest first, in one statement. An empty
        ``entry_ids`` matches nothing. Operation records are not touched: a QUARANTINED operation
        stays quarantined (redrive it first to make it claimable). A purged entry is gone with its
        message copy."""
        if limit <= 0 or (entry_ids is not None and len(entry_ids) == 0):
            return 0
        ids = None if entry_ids is None else json.dumps(list(entry_ids))
        before = math.inf if older_than is None else float(older_than)
        params = (ids, None if reason is None else reason.value, before, limit)

        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute(PURGE_QUARANTINE_SQL, params).rowcount

        return await self._write(delete)

    async def set_paused(
        self, handler: str, paused: bool, *, reason: str = "", by: str = ""
    ) -> None:
        """Pause or resume ``handler`` for every process sharing the file: one row in
        ``replaysafe_paused`` written (or deleted) in one fsynced ``BEGIN IMMEDIATE``
        transaction, so it is durable when this returns."""
        check_handler_name(handler)
        if paused:
            row = (handler, pause_text(reason), pause_text(by), self._core.clock.now())

            def write(conn: sqlite3.Connection) -> None:
                conn.execute(_PAUSE, row)
        else:

            def write(conn: sqlite3.Connection) -> None:
                conn.execute(_RESUME, (handler,))

        await self._write(write)

    async def paused(self) -> dict[str, PauseState]:
        """The paused handlers (one indexed read of a table with a row per paused handler)."""

        def rows(conn: sqlite3.Connection) -> dict[str, PauseState]:
            return {h: PauseState(h, r, b, t) for h, r, b, t in conn.execute(_LIST_PAUSED)}

        return await self._read(rows)

    async def summary(self, *, top: int = 10) -> LedgerSummary:
        """Counts for ``replaysafe inspect``, read in one snapshot (a read transaction: writers
        are not blocked). Leases and the last hour are judged by the injected clock;
        ``approx_bytes`` is the database file's size (``page_count * page_size``: every table in
        the file, the WAL not included)."""
        now = self._core.clock.now()

        def read(conn: sqlite3.Connection) -> LedgerSummary:
            conn.execute("BEGIN")  # deferred: one snapshot for every query below, no write lock
            try:
                by_state = dict(conn.execute(_SUMMARY_BY_STATE).fetchall())
                expired, oldest = conn.execute(_SUMMARY_IN_FLIGHT, (now,)).fetchone()
                (recent,) = conn.execute(_SUMMARY_RECENT, (now - 3600.0,)).fetchone()
                hot = conn.execute(_SUMMARY_HOT, (max(top, 0),)).fetchall()
                reasons = dict(conn.execute(_SUMMARY_REASONS).fetchall())
                (pages,) = conn.execute("PRAGMA page_count").fetchone()
                (page_size,) = conn.execute("PRAGMA page_size").fetchone()
            finally:
                conn.execute("COMMIT")
            return LedgerSummary(
                now=now,
                by_state=by_state,
                expired_leases=expired,
                oldest_in_flight_at=oldest,
                hot_operations=[(OpKey(scope, op), attempts) for scope, op, attempts in hot],
                quarantined_by_reason=reasons,
                completed_last_hour=recent,
                approx_bytes=pages * page_size,
            )

        return await self._read(read)

    async def purge(self, older_than: float, *, limit: int = 10_000) -> int:
        """Forget up to ``limit`` COMPLETED records completed before ``older_than``, oldest first,
        in one bounded statement. A purged operation is new again to the ledger: purge only what
        lies beyond the replay horizon."""
        if limit <= 0:
            return 0

        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute(PURGE_SQL, (State.COMPLETED.value, older_than, limit)).rowcount

        return await self._write(delete)

    # ------------------------------------------------------------------ transactions

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SQLiteTransaction]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` on normal exit, ``ROLLBACK`` on any exception
        (cancellation included). Holds the ledger's lock for its whole life (see the class
        docstring). If the final commit fails, ``LedgerUnavailable`` is raised and nothing the
        block did may be assumed durable."""
        self._guard_reentry("transaction")
        async with self._lock:
            self._check_open()
            try:
                generation = await self._run(self._core.begin)
            except BaseException:
                # cancelled while BEGIN may already have run: never leave it open on the connection
                await asyncio.shield(self._submit(partial(self._core.rollback, None)))
                raise
            tx = SQLiteTransaction(self, generation)
            self._tx_task = asyncio.current_task()
            try:
                yield tx
            except BaseException as exc:
                tx._open = False
                # shielded: a cancellation arriving now must not skip the rollback
                problem = await asyncio.shield(
                    self._submit(partial(self._core.rollback, generation))
                )
                if problem is not None:
                    exc.add_note(problem)
                raise
            else:
                tx._open = False
                await asyncio.shield(self._submit(partial(self._core.commit, generation)))
            finally:
                tx._open = False
                self._tx_task = None

    async def complete_in(self, tx: Transaction, claim: Claim, result: str | None = None) -> None:
        """Fence and mark the claim completed inside ``tx``; it commits with the business rows.
        Raises ``LeaseLost`` when the token is stale: let it leave the block so it rolls back."""
        if not isinstance(tx, SQLiteTransaction) or tx._ledger is not self:
            raise ConfigurationError(
                "complete_in() needs a transaction opened by this ledger's transaction(); a "
                "transaction of another database cannot commit this ledger's row"
            )
        tx._check_open()
        fn = partial(self._core.complete_rows, claim, result)
        await self._run(partial(self._core.in_tx, tx._generation, fn, True))

    # ------------------------------------------------------------------ hooks for co-located stores

    async def run_job(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        """Internal hook for stores that live in this ledger's file (the outbox): run ``fn(conn)``
        on the connection thread under this ledger's lock, inside ``BEGIN IMMEDIATE`` … ``COMMIT``
        when ``write`` (rolled back if ``fn`` raises). ``sqlite3`` errors become
        ``LedgerUnavailable``. ``fn`` runs on another thread: it must touch only ``conn``."""
        return await (self._write(fn) if write else self._read(fn))

    def owns(self, tx: Transaction) -> bool:
        """Internal hook: True when ``tx`` was opened by this ledger's :meth:`transaction`."""
        return isinstance(tx, SQLiteTransaction) and tx._ledger is self

    # ------------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Close the connection after any running call or open transaction. Idempotent."""
        if self._closed:
            return
        self._guard_reentry("close")
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                await self._run(self._close_job)
            finally:
                self._executor.shutdown(wait=False)

    @asynccontextmanager
    async def idle(self) -> AsyncIterator[None]:
        """Hold the ledger idle: inside the block no statement or transaction of *this* ledger
        object runs, and every job queued before it has finished, so this process holds no SQLite
        lock on the file. Other calls wait until the block exits.

        For fault injection: a process stopped (``SIGSTOP``) inside the block stalls only itself.
        Stopped while one of its transactions holds the write lock, it would stall every process
        sharing the file until it resumes — a real hazard of a shared SQLite ledger (see
        docs/ledger-sqlite.md), but not the fault a stalled-holder test means to inject."""
        self._guard_reentry("idle")
        async with self._lock:
            self._check_open()
            # a rollback queued by a cancelled caller may still run: wait for the thread to drain
            await self._run(_noop)
            yield

    # ------------------------------------------------------------------ event-loop side

    async def _run(self, job: Callable[[], T]) -> T:
        """Run ``job`` on the connection thread. The caller holds ``self._lock``."""
        return await self._submit(job)

    def _submit(self, job: Callable[[], T]) -> asyncio.Future[T]:
        """Queue ``job`` now, before any ``await``: the executor runs jobs in submission order, so
        a rollback queued here always runs before the job of whoever takes the lock next, even
        when the caller is cancelled while waiting for it."""
        return asyncio.wrap_future(self._executor.submit(job))

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._locked(partial(self._core.job, fn, True))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._locked(partial(self._core.job, fn, False))

    async def _locked(self, job: Callable[[], T]) -> T:
        self._guard_reentry("this call")
        async with self._lock:
            self._check_open()
            return await self._run(job)

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerUnavailable(
                f"{self!r} is closed; open a new SQLiteLedger on {self.path!r} to use it again"
            )

    def _guard_reentry(self, what: str) -> None:
        task = asyncio.current_task()
        if task is not None and task is self._tx_task:
            raise ConfigurationError(
                f"{what} on {self!r} from inside its own open transaction() would wait for that "
                "transaction forever; use tx.execute()/complete_in(tx, ...) inside the block, or "
                "call it after the block"
            )

    # ------------------------------------------------------------------ connection thread

    def _close_job(self) -> None:
        self._core.drop_connection()


class SQLiteCore:
    """The connection-side half of a SQLite ledger, held by :class:`SQLiteLedger` (which runs it
    on its executor thread) and by :class:`SyncSQLiteLedger` (which runs it in the caller's
    thread): the validated options, one connection (opened on first use: WAL, ``synchronous``,
    schema creation and upgrade), one-call jobs under ``BEGIN IMMEDIATE`` (:meth:`job`), the
    state transitions (the ``*_rows`` methods, which run inside a job or the caller's
    transaction) and the mapping of ``sqlite3`` errors to ``LedgerUnavailable`` /
    ``LedgerDataError``. So the SQL, the state machine and the error mapping exist once.

    Not thread-safe: its holder runs one method at a time (``SQLiteLedger``: one executor thread
    under its ``asyncio.Lock``; ``SyncSQLiteLedger``: a ``threading.Lock``). Two holders never
    share a core: each has its own connection, and SQLite's ``BEGIN IMMEDIATE`` and
    ``busy_timeout`` serialise them as they serialise processes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock = SYSTEM_CLOCK,
        synchronous: str = "FULL",
        busy_timeout: float = 30.0,
    ) -> None:
        mode = synchronous.upper() if isinstance(synchronous, str) else synchronous
        if mode not in SYNCHRONOUS_MODES:
            raise ConfigurationError(
                f"synchronous={synchronous!r} is not a SQLite synchronous mode; use one of "
                f"{sorted(SYNCHRONOUS_MODES)} (FULL, the default, is the one that survives power "
                "loss without losing a completed operation)"
            )
        if busy_timeout < 0:
            raise ConfigurationError(f"busy_timeout must be >= 0 seconds, got {busy_timeout!r}")
        #: the options, read-only after construction
        self.path: Final = os.fspath(path)
        self.clock: Final = clock
        self.synchronous: Final[str] = mode
        self.busy_timeout: Final = float(busy_timeout)
        self._conn: sqlite3.Connection | None = None
        self._generation = 0

    @property
    def conn(self) -> sqlite3.Connection | None:
        """The open connection, or None (not opened yet, or dropped after a failed rollback)."""
        return self._conn

    @property
    def generation(self) -> int:
        """Bumped by every new connection: a transaction begun on an older one is gone."""
        return self._generation

    # ------------------------------------------------------------------ jobs

    def job(self, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
        """One self-contained call: a read, or a read-decide-write under ``BEGIN IMMEDIATE``."""
        try:
            conn = self.connection()
            if not write:
                return fn(conn)
            # IMMEDIATE takes the write lock before the read, so the decision cannot go stale
            # between reading and writing, whatever other processes do.
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                self.rollback_quietly(conn)
                raise
            return out
        except (sqlite3.Error, *_DATA_ERRORS) as exc:
            raise self.error(exc) from exc

    def rollback_quietly(self, conn: sqlite3.Connection) -> str | None:
        """Roll back an open transaction; never raises. Returns what went wrong (the connection
        was then dropped, which rolls back too), or None."""
        if not conn.in_transaction:
            return None
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            # Closing a connection rolls its transaction back; the next call reconnects.
            self.drop_connection()
            return f"rollback failed ({exc}); the connection to {self.path!r} was closed instead"
        return None

    def drop_connection(self) -> None:
        """Close the connection if open (the next :meth:`connection` opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            # best effort: SQLite rolls back whatever was open when the handle goes away
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def connection(self) -> sqlite3.Connection:
        """The open connection, opened and configured (WAL, ``synchronous``, schema) first if
        needed. Raises ``sqlite3`` errors (and ``ConfigurationError``) unmapped: callers map."""
        if self._conn is not None:
            return self._conn
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
            check_same_thread=False,  # used by one thread at a time, not always its creator
        )
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._generation += 1
        return conn

    def _configure(self, conn: sqlite3.Connection) -> None:
        # Switching a fresh file to WAL needs a lock that another process opening the same file at
        # the same moment may hold, and that wait is not always covered by the busy handler: retry
        # within busy_timeout.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
                break
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
        if mode != "wal" and self.path != ":memory:":
            raise ConfigurationError(
                f"SQLite refused WAL mode for {self.path!r} (journal_mode is {mode!r}); put the "
                "ledger on a local filesystem (WAL needs shared memory; network filesystems break "
                "it)"
            )
        # per connection, not stored in the file; the value was validated against a fixed set
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            (version,) = conn.execute("SELECT schema_version FROM replaysafe_meta").fetchone()
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"{self.path!r} has ledger schema version {version}, newer than this "
                    f"replaysafe understands ({SCHEMA_VERSION}); upgrade replaysafe"
                )
            if version < SCHEMA_VERSION:
                _upgrade(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def error(self, exc: BaseException) -> LedgerError:
        """A failed call's error in the replaysafe tree: ``LedgerDataError`` when SQLite (or the
        driver, while binding) refused this call's data, which a retry cannot change; else
        ``LedgerUnavailable`` (I/O, a busy lock, a broken file: worth a retry)."""
        if isinstance(exc, sqlite3.Error) and not isinstance(exc, _DATA_ERRORS):
            return self.unavailable(exc)
        return LedgerDataError(
            f"SQLite ledger {self.path!r} refused this call's data ({type(exc).__name__}: "
            f"{exc}); nothing of the call was written and a retry fails the same way: set the "
            "message aside (quarantine or dead-letter it) and fix what produced the value"
        )

    def unavailable(self, exc: sqlite3.Error) -> LedgerUnavailable:
        if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
            hint = (
                f"could not get the write lock on {self.path!r} within "
                f"busy_timeout={self.busy_timeout:g}s: another connection holds it (a long "
                "transaction elsewhere); retry, keep transactions short, or raise busy_timeout"
            )
        else:
            hint = (
                f"check that {self.path!r} is a SQLite database on a local disk with free space "
                "and that its directory is writable, then retry"
            )
        return LedgerUnavailable(f"SQLite ledger error ({type(exc).__name__}: {exc}); {hint}")

    # ------------------------------------------------------------------ caller's transactions
    # ``SQLiteLedger.transaction()`` and ``SyncSQLiteLedger.transaction()``: BEGIN IMMEDIATE, the
    # caller's statements and ``complete_rows``, then COMMIT or ROLLBACK, all on the connection
    # current at BEGIN (its ``generation``: a dropped connection took the transaction with it).

    def begin(self) -> int:
        """``BEGIN IMMEDIATE`` (opening the connection first if needed); returns the connection's
        generation, which the transaction's later steps check. ``sqlite3`` errors become
        ``LedgerUnavailable`` (nothing began)."""
        try:
            self.connection().execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self.unavailable(exc) from exc
        return self._generation

    def in_tx(self, generation: int, fn: Callable[[sqlite3.Connection], T], map_errors: bool) -> T:
        """``fn(conn)`` inside the transaction begun at ``generation``; ``LedgerUnavailable`` if
        SQLite already aborted it. ``map_errors``: ``sqlite3`` and data errors become
        ``LedgerUnavailable`` / ``LedgerDataError`` (the ledger's own statements); otherwise they
        propagate unchanged (the caller's SQL)."""
        conn = self._conn
        if conn is None or self._generation != generation or not conn.in_transaction:
            raise LedgerUnavailable(
                f"the transaction on {self.path!r} was aborted by SQLite after an earlier error; "
                "nothing in it will commit: leave the block and retry the operation"
            )
        if not map_errors:
            return fn(conn)
        try:
            return fn(conn)
        except (sqlite3.Error, *_DATA_ERRORS) as exc:
            raise self.error(exc) from exc

    def tx_execute(
        self, generation: int, sql: str, params: Sequence[Any] | dict[str, Any]
    ) -> SQLiteResult:
        """The caller's statement inside the transaction, its rows fetched. Its errors propagate
        unchanged; a statement that ended the transaction raises ``ConfigurationError``."""

        def run(conn: sqlite3.Connection) -> SQLiteResult:
            cur = conn.execute(sql, params)  # the caller's SQL: its errors propagate unchanged
            rows = cur.fetchall()
            if not conn.in_transaction:
                raise ConfigurationError(
                    f"the statement {sql[:60]!r} ended the ledger's transaction; do not run "
                    "BEGIN/COMMIT/ROLLBACK inside ledger.transaction() (the block commits or rolls "
                    "back itself); statements before it may already be committed"
                )
            return SQLiteResult(cur.rowcount, cur.lastrowid, rows)

        return self.in_tx(generation, run, False)

    def commit(self, generation: int) -> None:
        """``COMMIT`` the transaction begun at ``generation``. A failed commit is rolled back and
        raised mapped (``LedgerDataError`` for a deferred constraint, else
        ``LedgerUnavailable``)."""
        conn = self._conn
        if conn is None or self._generation != generation or not conn.in_transaction:
            raise LedgerUnavailable(
                f"the transaction on {self.path!r} was aborted by SQLite before commit; nothing "
                "in it was committed: retry the operation"
            )
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self.rollback_quietly(conn)
            raise self.error(exc) from exc  # a deferred constraint fails here: data

    def rollback(self, generation: int | None) -> str | None:
        """Roll back the transaction begun at ``generation`` (None: whatever is open); never
        raises (the caller is already propagating the real error). Returns what went wrong."""
        conn = self._conn
        if conn is None or generation not in (None, self._generation):
            return None
        return self.rollback_quietly(conn)

    # ------------------------------------------------------------------ state transitions
    # All run inside BEGIN IMMEDIATE (a job, or the caller's transaction), on whichever thread
    # the holder runs the core on.

    def claim_rows(
        self, requests: list[ClaimRequest], conn: sqlite3.Connection
    ) -> list[ClaimOutcome]:
        """``decide_claim`` for each request in order, on the records read in one batched
        statement; a key repeated in the batch sees the record its earlier copy decided. The
        writes go out in one ``executemany``, in request order."""
        now = self.clock.now()
        (last_token,) = conn.execute("SELECT last_token FROM replaysafe_meta").fetchone()
        issued = last_token
        current = _load_many(conn, [r.key for r in requests])
        outcomes: list[ClaimOutcome] = []
        writes: list[tuple[Any, ...]] = []
        for r in requests:
            k = (r.key.scope, r.key.operation_id)
            outcome, rec = decide_claim(
                current.get(k), r.key, r.fingerprint, r.owner, r.lease, now, issued + 1,
                r.marks_start,
            )  # fmt: skip
            if isinstance(outcome, Acquired):
                issued += 1
            if rec is not None:
                current[k] = rec
                writes.append(_record_params(rec))
            outcomes.append(outcome)
        if writes:
            conn.executemany(_SAVE_RECORD, writes)
        if issued != last_token:
            conn.execute("UPDATE replaysafe_meta SET last_token = ?", (issued,))
        return outcomes

    def extend_rows(self, claim: Claim, lease: float, conn: sqlite3.Connection) -> Claim:
        rec = check_fence(self.load(conn, claim.key), claim)
        now = self.clock.now()
        # updated_at stays the claim time (the summary's oldest in-flight age)
        self.save(conn, replace(rec, lease_until=now + lease))
        return replace(claim, lease_until=now + lease)

    def complete_rows(self, claim: Claim, result: str | None, conn: sqlite3.Connection) -> Record:
        """Fence and complete one claim (``complete_many_rows`` of one, without the batch
        bookkeeping: measured, a visible share of a batch-1 complete's CPU)."""
        rec = check_fence(self.load(conn, claim.key), claim)
        done, params = _completed(rec, result, self.clock.now())
        conn.execute(_COMPLETE_RECORD, params)
        return done

    def complete_many_rows(
        self, items: list[tuple[Claim, str | None]], conn: sqlite3.Connection
    ) -> list[Record | LeaseLost]:
        """Complete each current claim (:func:`_fence_each`: a claim repeated in the batch finds
        its earlier copy's COMPLETED record, ``LeaseLost``)."""
        now = self.clock.now()
        return _fence_each(
            conn,
            [claim for claim, _ in items],
            _COMPLETE_RECORD,
            lambda i, rec: _completed(rec, items[i][1], now),
        )

    def mark_started_rows(
        self, claims: list[Claim], conn: sqlite3.Connection
    ) -> list[Claim | LeaseLost]:
        def mark(_: int, rec: Record) -> tuple[Record, tuple[Any, ...]] | None:
            if rec.unstarted_attempt is None:
                return None  # already marked (or never claimed with marks_start)
            return replace(rec, unstarted_attempt=None), (rec.key.scope, rec.key.operation_id)

        fenced = _fence_each(conn, claims, _MARK_STARTED, mark)
        return [f if isinstance(f, LeaseLost) else c for c, f in zip(claims, fenced, strict=True)]

    def release_rows(self, claim: Claim, error: str | None, conn: sqlite3.Connection) -> None:
        rec = check_fence(self.load(conn, claim.key), claim)
        self.save(
            conn,
            replace(
                rec,
                state=State.RELEASED,
                lease_until=None,
                last_error=storable_text(error),
                updated_at=self.clock.now(),
            ),
        )

    def quarantine_rows(
        self, request: QuarantineRequest, claim: Claim | None, conn: sqlite3.Connection
    ) -> QuarantineEntry:
        request = request.storable()
        now = self.clock.now()
        if claim is not None:
            # fence first: a stale claim raises before anything is written
            rec = check_fence(self.load(conn, claim.key), claim)
            self.save(
                conn,
                replace(
                    rec,
                    state=State.QUARANTINED,
                    lease_until=None,
                    last_error=request.detail,
                    updated_at=now,
                ),
            )
        eid = request.entry_id()
        row = conn.execute(_SELECT_ENTRY, (eid,)).fetchone()
        entry = merge_quarantine(None if row is None else _entry_from_row(row), request, now)
        _save_entry(conn, entry)
        return entry

    def redrive_rows(self, entry_id: str, conn: sqlite3.Connection) -> QuarantineEntry:
        row = conn.execute(_SELECT_ENTRY, (entry_id,)).fetchone()
        if row is None:
            raise unknown_entry(entry_id)
        now = self.clock.now()
        entry = _entry_from_row(row)
        if entry.operation_id is not None:
            rec = self.load(conn, OpKey(entry.scope, entry.operation_id))
            if rec is not None and rec.state is State.QUARANTINED:
                # attempts reset: the redriven copy gets a full retry budget, not the one spent
                self.save(conn, replace(rec, state=State.RELEASED, attempts=0, updated_at=now,
                                         unstarted_attempt=None))  # fmt: skip
        entry = replace(entry, redriven_at=now, redrives=entry.redrives + 1, updated_at=now)
        _save_entry(conn, entry)
        return entry

    @staticmethod
    def load(conn: sqlite3.Connection, key: OpKey) -> Record | None:
        row = conn.execute(_SELECT_RECORD, (key.scope, key.operation_id)).fetchone()
        return None if row is None else _record_from_row(row)

    @staticmethod
    def save(conn: sqlite3.Connection, rec: Record) -> None:
        conn.execute(_SAVE_RECORD, _record_params(rec))


class SyncSQLiteLedger:
    """The SQLite ledger for plain (non-async) code: :class:`SQLiteLedger`'s claim path (a
    :class:`~replaysafe.ledger.base.SyncLedger`) run in the caller's thread.
    ``SQLiteLedger.sync()`` makes one with that ledger's options.

    Same options, file format, SQL, state machine and error mapping as ``SQLiteLedger`` (both run
    a :class:`SQLiteCore`): every call is one ``BEGIN IMMEDIATE`` transaction, fsynced when it
    returns (with the default ``synchronous="FULL"``); a stale token raises ``LeaseLost`` and
    changes nothing; refused data raises ``LedgerDataError`` (nothing written); a disk or lock
    error raises ``LedgerUnavailable`` and the call may or may not have committed (then do not
    complete at the broker).

    Transactional effects: :meth:`transaction` and :meth:`complete_in`, as on ``SQLiteLedger``
    (business rows and the ledger row commit or roll back together).

    Threads: one connection, used by one call at a time under a ``threading.Lock`` held through
    the commit's fsync (SQLite has one writer per file anyway), so it is safe from several threads
    at once (a keeper thread extending leases while the caller runs the effect). An async
    ``SQLiteLedger`` on the same file, and other processes, are ordinary other connections:
    ``BEGIN IMMEDIATE`` and ``busy_timeout`` serialise them.
    """

    #: ``transaction()`` and ``complete_in()``: the ledger row commits with the business rows
    transactional: ClassVar[bool] = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock = SYSTEM_CLOCK,
        synchronous: str = "FULL",
        busy_timeout: float = 30.0,
    ) -> None:
        self._core = SQLiteCore(
            path, clock=clock, synchronous=synchronous, busy_timeout=busy_timeout
        )
        self._lock = threading.Lock()
        self._closed = False
        # the thread inside this twin's transaction(), holding self._lock (None: none is open);
        # only ever equal to a reader's own ident when the reader is that thread, so it is read
        # without the lock
        self._tx_thread: int | None = None

    @property
    def path(self) -> str:
        return self._core.path

    def now(self) -> float:
        """The ledger's clock (what leases are judged by)."""
        return self._core.clock.now()

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return f"SyncSQLiteLedger({self.path!r}, synchronous={self._core.synchronous!r}{state})"

    def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        """Try to take the operation for ``lease`` seconds; as :meth:`SQLiteLedger.claim`."""
        request = ClaimRequest(key, fingerprint, owner, lease)
        return self._call(partial(self._core.claim_rows, [request]), True)[0]

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        """Claim a batch in one transaction (one fsync); as :meth:`SQLiteLedger.claim_many`."""
        if not requests:
            return []
        return self._call(partial(self._core.claim_rows, list(requests)), True)

    def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        """Mark a batch started in one transaction (one fsync): fenced per claim, a stale one
        yields its ``LeaseLost`` in place and writes nothing."""
        if not claims:
            return []
        return self._call(partial(self._core.mark_started_rows, list(claims)), True)

    def extend(self, claim: Claim, lease: float) -> Claim:
        """Push the lease to ``now + lease``. Raises ``LeaseLost`` when the token is stale."""
        return self._call(partial(self._core.extend_rows, claim, lease), True)

    def complete(self, claim: Claim, result: str | None = None) -> Record:
        """Record the effect as done. Raises ``LeaseLost`` when the token is stale: then the
        caller must not complete at the broker."""
        return self._call(partial(self._core.complete_rows, claim, result), True)

    def complete_many(self, items: Sequence[tuple[Claim, str | None]]) -> list[Record | LeaseLost]:
        """Complete a batch in one transaction (one fsync); a stale claim yields its
        ``LeaseLost`` in place and does not stop the others."""
        if not items:
            return []
        return self._call(partial(self._core.complete_many_rows, list(items)), True)

    def release(self, claim: Claim, error: str | None = None) -> None:
        """Give the operation back (no effect happened): the next claim gets it at once. Raises
        ``LeaseLost`` when the token is stale."""
        self._call(partial(self._core.release_rows, claim, error), True)

    def quarantine(self, request: QuarantineRequest, claim: Claim | None = None) -> QuarantineEntry:
        """Record the entry (and, with ``claim``, move the record to QUARANTINED under fencing)
        in one fsynced transaction; as :meth:`SQLiteLedger.quarantine`."""
        return self._call(partial(self._core.quarantine_rows, request, claim), True)

    def get(self, key: OpKey) -> Record | None:
        """The stored record of ``key``, or None. Reads only."""
        return self._call(partial(self._core.load, key=key), False)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SyncSQLiteTransaction]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` on normal exit, ``ROLLBACK`` on any exception
        (``KeyboardInterrupt`` included), as :meth:`SQLiteLedger.transaction`.

        Holds this twin's lock for the whole block, so every other call on the twin waits for it,
        from any thread (the keeper's lease extensions included; keep transactions short), and
        SQLite's write lock from ``BEGIN``, so other connections' writes wait up to
        ``busy_timeout``. A call on the twin from inside its own block raises
        ``ConfigurationError`` instead of waiting for itself forever. Raises ``LedgerUnavailable``
        when the write lock cannot be had within ``busy_timeout`` (nothing began) and when the
        final commit fails (then nothing the block did may be assumed durable)."""
        self._check_not_in_tx("transaction()")
        with self._lock:
            self._check_open()
            try:
                generation = self._core.begin()
            except BaseException:
                # an interrupt may land after BEGIN ran: never leave it open on the connection
                self._core.rollback(None)
                raise
            tx = SyncSQLiteTransaction(self, generation)
            self._tx_thread = threading.get_ident()
            try:
                yield tx
            except BaseException as exc:
                tx._open = False
                problem = self._core.rollback(generation)
                if problem is not None:
                    exc.add_note(problem)
                raise
            else:
                tx._open = False
                self._core.commit(generation)
            finally:
                tx._open = False
                self._tx_thread = None

    def complete_in(self, tx: object, claim: Claim, result: str | None = None) -> None:
        """Fence and mark the claim completed inside ``tx`` (opened by this twin's
        :meth:`transaction`); it commits with the business rows. Raises ``LeaseLost`` when the
        token is stale (nothing written): let it leave the block so the block rolls back."""
        if not isinstance(tx, SyncSQLiteTransaction) or tx._ledger is not self:
            raise ConfigurationError(
                "complete_in() needs a transaction opened by this ledger's transaction(); a "
                "transaction of another connection or database cannot commit this ledger's row"
            )
        tx._check_open()
        self._core.in_tx(tx._generation, partial(self._core.complete_rows, claim, result), True)

    def close(self) -> None:
        """Close the connection (after a call running in another thread). Idempotent; later
        calls raise ``LedgerUnavailable``."""
        self._check_not_in_tx("close()")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._core.drop_connection()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
        if self._tx_thread == threading.get_ident():
            self._check_not_in_tx("this call")
        with self._lock:
            self._check_open()
            return self._core.job(fn, write)

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerUnavailable(
                f"{self!r} is closed; open a new one (SQLiteLedger.sync(), or "
                f"SyncSQLiteLedger({self.path!r})) to use it again"
            )

    def _check_not_in_tx(self, what: str) -> None:
        if self._tx_thread == threading.get_ident():
            raise ConfigurationError(
                f"{what} on {self!r} from inside its own open transaction() would wait for that "
                "transaction forever; use tx.execute()/complete_in(tx, ...) inside the block, or "
                "call it after the block"
            )


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a file of an older schema version to :data:`SCHEMA_VERSION`, inside the caller's
    ``BEGIN IMMEDIATE`` (so concurrent openers take turns and the later ones find it done).
    Idempotent: each column is added only if ``PRAGMA table_info`` does not list it. New tables
    (version 3's ``replaysafe_paused``) come from the ``CREATE … IF NOT EXISTS`` statements that
    run before this."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(replaysafe_quarantine)")}
    for name, definition in _ADDED_QUARANTINE_COLUMNS:
        if name not in present:
            # fixed names and definitions from the tuple above: nothing user-supplied
            conn.execute(f"ALTER TABLE replaysafe_quarantine ADD COLUMN {name} {definition}")
    ops = {row[1] for row in conn.execute("PRAGMA table_info(replaysafe_operations)")}
    for name, definition in _ADDED_OPERATION_COLUMNS:
        if name not in ops:
            # version 4; existing rows keep NULL: "may have started" to a recovering claim
            conn.execute(f"ALTER TABLE replaysafe_operations ADD COLUMN {name} {definition}")
    if "message_size" not in present:
        # the original size of older entries is unknown; the stored copy's length is a lower bound
        # (and keeps message_size >= len(message), which `truncated` relies on)
        conn.execute(
            "UPDATE replaysafe_quarantine SET message_size = length(message) "
            "WHERE message IS NOT NULL"
        )
    conn.execute("UPDATE replaysafe_meta SET schema_version = ?", (SCHEMA_VERSION,))


def _save_entry(conn: sqlite3.Connection, entry: QuarantineEntry) -> None:
    conn.execute(
        _SAVE_ENTRY,
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


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _record_from_row(row: tuple[Any, ...]) -> Record:
    state = _STATES.get(row[3])
    return new_record(
        OpKey(row[0], row[1]),
        row[2],
        State(row[3]) if state is None else state,  # an unknown value raises as before
        row[4], row[5], row[6], row[7], row[8], row[9], row[10], row[11], row[12], row[13],
    )  # fmt: skip


#: ``State`` by stored value (the enum's own lookup costs more than the rest of a row)
_STATES: Final = {s.value: s for s in State}


def _record_params(rec: Record) -> tuple[Any, ...]:
    """``rec`` as the parameters of ``_SAVE_RECORD`` (the order of ``_RECORD_COLUMNS``)."""
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


def _select_many_sql(n: int) -> str:
    return (
        f"SELECT {_RECORD_COLUMNS} FROM replaysafe_operations "
        f"WHERE scope = ? AND operation_id IN ({', '.join('?' * n)})"
    )


#: the batched read for 1, 2, 4 … ``_READ_CHUNK`` keys: a batch is padded to the next size (with
#: a repeated key), so a handful of statements stay prepared in the connection's cache
_SELECT_MANY: Final = {1 << i: _select_many_sql(1 << i) for i in range(_READ_CHUNK.bit_length())}


def _load_many(conn: sqlite3.Connection, keys: list[OpKey]) -> dict[tuple[str, str], Record]:
    """The stored records of ``keys`` by ``(scope, operation_id)`` (a key without a record is
    absent), read with one indexed statement per scope and ``_READ_CHUNK`` keys. The ids are bound
    as parameters, exactly as the single-row statements bind them, so a key matches here if and
    only if ``_SELECT_RECORD`` would find it."""
    if len(keys) == 1:
        # batch 1 (every claim/complete): the same statement, without the grouping and padding
        # (measured: most of this function's own cost at batch 1)
        row = conn.execute(_SELECT_MANY[1], (keys[0].scope, keys[0].operation_id)).fetchone()
        return {} if row is None else {(row[0], row[1]): _record_from_row(row)}
    by_scope: dict[str, list[str]] = {}
    for key in keys:
        by_scope.setdefault(key.scope, []).append(key.operation_id)
    found: dict[tuple[str, str], Record] = {}
    for scope, ids in by_scope.items():
        distinct = list(dict.fromkeys(ids))
        for start in range(0, len(distinct), _READ_CHUNK):
            chunk = distinct[start : start + _READ_CHUNK]
            size = 1 << (len(chunk) - 1).bit_length()
            params = [scope, *chunk]
            params += [chunk[-1]] * (size - len(chunk))
            for row in conn.execute(_SELECT_MANY[size], params):
                found[(row[0], row[1])] = _record_from_row(row)
    return found


def _completed(rec: Record, result: str | None, now: float) -> tuple[Record, tuple[Any, ...]]:
    """``rec`` (fenced) completed at ``now``, and the parameters of ``_COMPLETE_RECORD``."""
    done = new_record(
        rec.key, rec.fingerprint, State.COMPLETED, rec.token, rec.owner, None, rec.attempts,
        result, rec.last_error, rec.created_at, now, now, rec.unstarted_attempt,
    )  # fmt: skip
    return done, (result, now, now, rec.key.scope, rec.key.operation_id)


def _fence_each(
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
    current = _load_many(conn, [claim.key for claim in claims])
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


_entry_from_row = entry_from_row


__all__ = [
    "PURGE_QUARANTINE_SQL",
    "PURGE_SQL",
    "SCHEMA_VERSION",
    "SYNCHRONOUS_MODES",
    "SQLiteLedger",
    "SQLiteResult",
    "SQLiteTransaction",
    "SyncSQLiteLedger",
    "SyncSQLiteTransaction",
    "assess_sqlite",
]
