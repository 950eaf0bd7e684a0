"""The state every role of :class:`~replaysafe.stores.postgres.ledger.PostgresLedger` shares:
options and statements (:class:`~replaysafe.stores.postgres.connection.Shared`), the async pool,
the clock offset, open and close, and the one-statement plumbing with its error mapping."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Self

from replaysafe.errors import ConfigurationError, LeaseLost, LedgerUnavailable
from replaysafe.ledger.base import Claim, OpKey, Record
from replaysafe.stores.postgres.codec import decode_record, fence_error, get_params
from replaysafe.stores.postgres.connection import Shared
from replaysafe.stores.postgres.driver import driver, log, pool_timeout
from replaysafe.stores.postgres.schema import (
    MigrationReport,
    check_version,
    corrected_now,
    migration_steps,
    open_steps,
)
from replaysafe.stores.postgres.steps import drive_on

if TYPE_CHECKING:  # the driver is an optional extra: imported lazily at run time
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool


class PostgresCore:
    """The base of the ledger's role mixins (claims, quarantine, controls, admin, transactions):
    one pool, one clock offset, one way to run a statement. Not a ledger by itself; see
    :class:`~replaysafe.stores.postgres.ledger.PostgresLedger`."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "replaysafe",
        table_prefix: str = "rs_",
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        acquire_timeout: float = 10.0,
        auto_migrate: bool = False,
    ) -> None:
        self._s = shared = Shared(
            dsn,
            schema=schema,
            table_prefix=table_prefix,
            min_size=min_size,
            max_size=max_size,
            connect_timeout=connect_timeout,
            acquire_timeout=acquire_timeout,
            auto_migrate=auto_migrate,
        )
        self._dsn = dsn
        self._redacted = shared.redacted
        self._schema = schema
        self._prefix = table_prefix
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = shared.connect_timeout
        self._acquire_timeout = shared.acquire_timeout
        self._auto_migrate = auto_migrate
        self._names = shared.names
        # the statements and the error mapping are the shared object's (the sync twin's too)
        self._sql = shared.sql
        self._scrub = shared.scrub
        self._error = shared.error
        self._unavailable = shared.unavailable
        self._pool_exhausted = shared.pool_exhausted
        self._pool: AsyncConnectionPool[Any] | None = None
        self._ready = False
        self._open_lock = asyncio.Lock()
        self._ready_lock = asyncio.Lock()
        self._closed = False
        self._clock_offset = 0.0
        #: tasks inside one of this ledger's transactions (see _guard)
        self._tx_tasks: set[asyncio.Task[Any]] = set()
        self._flush: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ identity

    @property
    def schema(self) -> str:
        return self._schema

    @property
    def table_prefix(self) -> str:
        return self._prefix

    @property
    def dsn(self) -> str:
        """The DSN with its password redacted (the real one is never exposed)."""
        return self._redacted

    def table(self, key: str) -> str:
        """Qualified name of a ledger object (``ops``, ``q``, ``seq`` …), for display."""
        return self._s.table(key)

    def now(self) -> float:
        """Local time corrected by the offset to the database clock measured at ``open()``.

        For display and nack delays only: leases are judged by the database in every statement.
        """
        return corrected_now(self._clock_offset)

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return (
            f"PostgresLedger({self._redacted!r}, schema={self._schema!r}, "
            f"table_prefix={self._prefix!r}{state})"
        )

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Open the pool (waiting up to ``connect_timeout`` for its first connection), measure
        the clock offset, and check (or, with ``auto_migrate``, create) the schema. Idempotent;
        every other call opens lazily."""
        await self._ensure_ready()

    async def close(self) -> None:
        """Close the pool; idempotent. Later calls raise ``LedgerUnavailable``."""
        self._closed = True
        pool, self._pool = self._pool, None
        self._ready = False
        if self._flush is not None and not self._flush.done():
            # let a running pool check hand its connections back before the pool closes them
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._flush), self._connect_timeout)
        if pool is not None:
            await pool.close(timeout=5.0)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def _run_migration(self) -> MigrationReport:
        """:meth:`~replaysafe.stores.postgres.admin.PostgresAdmin.migrate`'s work (also run by
        the open check with ``auto_migrate``)."""
        pool = await self._ensure_pool()
        psycopg, _ = driver()
        try:
            async with pool.connection(timeout=self._acquire_timeout) as conn, conn.transaction():
                report = await drive_on(conn, migration_steps(self._s))
        except pool_timeout() as exc:
            raise self._pool_exhausted() from exc
        except psycopg.Error as exc:
            raise self._unavailable("migrate", exc) from exc
        self._ready = False  # re-check (cheaply) on the next call
        return report

    # ------------------------------------------------------------------ plumbing

    async def _lease_lost(self, claim: Claim) -> LeaseLost:
        """The ``LeaseLost`` for a fenced write that changed no row, saying what the record is."""
        try:
            current = await self._read(claim.key)
        except LedgerUnavailable:
            current = None
        return fence_error(current, claim)

    async def _read(self, key: OpKey) -> Record | None:
        """The record of ``key`` as one statement reads it, or None."""
        rows = await self._fetch("get", self._sql("get"), get_params(key))
        return decode_record(rows[0]) if rows else None

    async def _fetch(
        self, action: str, query: bytes, params: Any, *, binary: bool = False
    ) -> list[tuple[Any, ...]]:
        """One statement on a pooled autocommit connection; all rows. ``binary`` asks for
        results in binary format (the claim and complete_many statements: their text, bigint,
        integer, float8 and boolean columns load to the same Python values, with less work on
        both sides than printing and parsing text)."""
        rows: list[tuple[Any, ...]] = await self._statement(action, query, params, True, binary)
        return rows

    async def _rowcount(self, action: str, query: bytes, params: Any) -> int:
        count: int = await self._statement(action, query, params, False)
        return count

    async def _statement(
        self, action: str, query: bytes, params: Any, rows: bool, binary: bool = False
    ) -> Any:
        pool = await self._ensure_ready()
        psycopg, _ = driver()
        used: AsyncConnection[Any] | None = None
        try:
            async with pool.connection(timeout=self._acquire_timeout) as conn:
                used = conn
                cur = await conn.execute(query, params, binary=binary)
                return await cur.fetchall() if rows else cur.rowcount
        except pool_timeout() as exc:  # first: PoolTimeout is a psycopg.OperationalError
            raise self._pool_exhausted() from exc
        except (psycopg.Error, UnicodeEncodeError) as exc:
            if used is not None and used.broken:
                await self._flush_dead_connections(pool)
            raise self._error(action, exc) from exc

    async def _flush_dead_connections(self, pool: AsyncConnectionPool[Any]) -> None:
        """A pooled connection broke. Its idle siblings probably broke with it (server restart,
        failover, backends terminated): check them all now, so the next call gets a live one
        instead of failing once per dead connection. Bounded by ``connect_timeout``; the check
        is shielded and finishes in the background (cancelling it midway would lose the
        connections it has taken out of the pool)."""
        if self._flush is None or self._flush.done():
            self._flush = asyncio.ensure_future(pool.check())
        try:
            await asyncio.wait_for(asyncio.shield(self._flush), self._connect_timeout)
        except Exception:  # the caller is raising its own error; the check's outcome is logged
            log.debug("pool check after a broken connection did not finish", exc_info=True)

    async def _rollback(self, conn: AsyncConnection[Any]) -> str | None:
        """Roll back; never raises (the caller is already propagating the real error)."""
        psycopg, _ = driver()
        try:
            await conn.execute("ROLLBACK")
        except psycopg.Error as exc:
            # a broken connection has no transaction left to roll back; the pool discards it
            return f"rollback failed ({self._scrub(str(exc))}); the connection is discarded"
        return None

    def _guard(self, what: str) -> None:
        if self._closed:
            raise LedgerUnavailable(
                f"{self!r} is closed; create a new PostgresLedger to use the database again"
            )
        if self._tx_tasks:
            task = asyncio.current_task()
            if task is not None and task in self._tx_tasks:
                raise ConfigurationError(
                    f"{what} on {self!r} from inside its own open transaction() could wait on that "
                    "transaction's row locks forever; use tx.execute()/complete_in(tx, ...) inside "
                    "the block, or call it after the block"
                )

    async def _ensure_pool(self) -> AsyncConnectionPool[Any]:
        if self._pool is not None:
            return self._pool
        if self._closed:
            self._guard("open")
        async with self._open_lock:
            if self._pool is not None:
                return self._pool
            self._guard("open")
            psycopg, pool_mod = driver()
            self._s.check_dsn()
            pool: AsyncConnectionPool[Any] = pool_mod.AsyncConnectionPool(**self._s.pool_args())
            problem: str | None = None
            try:
                await pool.open(wait=self._min_size > 0, timeout=self._connect_timeout)
                if self._min_size == 0:  # prove the server answers at all
                    async with pool.connection(timeout=self._connect_timeout) as conn:
                        await conn.execute("SELECT 1")
            except (psycopg.Error, pool_mod.PoolTimeout) as exc:
                # the driver's message may echo the connection string: scrub it, and do not
                # chain the original exception (its text would reach tracebacks and logs)
                problem = self._s.problem(exc)
            if problem is not None:
                await pool.close(timeout=1.0)
                # the pool only says it timed out; one direct attempt says why
                raise self._s.no_connection(await self._why_no_connection() or problem)
            self._pool = pool
            return pool

    async def _why_no_connection(self) -> str | None:
        psycopg, _ = driver()
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, connect_timeout=self._s.libpq_connect_timeout()
            )
        except psycopg.Error as exc:
            return self._s.problem(exc)
        await conn.close()
        return None

    async def _ensure_ready(self) -> AsyncConnectionPool[Any]:
        if self._ready and self._pool is not None:
            return self._pool
        async with self._ready_lock:
            if self._ready and self._pool is not None:
                return self._pool
            return await self._check_schema()

    async def _check_schema(self) -> AsyncConnectionPool[Any]:
        """Measure the clock offset and check the schema version (migrating first if asked)."""
        pool = await self._ensure_pool()
        if self._auto_migrate:
            await self._run_migration()
        psycopg, _ = driver()
        try:
            async with pool.connection(timeout=self._acquire_timeout) as conn:
                self._clock_offset, version = await drive_on(conn, open_steps(self._s))
        except pool_timeout() as exc:
            raise self._pool_exhausted() from exc
        except psycopg.Error as exc:
            raise self._unavailable("open", exc) from exc
        check_version(self._s, version)
        self._ready = True
        return pool
