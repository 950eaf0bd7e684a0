"""The pause role of the MySQL ledger: one row per paused handler in ``<prefix>paused``, read by
every worker about once a second. The pause time is the server's clock."""

from __future__ import annotations

from replaysafe.ledger.base import PauseState, check_handler_name, pause_text
from replaysafe.stores.mysql.core import MySQLCore
from replaysafe.stores.mysql.records import key_bytes, key_text


class ControlsMixin(MySQLCore):
    """The pause role (:class:`~replaysafe.ledger.base.HandlerControls`) on MySQL."""

    async def set_paused(
        self, handler: str, paused: bool, *, reason: str = "", by: str = ""
    ) -> None:
        """Pause (upsert the handler's row, ``since`` = server now) or resume (delete it):
        one autocommit statement, durable when this returns."""
        self._guard("set_paused")
        name = key_bytes(check_handler_name(handler))
        table = self.table("paused")
        if paused:
            await self._run(
                "set_paused",
                f"INSERT INTO {table} (handler, reason, paused_by, since) "
                "VALUES (%s, %s, %s, UNIX_TIMESTAMP(NOW(6))) ON DUPLICATE KEY UPDATE "
                "reason = VALUES(reason), paused_by = VALUES(paused_by), since = VALUES(since)",
                (name, pause_text(reason), pause_text(by)),
            )
        else:
            await self._run("set_paused", f"DELETE FROM {table} WHERE handler = %s", (name,))

    async def paused(self) -> dict[str, PauseState]:
        """The paused handlers: one statement over a table with a row per paused handler."""
        rows, _ = await self._run(
            "paused",
            f"SELECT handler, reason, paused_by, since FROM {self.table('paused')} "
            "ORDER BY handler",
        )
        out: dict[str, PauseState] = {}
        for handler, reason, by, since in rows:
            name = key_text(handler) or ""
            out[name] = PauseState(name, reason, by, float(since))
        return out


__all__ = ["ControlsMixin"]
