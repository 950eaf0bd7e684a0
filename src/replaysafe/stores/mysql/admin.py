"""The admin role of the MySQL ledger: ``summary`` (``replaysafe inspect``), the horizon
``purge``, ``durability`` (``explain``) and ``migrate`` (on :class:`MySQLCore`)."""

from __future__ import annotations

from typing import Final

from replaysafe.ledger.base import LedgerSummary, OpKey
from replaysafe.ledger.durability import Durability
from replaysafe.stores.mysql.core import MySQLCore, execute
from replaysafe.stores.mysql.durability import VARIABLES, assess_mysql
from replaysafe.stores.mysql.records import key_text

#: rows deleted per statement by purge (each statement commits on its own, so no lock is held
#: longer than one small batch takes)
PURGE_BATCH: Final = 1000


class AdminMixin(MySQLCore):
    """The admin role (:class:`~replaysafe.ledger.base.LedgerAdmin`) on MySQL."""

    async def summary(self, *, top: int = 10) -> LedgerSummary:
        """Counts for ``replaysafe inspect``. ``now``, expired leases and the last hour are
        judged by the server's clock. Several statements, each its own READ COMMITTED snapshot
        (counts taken a moment apart may not add up exactly under load); counting by state
        reads every operation row. ``approx_bytes`` is InnoDB's estimate of the operations and
        quarantine tables with their indexes (``information_schema.tables``)."""
        self._guard("summary")
        ops, q = self.table("operations"), self.table("quarantine")
        rows, _ = await self._run("summary", "SELECT UNIX_TIMESTAMP(NOW(6))")
        now = float(rows[0][0])
        states, _ = await self._run(
            "summary",
            "SELECT state, COUNT(*), "
            "SUM(state = 'in_flight' AND lease_until <= %s), "
            "MIN(CASE WHEN state = 'in_flight' THEN updated_at END), "
            "SUM(state = 'completed' AND completed_at >= %s) "
            f"FROM {ops} GROUP BY state",
            (now, now - 3600.0),
        )
        hot: list[tuple[OpKey, int]] = []
        if top > 0:
            # VARBINARY keys order by their bytes: code-point order, as on every backend
            hot_rows, _ = await self._run(
                "summary",
                f"SELECT scope, operation_id, attempts FROM {ops} WHERE attempts > 1 "
                "ORDER BY attempts DESC, scope, operation_id LIMIT %s",
                (top,),
            )
            hot = [(OpKey(key_text(s) or "", key_text(o) or ""), int(n)) for s, o, n in hot_rows]
        reasons, _ = await self._run("summary", f"SELECT reason, COUNT(*) FROM {q} GROUP BY reason")
        size, _ = await self._run(
            "summary",
            "SELECT COALESCE(SUM(data_length + index_length), 0) FROM information_schema.tables "
            "WHERE table_schema = %s AND table_name IN (%s, %s)",
            (
                self.config.database,
                f"{self.table_prefix}operations",
                f"{self.table_prefix}quarantine",
            ),
        )
        oldest = [float(r[3]) for r in states if r[3] is not None]
        return LedgerSummary(
            now=now,
            by_state={str(r[0]): int(r[1]) for r in states},
            expired_leases=sum(int(r[2] or 0) for r in states),
            oldest_in_flight_at=min(oldest) if oldest else None,
            hot_operations=hot,
            quarantined_by_reason={str(r[0]): int(r[1]) for r in reasons},
            completed_last_hour=sum(int(r[4] or 0) for r in states),
            approx_bytes=int(size[0][0]),
        )

    async def purge(self, older_than: float, *, limit: int = 10_000) -> int:
        """Forget up to ``limit`` COMPLETED records completed before ``older_than`` (POSIX
        seconds), oldest first, in statements of at most :data:`PURGE_BATCH` rows walking the
        ``(state, completed_at)`` index, each committing on its own. A purged operation is new
        again to the ledger: purge only what lies beyond the replay horizon."""
        self._guard("purge")
        sql = (
            f"DELETE FROM {self.table('operations')} WHERE state = 'completed' "
            "AND completed_at < %s ORDER BY completed_at LIMIT %s"
        )
        deleted = 0
        while deleted < limit:
            n = min(PURGE_BATCH, limit - deleted)
            _, count = await self._run("purge", sql, (float(older_than), n))
            deleted += count
            if count < n:
                break
        return deleted

    async def durability(self) -> Durability:
        """Read ``innodb_flush_log_at_trx_commit``, ``sync_binlog``, ``log_bin``,
        ``innodb_doublewrite``, ``wsrep_on`` and ``read_only`` from the live server on one of
        the ledger's own connections and judge them with :func:`assess_mysql`. Needs the
        server, not the schema. ``LedgerUnavailable`` when it cannot be reached."""
        self._guard("durability")
        self._ensure_pool()
        sql = f"SHOW VARIABLES WHERE Variable_name IN ({', '.join(['%s'] * len(VARIABLES))})"
        rows, _ = await self._in_tx(
            "durability", lambda conn: execute(conn, sql, VARIABLES), begin=False, ready=False
        )
        settings = {str(name): str(value) for name, value in rows}
        return assess_mysql(f"{self.config.redacted} (prefix {self.table_prefix})", settings)


__all__ = ["PURGE_BATCH", "AdminMixin"]
