"""The :class:`~replaysafe.ledger.base.HandlerControls` role of the SQLite ledger: pause flags,
one row per paused handler in ``replaysafe_paused``, shared by every process on the file."""

from __future__ import annotations

import sqlite3

from replaysafe.ledger.base import HandlerControls, PauseState, check_handler_name, pause_text
from replaysafe.stores.sqlite.base import SQLiteLedgerBase
from replaysafe.stores.sqlite.sql import LIST_PAUSED, PAUSE, RESUME


class SQLiteControls(SQLiteLedgerBase, HandlerControls):
    """Pause flags in ``replaysafe_paused``: one row per paused handler, seen by every process
    sharing the file."""

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
                conn.execute(PAUSE, row)
        else:

            def write(conn: sqlite3.Connection) -> None:
                conn.execute(RESUME, (handler,))

        await self._write(write)

    async def paused(self) -> dict[str, PauseState]:
        """The paused handlers (one indexed read of a table with a row per paused handler)."""

        def rows(conn: sqlite3.Connection) -> dict[str, PauseState]:
            return {h: PauseState(h, r, b, t) for h, r, b, t in conn.execute(LIST_PAUSED)}

        return await self._read(rows)
