"""What every role of the MySQL ledger stands on: the configuration, the pool, the schema check,
single statements in autocommit, transactions retried on deadlocks, and the locking reads and
writes of operation records that the claim, quarantine and transactional paths share."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from replaysafe._config import config_or_options
from replaysafe.errors import ConfigurationError, LeaseLost, LedgerUnavailable
from replaysafe.ledger.base import Claim, OpKey, Record, check_fence
from replaysafe.stores.mysql import errors as err
from replaysafe.stores.mysql import schema
from replaysafe.stores.mysql.connection import MySQLConfig, Pool, driver
from replaysafe.stores.mysql.records import (
    RECORD_COLUMNS,
    RECORD_SELECT,
    key_params,
    keys_where,
    record,
    record_params,
    upsert_sql,
)

if TYPE_CHECKING:
    from asyncmy.connection import Connection

T = TypeVar("T")
Rows = list[tuple[Any, ...]]

#: why a failed COMMIT leaves the outcome unknown, and how to learn it
COMMIT_HINT = (
    "the connection died while committing: the transaction may or may not have committed; the "
    "next claim of the operation tells (AlreadyDone if it did)"
)


async def execute(conn: Connection, sql: str, params: Sequence[Any] = ()) -> tuple[Rows, int]:
    """Run one statement on ``conn``: its rows (none for a statement without a result) and its
    row count (matched rows, as the connection sets ``CLIENT_FOUND_ROWS``)."""
    async with conn.cursor() as cur:
        count = await cur.execute(sql, tuple(params))
        rows = [tuple(r) for r in await cur.fetchall()] if cur.description else []
        return rows, int(count or 0)


async def db_now(conn: Connection) -> float:
    """The server's clock, POSIX seconds (read after the locks are held, so a lease is judged
    at the moment the decision is made)."""
    rows, _ = await execute(conn, "SELECT UNIX_TIMESTAMP(NOW(6))")
    return float(rows[0][0])


class MySQLCore:
    """The shared state and plumbing of :class:`~replaysafe.stores.mysql.ledger.MySQLLedger`
    (each role mixin builds on it). Holds no connection until the first call."""

    def __init__(self, config: MySQLConfig | None = None, **options: Any) -> None:
        self._config = config_or_options("MySQLLedger", MySQLConfig, config, options)
        self._pool: Pool | None = None
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self._closed = False
        self._clock_offset = 0.0
        #: tasks inside one of this store's transactions (see _guard)
        self._tx_tasks: set[asyncio.Task[Any]] = set()

    @property
    def config(self) -> MySQLConfig:
        return self._config

    @property
    def table_prefix(self) -> str:
        return self._config.table_prefix

    def table(self, suffix: str) -> str:
        """Quoted, qualified name of one of the store's tables."""
        return self._config.table(suffix)

    def now(self) -> float:
        """Local time corrected by the offset to the server's clock measured when the store
        opened. For display and nack delays only: every lease is judged by the server."""
        return time.time() + self._clock_offset

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return (
            f"{type(self).__name__}({self._config.redacted!r}, "
            f"table_prefix={self._config.table_prefix!r}{state})"
        )

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Connect, measure the clock offset and check (or, with ``auto_migrate``, create) the
        schema. Idempotent; every other call opens lazily."""
        await self._ensure_ready()

    async def close(self) -> None:
        """Close the pool's connections; idempotent. Later calls raise ``LedgerUnavailable``."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def migrate(self) -> schema.MigrationReport:
        """Create the ledger's tables if missing and record the schema version (see
        :func:`replaysafe.stores.mysql.schema.migrate`). Idempotent; concurrent runs take turns."""
        self._guard("migrate")
        pool = self._ensure_pool()
        conn = await pool.acquire()
        broken = False
        try:
            report = await schema.migrate(conn, self._config)
        except BaseException as exc:
            broken = not err.is_driver_error(exc) or err.is_connection_loss(exc)
            if err.is_driver_error(exc):
                raise err.map_error(self._config, "migrate", exc) from None
            raise
        finally:
            pool.release(conn, broken=broken)
        self._ready = False  # re-check (cheaply) on the next call
        return report

    def _ensure_pool(self) -> Pool:
        if self._closed:
            self._guard("open")
        if self._pool is None:
            driver()  # MissingExtra now, not at the first statement
            self._pool = Pool(self._config)
        return self._pool

    async def _ensure_ready(self) -> Pool:
        pool = self._ensure_pool()
        if self._ready:
            return pool
        async with self._ready_lock:
            if self._ready:
                return pool
            if self._config.auto_migrate:
                await self.migrate()
            conn = await pool.acquire()
            broken = False
            try:
                before = time.time()
                version = await schema.read_version(conn, self._config)
                now = await db_now(conn)
                self._clock_offset = now - (before + time.time()) / 2
            except BaseException as exc:
                broken = True
                if err.is_driver_error(exc):
                    raise err.map_error(self._config, "open", exc) from None
                raise
            finally:
                pool.release(conn, broken=broken)
            schema.check_version(self._config, version)
            self._ready = True
            return pool

    def _guard(self, what: str) -> None:
        if self._closed:
            raise LedgerUnavailable(
                f"{self!r} is closed; create a new {type(self).__name__} to use the database again"
            )
        if self._tx_tasks:
            task = asyncio.current_task()
            if task is not None and task in self._tx_tasks:
                raise ConfigurationError(
                    f"{what} on {self!r} from inside its own open transaction() could wait on "
                    "that transaction's row locks forever; use tx.execute()/complete_in(tx, ...) "
                    "inside the block, or call it after the block"
                )

    # ------------------------------------------------------------------ statements

    async def _run(self, action: str, sql: str, params: Sequence[Any] = ()) -> tuple[Rows, int]:
        """One statement in autocommit on a pooled connection (retried on a deadlock or lock
        wait timeout, which roll a single statement back whole)."""
        self._guard(action)
        return await self._in_tx(action, lambda conn: execute(conn, sql, params), begin=False)

    async def _in_tx(
        self,
        action: str,
        body: Callable[[Connection], Awaitable[T]],
        *,
        begin: bool = True,
        retry_duplicates: bool = False,
        ready: bool = True,
    ) -> T:
        """Run ``body`` in one transaction (``begin``; else in autocommit) on a pooled
        connection and commit. A deadlock or lock wait timeout (and, with ``retry_duplicates``,
        a duplicate key: a concurrent insert won a race) rolls back and runs ``body`` again
        from scratch, up to :data:`~replaysafe.stores.mysql.errors.RETRIES` times; ``body``
        must therefore decide only from what it reads. Other errors roll back and are mapped
        (replaysafe errors raised by ``body``, such as ``LeaseLost``, propagate as they are).
        ``ready=False`` skips the schema check (calls that need the server only)."""
        pool = await self._ensure_ready() if ready else self._ensure_pool()
        last: BaseException | None = None
        for attempt in range(err.RETRIES):
            conn = await pool.acquire()
            broken = False
            try:
                if begin:
                    await conn.begin()
                result = await body(conn)
                if begin:
                    try:
                        await conn.commit()
                    except (driver().errors.MySQLError, OSError) as exc:
                        broken = True
                        raise err.map_error(self._config, action, exc, COMMIT_HINT) from None
                return result
            except BaseException as exc:
                broken = broken or await self._rollback(conn, exc)
                retryable = err.is_race(exc) or (
                    retry_duplicates and err.code_of(exc) == err.DUP_ENTRY
                )
                if err.is_driver_error(exc) or isinstance(exc, UnicodeEncodeError | OSError):
                    if not retryable:
                        raise err.map_error(self._config, action, exc) from None
                    last = exc
                else:
                    raise
            finally:
                pool.release(conn, broken=broken)
            # back off a little, jittered, so racing transactions stop meeting head-on
            await asyncio.sleep(random.uniform(0.0, 0.005 * 2**attempt))
        assert last is not None
        raise err.races_exhausted(self._config, action, last)

    async def _rollback(self, conn: Connection, exc: BaseException) -> bool:
        """Roll back after ``exc``; True when the connection must be discarded. Never raises
        (the caller is propagating the real error); shielded from a second cancellation."""
        if err.is_connection_loss(exc) or isinstance(exc, asyncio.CancelledError):
            # a cancelled statement may still be running on the server: never reuse it
            return True
        try:
            await asyncio.shield(conn.rollback())
        except BaseException:
            return True
        return False

    # ------------------------------------------------------------------ records

    async def _lock_records(self, conn: Connection, keys: Iterable[OpKey]) -> dict[OpKey, Record]:
        """The records of ``keys`` that exist, locked (``FOR UPDATE``, walking the primary key
        so only these rows are touched) until the transaction ends. Under READ COMMITTED a
        missing key takes no gap lock: a concurrent first claim of it then fails its INSERT
        with a duplicate key, and the transaction runs again."""
        unique = sorted(set(keys))
        if not unique:
            return {}
        params: list[Any] = []
        for key in unique:
            params += key_params(key)
        rows, _ = await execute(
            conn,
            # FORCE INDEX: on a small table the optimizer would scan it instead, and a locking
            # scan waits on every row another transaction holds, related or not
            f"SELECT {RECORD_SELECT} FROM {self.table('operations')} FORCE INDEX (PRIMARY) "
            f"WHERE {keys_where(len(unique))} FOR UPDATE",
            params,
        )
        return {rec.key: rec for rec in map(record, rows)}

    async def _write_records(
        self, conn: Connection, records: Iterable[Record], existed: set[OpKey]
    ) -> None:
        """Write ``records`` (the last one per key wins): a plain INSERT for keys that did not
        exist when locked (a concurrent insert makes it fail: a race to retry, never an
        overwrite), an upsert for the rows this transaction holds locked."""
        final = {rec.key: rec for rec in records}
        for update in (False, True):
            batch = [r for k, r in final.items() if (k in existed) is update]
            if not batch:
                continue
            params: list[Any] = []
            for rec in batch:
                params += record_params(rec)
            table = self.table("operations")
            await execute(
                conn, upsert_sql(table, RECORD_COLUMNS, len(batch), update=update), params
            )

    async def _get(self, action: str, key: OpKey) -> Record | None:
        rows, _ = await self._run(
            action,
            f"SELECT {RECORD_SELECT} FROM {self.table('operations')} "
            "WHERE scope = %s AND operation_id = %s",
            key_params(key),
        )
        return record(rows[0]) if rows else None

    async def _lease_lost(self, claim: Claim) -> LeaseLost:
        """The ``LeaseLost`` for ``claim``, saying what the record is now (best effort)."""
        try:
            current = await self._get("get", claim.key)
        except LedgerUnavailable:
            current = None
        try:
            check_fence(current, claim)
        except LeaseLost as exc:
            return exc
        return LeaseLost(
            f"claim on {claim.key.scope}/{claim.key.operation_id} with fencing token "
            f"{claim.token} was refused; do not complete at the broker"
        )


__all__ = ["COMMIT_HINT", "MySQLCore", "db_now", "execute"]
