"""The handler-control role of the PostgreSQL ledger
(:class:`~replaysafe.ledger.base.HandlerControls`): pause flags in ``<prefix>paused``, one row per
paused handler, read by every worker sharing the database."""

from __future__ import annotations

from replaysafe.ledger.base import PauseState, check_handler_name, pause_text
from replaysafe.stores.postgres.core import PostgresCore


class PostgresControls(PostgresCore):
    """Pause and resume handlers (``replaysafe handler pause|resume``)."""

    async def set_paused(
        self, handler: str, paused: bool, *, reason: str = "", by: str = ""
    ) -> None:
        """Pause (upsert a row in ``<prefix>paused``, ``since`` = database now) or resume (delete
        it) ``handler``: one autocommit statement, durable when this returns."""
        self._guard("set_paused")
        check_handler_name(handler)
        if paused:
            params = {"handler": handler, "reason": pause_text(reason), "by": pause_text(by)}
            await self._rowcount("set_paused", self._sql("pause"), params)
        else:
            await self._rowcount("set_paused", self._sql("resume"), {"handler": handler})

    async def paused(self) -> dict[str, PauseState]:
        """The paused handlers: one statement over a table with a row per paused handler."""
        rows = await self._fetch("paused", self._sql("list_paused"), {})
        return {h: PauseState(h, r, b, float(t)) for h, r, b, t in rows}
