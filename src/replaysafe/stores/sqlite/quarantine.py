"""The :class:`~replaysafe.ledger.base.QuarantineStore` role of the SQLite ledger: entries in
``replaysafe_quarantine``, written (with the record's move to QUARANTINED) in one fsynced
transaction, listed, redriven and purged."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from functools import partial

from replaysafe.ledger.base import (
    Claim,
    QuarantineEntry,
    QuarantineRequest,
    QuarantineStore,
    entry_from_row,
)
from replaysafe.quarantine import QuarantineReason
from replaysafe.stores.sqlite.base import SQLiteLedgerBase
from replaysafe.stores.sqlite.sql import LIST_ENTRIES, PURGE_QUARANTINE_SQL, SELECT_ENTRY


class SQLiteQuarantine(SQLiteLedgerBase, QuarantineStore):
    """Quarantine entries in ``replaysafe_quarantine``: writes are one ``BEGIN IMMEDIATE`` job
    each; listing reads without the write lock."""

    async def quarantine(
        self, request: QuarantineRequest, claim: Claim | None = None
    ) -> QuarantineEntry:
        """Record the entry (and, with ``claim``, move the record to QUARANTINED under fencing) in
        one fsynced transaction, so it is durable before the caller completes at the broker."""
        return await self._write(partial(self._core.quarantine_rows, request, claim))

    async def quarantined(
        self, *, reason: QuarantineReason | None = None, limit: int = 100
    ) -> list[QuarantineEntry]:
        if limit <= 0:
            return []  # SQLite reads a negative LIMIT as "no limit"
        reason_value = None if reason is None else reason.value

        def rows(conn: sqlite3.Connection) -> list[QuarantineEntry]:
            cur = conn.execute(LIST_ENTRIES, (reason_value, limit))
            return [entry_from_row(r) for r in cur.fetchall()]

        return await self._read(rows)

    async def quarantine_entry(self, entry_id: str) -> QuarantineEntry | None:
        """One quarantine entry by id, or None. Reads only."""

        def row(conn: sqlite3.Connection) -> QuarantineEntry | None:
            found = conn.execute(SELECT_ENTRY, (entry_id,)).fetchone()
            return None if found is None else entry_from_row(found)

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
