"""The admin role of the PostgreSQL ledger (:class:`~replaysafe.ledger.base.LedgerAdmin`):
migrate, summary (``replaysafe inspect``), durability (``explain``) and the horizon purge."""

from __future__ import annotations

from replaysafe.ledger.base import LedgerSummary, OpKey
from replaysafe.ledger.durability import Durability, assess_postgres
from replaysafe.stores.postgres.core import PostgresCore
from replaysafe.stores.postgres.driver import driver, pool_timeout
from replaysafe.stores.postgres.schema import MigrationReport
from replaysafe.stores.postgres.sql import DURABILITY_SQL, PURGE_BATCH


class PostgresAdmin(PostgresCore):
    """Schema, summary, durability and purge."""

    async def migrate(self) -> MigrationReport:
        """Create or upgrade the ledger schema; idempotent and safe to run concurrently.

        Runs in one transaction under ``pg_advisory_xact_lock`` keyed by schema and prefix, so two
        processes migrating at once take turns and the second finds nothing to do. A schema newer
        than this replaysafe is refused with ``ConfigurationError`` (nothing is changed).
        """
        return await self._run_migration()

    async def summary(self, *, top: int = 10) -> LedgerSummary:
        """Counts for ``replaysafe inspect``, in one statement (one snapshot).

        ``now``, expired leases and the last hour are judged by the database clock. Counting by
        state reads every operation row (an exact ``count(*)`` is a scan in PostgreSQL: linear in
        the table, 0.17 s at one million rows on the 2-core test machine); the ``top`` hot
        operations walk a partial index of retried rows; ``approx_bytes`` is
        ``pg_total_relation_size`` of the operations and quarantine tables (indexes and TOAST
        included)."""
        self._guard("summary")
        rows = await self._fetch("summary", self._sql("summary"), {"top": max(top, 0)})
        now, by_state, expired, oldest, recent, hot, reasons, size = rows[0]
        return LedgerSummary(
            now=float(now),
            by_state=dict(by_state or {}),
            expired_leases=int(expired),
            oldest_in_flight_at=oldest,
            hot_operations=[(OpKey(scope, op), int(n)) for scope, op, n in hot or []],
            quarantined_by_reason=dict(reasons or {}),
            completed_last_hour=int(recent),
            approx_bytes=int(size),
        )

    async def durability(self) -> Durability:
        """Read ``fsync``, ``synchronous_commit``, ``full_page_writes``,
        ``synchronous_standby_names`` and ``wal_writer_delay`` on one of the ledger's own pooled
        connections (so the DSN's ``options``, ``ALTER ROLE/DATABASE … SET`` and the server's
        configuration all count, as they do for every ledger statement) and judge them with
        :func:`assess_postgres`. Needs the server, not the schema. Raises
        ``LedgerUnavailable`` when the server cannot be reached."""
        self._guard("durability")
        pool = await self._ensure_pool()
        psycopg, _ = driver()
        try:
            async with pool.connection(timeout=self._acquire_timeout) as conn:
                cur = await conn.execute(DURABILITY_SQL)
                row = await cur.fetchone()
        except pool_timeout() as exc:
            raise self._pool_exhausted() from exc
        except psycopg.Error as exc:
            raise self._unavailable("durability", exc) from exc
        assert row is not None  # one SELECT without FROM: always one row
        names = ("fsync", "synchronous_commit", "full_page_writes", "synchronous_standby_names",
                 "wal_writer_delay")  # fmt: skip
        return assess_postgres(
            f"{self._redacted} (schema {self._schema})",
            dict(zip(names, (str(v) for v in row), strict=True)),
        )

    async def purge(self, older_than: float, *, limit: int = 10_000) -> int:
        """Forget up to ``limit`` COMPLETED records completed before ``older_than`` (POSIX
        seconds, compared with the database's ``completed_at``), oldest first.

        Deletes in batches of at most ``PURGE_BATCH`` rows, each its own short statement walking
        the partial index ``(completed_at) WHERE state = 'completed'``: no table scan, no lock
        held longer than one batch. A purged operation is new again to the ledger: purge only
        what lies beyond the replay horizon. Interrupted midway, the batches already deleted stay
        deleted (each committed).
        """
        self._guard("purge")
        deleted = 0
        while deleted < limit:
            n = min(PURGE_BATCH, limit - deleted)
            count = await self._rowcount(
                "purge", self._sql("purge"), {"before": float(older_than), "n": n}
            )
            deleted += count
            if count < n:
                break
        return deleted
