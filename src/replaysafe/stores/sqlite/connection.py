"""One SQLite connection as the ledger uses it: the validated options, the connection (opened on
first use: WAL, ``synchronous``, schema creation and upgrade), one-call jobs under
``BEGIN IMMEDIATE`` and the steps of a caller's transaction, with ``sqlite3`` errors mapped into
the replaysafe tree. No state machine here: :class:`~replaysafe.stores.sqlite.core.SQLiteCore`
adds the transitions."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.errors import ConfigurationError, LedgerError, LedgerUnavailable
from replaysafe.stores.sqlite.errors import DATA_ERRORS, is_busy, ledger_error, unavailable_error
from replaysafe.stores.sqlite.schema import create_or_upgrade

T = TypeVar("T")


#: accepted values of ``PRAGMA synchronous`` (anything else is refused, never interpolated)
SYNCHRONOUS_MODES: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})

#: ``PRAGMA synchronous`` answers with a number
SYNCHRONOUS_NAMES: Final = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


@dataclass(frozen=True, slots=True)
class SQLiteResult:
    """What :meth:`SQLiteTransaction.execute` returns.

    Rows are fetched on the connection's thread before returning: handing a live ``sqlite3.Cursor``
    to the event loop would touch the connection from two threads.
    """

    rowcount: int
    lastrowid: int | None
    rows: list[tuple[Any, ...]]


class SQLiteConnection:
    """The connection-side half of a SQLite ledger, without the state machine (see
    :class:`~replaysafe.stores.sqlite.core.SQLiteCore`, which adds it): options, one connection,
    jobs, transaction steps and error mapping.

    Not thread-safe: its holder runs one method at a time. Two holders never share one: each
    has its own connection, and SQLite's ``BEGIN IMMEDIATE`` and ``busy_timeout`` serialise them
    as they serialise processes.
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
        except (sqlite3.Error, *DATA_ERRORS) as exc:
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
                if not is_busy(exc) or time.monotonic() >= deadline:
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
        create_or_upgrade(conn, self.path)

    def error(self, exc: BaseException) -> LedgerError:
        """``exc`` in the replaysafe tree (:func:`~replaysafe.stores.sqlite.errors.ledger_error`):
        ``LedgerDataError`` for refused data, else ``LedgerUnavailable``."""
        return ledger_error(self.path, self.busy_timeout, exc)

    def unavailable(self, exc: sqlite3.Error) -> LedgerUnavailable:
        """``exc`` as ``LedgerUnavailable``, with what to do about a busy lock or a broken file."""
        return unavailable_error(self.path, self.busy_timeout, exc)

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
        except (sqlite3.Error, *DATA_ERRORS) as exc:
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
