"""The outbox in PostgreSQL.

Build it from a :class:`~replaysafe.stores.postgres.ledger.PostgresLedger`
(``PostgresOutboxStore(ledger)``: same database, schema and table prefix, statements run through
``ledger.transaction()``), or from a DSN for a service without a ledger
(``PostgresOutboxStore("postgresql://…", schema="app")``: a small pool of its own).
Table: ``<schema>.<prefix>outbox``; create it with :meth:`migrate`.

How it keeps its promises:

- **Staging is the caller's transaction.** ``stage`` writes through the caller's
  ``PostgresTransaction`` (or a psycopg ``AsyncConnection`` inside a transaction): the rows commit
  or roll back with the business rows; uncommitted rows are invisible to relays.
- **Per-key order survives concurrent stagers.** A sequence assigns ids at insert time, not at
  commit, so two transactions staging the same key could commit in the opposite order of their ids.
  ``stage`` first takes a transaction-level advisory lock per (destination, key) (two-int form,
  keyed by schema and a hash of the pair; hash collisions only serialise unrelated keys), so a
  key's rows are inserted — and get their ids — in commit order. Keyless rows take no lock.
- **Several relays, no routine double publish.** A relay's claim is one statement in its own
  transaction: ``SELECT … FOR UPDATE SKIP LOCKED`` of the oldest pending rows, minus any row whose
  key has an earlier pending row the claim does not hold (another relay holds it, so it must be
  confirmed first). The rows stay locked while the relay publishes and until its mark commits.
  What still duplicates: a relay that dies (or loses its connection) after the broker accepted a
  batch and before the mark committed; the transaction rolls back, the rows are pending again and
  the next claim publishes them again, with the same operation ids. Never a loss.
- Claims hold a transaction open while publishing: keep the relay's ``publish_timeout`` short.

Identifiers come from the validated ledger patterns and are composed with
``psycopg.sql.Identifier``; every value is a bound parameter. DSN passwords never reach ``repr``,
logs or errors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from replaysafe._redact import redact, scrub, secrets_of
from replaysafe._url import take_options
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.envelope import DEFAULT_LIMITS, Envelope, Limits
from replaysafe.errors import ConfigurationError, LedgerUnavailable, ReplaysafeError
from replaysafe.ledger.base import Transaction
from replaysafe.outbox.base import (
    DEFAULT_RELAY_LEASE,
    NO_SKIP,
    ClaimedBatch,
    OutboxRow,
    OutboxStore,
    Skip,
    check_limit,
    prepare_rows,
)
from replaysafe.stores.postgres.connection import PREFIX_PATTERN, SCHEMA_PATTERN
from replaysafe.stores.postgres.driver import driver, psycopg_module
from replaysafe.stores.postgres.errors import outbox_error
from replaysafe.stores.postgres.ledger import PostgresLedger
from replaysafe.stores.postgres.outbox_sql import (
    COLUMNS,
    INSERT_CHUNK,
    INSERT_COLUMNS,
    claim_statement,
    column_list,
    decode_row,
    int32,
    migration_statements,
    table_ident,
)
from replaysafe.stores.postgres.transaction import PostgresTransaction

if TYPE_CHECKING:  # the driver is an optional extra: imported lazily at run time
    from psycopg import AsyncConnection
    from psycopg.sql import Composable, Composed
    from psycopg_pool import AsyncConnectionPool


class _Batch(ClaimedBatch):
    """Rows locked by the claim's transaction; marks run in it and commit when the claim ends."""

    def __init__(
        self, store: PostgresOutboxStore, conn: AsyncConnection[Any], rows: list[OutboxRow]
    ):
        self._store = store
        self._conn = conn
        self.rows = rows
        self.active = True

    async def mark_published(self, row_ids: Sequence[int]) -> int:
        if not row_ids:
            return 0
        return await self._store._mark(self._conn, row_ids)


#: the query parameters of an outbox URL (``from_url``), as the constructor takes them
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "schema": str, "table_prefix": str, "max_size": int, "connect_timeout": float,
    "acquire_timeout": float,
}  # fmt: skip


