"""The :class:`~replaysafe.ledger.base.LedgerAdmin` role of the SQLite ledger: the summary
``replaysafe inspect`` shows, the horizon purge and the durability ``explain`` reads. The schema
is created and upgraded on open (:mod:`replaysafe.stores.sqlite.schema`), so ``migrate`` keeps
the default (nothing to do)."""

from __future__ import annotations

import sqlite3

from replaysafe.ledger.base import LedgerAdmin, LedgerSummary, OpKey, State
from replaysafe.ledger.durability import Durability, assess_sqlite
from replaysafe.stores.sqlite.base import SQLiteLedgerBase
from replaysafe.stores.sqlite.connection import SYNCHRONOUS_NAMES
from replaysafe.stores.sqlite.sql import (
    PURGE_SQL,
    SUMMARY_BY_STATE,
    SUMMARY_HOT,
    SUMMARY_IN_FLIGHT,
    SUMMARY_REASONS,
    SUMMARY_RECENT,
)


class SQLiteAdmin(SQLiteLedgerBase, LedgerAdmin):
    """What operators read and prune: the summary (one read snapshot), the horizon purge (one
    bounded statement) and the connection's durability."""

    async def durability(self) -> Durability:
        """What the ledger's own connection uses, read from it (``PRAGMA journal_mode`` and
        ``PRAGMA synchronous``): WAL with FULL/EXTRA fsyncs every commit (durable); WAL with
        NORMAL survives a process crash but a machine crash can roll back the latest commits
        (loses recent); OFF syncs nothing, and a ``:memory:`` database (or journal MEMORY/OFF)
        dies with the process or can be corrupted by a crash (not durable)."""

        def pragmas(conn: sqlite3.Connection) -> tuple[str, str]:
            (journal,) = conn.execute("PRAGMA journal_mode").fetchone()
            (sync,) = conn.execute("PRAGMA synchronous").fetchone()
            return str(journal).lower(), SYNCHRONOUS_NAMES.get(int(sync), str(sync))

        journal, sync = await self._read(pragmas)
        return assess_sqlite(f"sqlite:{self.path}", journal, sync)

    async def summary(self, *, top: int = 10) -> LedgerSummary:
        """Counts for ``replaysafe inspect``, read in one snapshot (a read transaction: writers
        are not blocked). Leases and the last hour are judged by the injected clock;
        ``approx_bytes`` is the database file's size (``page_count * page_size``: every table in
        the file, the WAL not included)."""
        now = self._core.clock.now()

        def read(conn: sqlite3.Connection) -> LedgerSummary:
            conn.execute("BEGIN")  # deferred: one snapshot for every query below, no write lock
            try:
                by_state = dict(conn.execute(SUMMARY_BY_STATE).fetchall())
                expired, oldest = conn.execute(SUMMARY_IN_FLIGHT, (now,)).fetchone()
                (recent,) = conn.execute(SUMMARY_RECENT, (now - 3600.0,)).fetchone()
                hot = conn.execute(SUMMARY_HOT, (max(top, 0),)).fetchall()
                reasons = dict(conn.execute(SUMMARY_REASONS).fetchall())
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