class PostgresOutboxStore(OutboxStore):
    """The outbox in PostgreSQL (see the module docstring).

    ``source`` is a :class:`PostgresLedger` (the outbox shares its database, schema, table prefix,
    pool and clock) or a DSN (then ``schema`` and ``table_prefix`` name where the table lives and
    the store opens a pool of up to ``max_size`` connections on first use). ``clock`` stamps stage
    times and marks (default: the ledger's database-corrected clock, else the system clock).
    ``limits`` are what every staged envelope must pass: use the consumers' limits.
    """

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresOutboxStore:
        """The outbox at ``url`` (``open_outbox``): a libpq URL or ``key=value`` DSN whose query
        may carry ``schema``, ``table_prefix``, ``max_size``, ``connect_timeout`` and
        ``acquire_timeout``, taken out before libpq sees it (the names the ledger's URL uses);
        keywords win. The store opens its own pool on first use: close it."""
        dsn, found = take_options(url, _URL_OPTIONS, what="PostgreSQL outbox")
        return cls(dsn, **{**found, **options})

    def __init__(
        self,
        source: PostgresLedger | str,
        *,
        schema: str | None = None,
        table_prefix: str | None = None,
        clock: Clock | None = None,
        limits: Limits = DEFAULT_LIMITS,
        max_size: int = 4,
        connect_timeout: float = 5.0,
        acquire_timeout: float = 10.0,
    ) -> None:
        self._ledger: PostgresLedger | None = None
        self._dsn: str | None = None
        if isinstance(source, PostgresLedger):
            if schema not in (None, source.schema) or table_prefix not in (
                None,
                source.table_prefix,
            ):
                raise ConfigurationError(
                    "a PostgresOutboxStore built from a ledger lives in the ledger's schema and "
                    "table prefix; drop schema=/table_prefix= or build it from a DSN"
                )
            self._ledger = source
            schema, table_prefix = source.schema, source.table_prefix
            self._redacted = source.dsn  # already redacted by the ledger
            self._secret_words: list[str] = []  # the ledger scrubs its own errors
        elif isinstance(source, str) and source:
            self._dsn = source
            self._redacted = redact(source)
            self._secret_words = secrets_of(source)
            schema = "replaysafe" if schema is None else schema
            table_prefix = "rs_" if table_prefix is None else table_prefix
        else:
            raise ConfigurationError(
                "PostgresOutboxStore needs a PostgresLedger or a PostgreSQL DSN, got "
                f"{type(source).__name__}"
            )
        if not isinstance(schema, str) or not SCHEMA_PATTERN.fullmatch(schema):
            raise ConfigurationError(
                f"schema {schema!r} is not valid; use 1-63 characters of lower-case letters, "
                "digits and underscores, starting with a letter or underscore"
            )
        if not isinstance(table_prefix, str) or not PREFIX_PATTERN.fullmatch(table_prefix):
            raise ConfigurationError(
                f"table_prefix {table_prefix!r} is not valid; use 1-40 characters of lower-case "
                "letters, digits and underscores, starting with a letter or underscore"
            )
        if max_size < 1 or not connect_timeout > 0 or not acquire_timeout > 0:
            raise ConfigurationError(
                "max_size must be >= 1 and connect_timeout/acquire_timeout > 0 seconds"
            )
        self._schema = schema
        self._prefix = table_prefix
        self._table = f"{table_prefix}outbox"
        self._now: Callable[[], float] = (
            clock.now
            if clock is not None
            else (self._ledger.now if self._ledger is not None else SYSTEM_CLOCK.now)
        )
        self.limits = limits
        self._max_size = max_size
        self._connect_timeout = float(connect_timeout)
        self._acquire_timeout = float(acquire_timeout)
        self._pool: AsyncConnectionPool[Any] | None = None
        self._closed = False
        # advisory lock keys: one class per outbox table, so schemas never serialise each other
        self._lock_class = int32(f"replaysafe-outbox:{schema}:{table_prefix}")
        self._migrate_class = int32(f"replaysafe-outbox-migrate:{schema}:{table_prefix}")

    @property
    def schema(self) -> str:
        return self._schema

    @property
    def table(self) -> str:
        """Qualified table name, for display."""
        return f"{self._schema}.{self._table}"

    def now(self) -> float:
        return self._now()

    def __repr__(self) -> str:
        return f"PostgresOutboxStore({self._redacted!r}, table={self.table!r})"

    # ------------------------------------------------------------------ SQL

    def _t(self) -> Composable:
        return table_ident(self._schema, self._table)

    def _cols(self, names: Sequence[str], alias: str | None = None) -> Composable:
        return column_list(names, alias)

    # ------------------------------------------------------------------ connections

    async def _open_pool(self) -> AsyncConnectionPool[Any]:
        if self._closed:
            raise LedgerUnavailable(f"{self!r} is closed; create a new store to use it again")
        if self._pool is not None:
            return self._pool
        psycopg, psycopg_pool = driver()
        assert self._dsn is not None
        pool: AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
            self._dsn,
            min_size=1,
            max_size=self._max_size,
            kwargs={
                "autocommit": True,
                "connect_timeout": max(2, math.ceil(self._connect_timeout)),
            },
            timeout=self._acquire_timeout,
            name=f"replaysafe-outbox-{self._schema}",
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=self._connect_timeout)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            problem = f"{type(exc).__name__}: {self._scrub(str(exc))}"
            await pool.close(timeout=1.0)
            # not chained: the driver's text may echo the connection string
            raise LedgerUnavailable(
                f"could not connect to PostgreSQL at {self._redacted} within "
                f"{self._connect_timeout:g}s ({problem}); check that the server is up, reachable "
                "and accepts this user, then retry"
            ) from None
        if self._pool is not None:  # another task opened one meanwhile
            await pool.close(timeout=1.0)
            return self._pool
        self._pool = pool
        return pool

    @asynccontextmanager
    async def _tx(self, what: str) -> AsyncIterator[AsyncConnection[Any]]:
        """One transaction: the ledger's ``transaction()``, or BEGIN … COMMIT on a pooled
        connection of our own (rolled back on any exception)."""
        if self._closed:
            raise LedgerUnavailable(f"{self!r} is closed; create a new store to use it again")
        if self._ledger is not None:
            async with self._ledger.transaction() as tx:
                yield tx.connection
            return
        psycopg, psycopg_pool = driver()

        pool = await self._open_pool()
        try:
            conn = await pool.getconn(timeout=self._acquire_timeout)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise self._error(what, exc) from None
        try:
            try:
                await conn.execute("BEGIN")
            except psycopg.Error as exc:
                raise self._error(what, exc) from None
            try:
                yield conn
            except BaseException:
                # a broken connection has nothing left to roll back; the pool drops it
                with contextlib.suppress(psycopg.Error):
                    await conn.execute("ROLLBACK")
                raise
            try:
                await conn.execute("COMMIT")
            except psycopg.Error as exc:
                raise self._error(what, exc, "the commit's outcome is unknown; retry") from None
        finally:
            await pool.putconn(conn)

    async def _one(self, what: str, query: Composed, params: Sequence[Any] = ()) -> Any:
        """Run one statement in its own transaction; rows for a query, else the row count."""
        psycopg = psycopg_module()
        try:
            async with self._tx(what) as conn:
                cur = await conn.execute(query, params)
                if cur.description is None:
                    return cur.rowcount
                return await cur.fetchall()
        except psycopg.Error as exc:
            raise self._error(what, exc) from None

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secret_words)

    def _error(self, what: str, exc: BaseException, hint: str | None = None) -> ReplaysafeError:
        return outbox_error(what, exc, self.table, self._redacted, self._scrub, hint)

    # ------------------------------------------------------------------ schema

    async def migrate(self) -> None:
        """Create the schema, table and indexes if missing; idempotent and safe to run
        concurrently (one transaction under an advisory lock)."""
        statements = migration_statements(self._schema, self._table)
        psycopg = psycopg_module()
        try:
            async with self._tx("migrate") as conn:
                await conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (self._migrate_class,))
                for statement in statements:
                    await conn.execute(statement)
        except psycopg.Error as exc:
            raise self._error("migrate", exc) from None

    # ------------------------------------------------------------------ staging

    async def stage(
        self, tx: Transaction | Any, destination: str, envelopes: Sequence[Envelope]
    ) -> None:
        """Insert pending rows inside ``tx``: a ``PostgresTransaction`` (``ledger.transaction()``)
        or a psycopg ``AsyncConnection`` with a transaction open (``conn.transaction()``, or a
        non-autocommit connection: the rows then commit with the caller's ``commit()``).

        Takes the per-key advisory locks first (they are held until ``tx`` ends, so keep the
        transaction short); errors of these statements abort ``tx``: let them leave the block.
        """
        psycopg = psycopg_module()
        if isinstance(tx, PostgresTransaction):
            conn = tx.connection
        elif isinstance(tx, psycopg.AsyncConnection):
            conn = tx
            if (
                conn.autocommit
                and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            ):
                raise ConfigurationError(
                    "stage() got an autocommit connection outside a transaction: the rows would "
                    "commit on their own; stage inside `async with conn.transaction():`"
                )
        else:
            raise ConfigurationError(
                "stage() needs the caller's open transaction on this database: a "
                "PostgresTransaction from ledger.transaction() or a psycopg AsyncConnection, got "
                f"{type(tx).__name__}"
            )
        rows = prepare_rows(destination, envelopes, self.now(), self.limits)
        if not rows:
            return
        from psycopg import sql

        locks = sorted({int32(f"{r.destination}\x00{r.key}") for r in rows if r.key is not None})
        insert = sql.SQL("INSERT INTO {} ({}) VALUES ").format(
            self._t(), self._cols(INSERT_COLUMNS)
        )
        one = sql.SQL("(%s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s)")
        try:
            if locks:
                # sorted, one statement: stagers of overlapping keys lock in the same order
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, k) FROM unnest(%s::int4[]) AS k",
                    (self._lock_class, locks),
                )
            for start in range(0, len(rows), INSERT_CHUNK):
                chunk = rows[start : start + INSERT_CHUNK]
                params = [v for r in chunk for v in r.values()]
                await conn.execute(insert + sql.SQL(", ").join([one] * len(chunk)), params)
        except psycopg.Error as exc:
            raise self._error("stage", exc) from None

    # ------------------------------------------------------------------ relay side

    async def fetch_pending(self, limit: int = 100) -> list[OutboxRow]:
        from psycopg import sql

        check_limit("limit", limit)
        query = sql.SQL("SELECT {} FROM {} WHERE state = 'pending' ORDER BY id LIMIT %s").format(
            self._cols(COLUMNS), self._t()
        )
        return [decode_row(r) for r in await self._one("fetch", query, (limit,))]

    def _claim_sql(self, limit: int, skip: Skip) -> tuple[Composed, list[Any]]:
        return claim_statement(self._schema, self._table, limit, skip)

    @asynccontextmanager
    async def claim(
        self,
        limit: int,
        *,
        owner: str,
        lease: float = DEFAULT_RELAY_LEASE,
        skip: Skip = NO_SKIP,
    ) -> AsyncIterator[ClaimedBatch]:
        """Lock up to ``limit`` pending rows (``FOR UPDATE SKIP LOCKED``) in a transaction that
        lasts as long as the ``async with`` block; marks commit at its end, and any exception
        (a crash included) rolls back and leaves the rows pending. ``owner`` and ``lease`` are
        not needed here: row locks keep relays apart."""
        check_limit("limit", limit)
        query, params = self._claim_sql(limit, skip)
        psycopg = psycopg_module()
        async with self._tx("claim") as conn:
            try:
                cur = await conn.execute(query, params)
                rows = [decode_row(r) for r in await cur.fetchall()]
            except psycopg.Error as exc:
                raise self._error("claim", exc) from None
            yield _Batch(self, conn, rows)

    async def _mark(self, conn: AsyncConnection[Any], row_ids: Sequence[int]) -> int:
        from psycopg import sql

        psycopg = psycopg_module()
        query = sql.SQL(
            "UPDATE {} SET state = 'published', published_at_broker = %s "
            "WHERE id = ANY(%s::bigint[]) AND state = 'pending'"
        ).format(self._t())
        try:
            cur = await conn.execute(query, (self.now(), [int(i) for i in row_ids]))
        except psycopg.Error as exc:
            raise self._error("mark_published", exc) from None
        return cur.rowcount

    async def mark_published(self, row_ids: Sequence[int]) -> int:
        if not row_ids:
            return 0
        psycopg = psycopg_module()
        try:
            async with self._tx("mark_published") as conn:
                return await self._mark(conn, row_ids)
        except psycopg.Error as exc:
            raise self._error("mark_published", exc) from None

    async def pending_count(self) -> int:
        from psycopg import sql

        query = sql.SQL("SELECT count(*) FROM {} WHERE state = 'pending'").format(self._t())
        ((n,),) = await self._one("pending_count", query)
        return int(n)

    async def oldest_pending_age(self) -> float | None:
        from psycopg import sql

        query = sql.SQL(
            "SELECT staged_at FROM {} WHERE state = 'pending' ORDER BY id LIMIT 1"
        ).format(self._t())
        rows = await self._one("oldest_pending_age", query)
        return None if not rows else max(0.0, self.now() - float(rows[0][0]))

    async def cleanup(self, published_before: float, limit: int = 1000) -> int:
        from psycopg import sql

        check_limit("limit", limit)
        # SKIP LOCKED: two relays cleaning at once split the work instead of waiting
        query = sql.SQL(
            """DELETE FROM {t} WHERE id IN (
                   SELECT id FROM {t}
                   WHERE state = 'published' AND published_at_broker < %s
                   ORDER BY published_at_broker
                   LIMIT %s
                   FOR UPDATE SKIP LOCKED
               )"""
        ).format(t=self._t())
        return int(await self._one("cleanup", query, (published_before, limit)))

    async def close(self) -> None:
        """Close the store's own pool (never the ledger's). Idempotent."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=5.0)


__all__ = ["PostgresOutboxStore"]
