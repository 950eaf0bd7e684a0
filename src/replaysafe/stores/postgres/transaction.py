"""Transactions of the PostgreSQL ledger: business rows and the ledger row commit together
(:class:`~replaysafe.ledger.base.TransactionalLedger`'s ``transaction`` and ``complete_in``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from replaysafe.errors import ConfigurationError, LedgerError
from replaysafe.ledger.base import Claim, Transaction
from replaysafe.stores.postgres.core import PostgresCore
from replaysafe.stores.postgres.driver import driver, pool_timeout
from replaysafe.stores.postgres.errors import COMMIT_HINT
from replaysafe.stores.postgres.steps import complete_in_steps, drive_on

if TYPE_CHECKING:  # the driver is an optional extra: imported lazily at run time
    from psycopg import AsyncConnection, AsyncCursor


class PostgresTransaction(Transaction):
    """An open transaction on one pooled connection, handed to a transactional handler.

    Valid only inside its ``async with ledger.transaction()`` block. Statements use psycopg's
    placeholders (``%s`` or ``%(name)s``). Errors of the caller's own SQL propagate unchanged
    (``psycopg.errors.UniqueViolation`` …) so a handler can react to them (a dead connection is
    ``LedgerUnavailable``, as everywhere in the ledger); the block then rolls
    back when the exception leaves it. After such an error PostgreSQL refuses further statements in
    the same transaction until it is rolled back: let the exception leave the block.
    """

    def __init__(self, ledger: PostgresCore, conn: AsyncConnection[Any]) -> None:
        self._ledger = ledger
        self._conn = conn
        self._open = True

    @property
    def connection(self) -> AsyncConnection[Any]:
        """The psycopg connection (for cursors, COPY …). Do not commit or roll back on it."""
        self._check_open()
        return self._conn

    async def execute(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> AsyncCursor[Any]:
        """Run one statement; returns the psycopg cursor (``rowcount``, ``fetchall()`` …).

        The caller's own SQL errors propagate unchanged; a connection that died under the
        statement (server restart, ``pg_terminate_backend``, network) raises
        ``LedgerUnavailable``: the transaction is gone, nothing of it committed."""
        self._check_open()
        psycopg, _ = driver()
        try:
            return await self._conn.execute(sql, params or None)
        except psycopg.Error as exc:
            if self._conn.broken or self._conn.closed:
                raise self._ledger._unavailable("transaction statement", exc) from exc
            raise

    async def fetchall(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[tuple[Any, ...]]:
        cur = await self.execute(sql, params)
        if cur.description is None:
            return []
        return [tuple(r) for r in await cur.fetchall()]

    def _check_open(self) -> None:
        if not self._open:
            raise LedgerError(
                "this transaction is finished (committed or rolled back); open a new one with "
                "`async with ledger.transaction() as tx`"
            )

    def __repr__(self) -> str:
        return f"PostgresTransaction({self._ledger!r}, open={self._open})"


class PostgresTransactions(PostgresCore):
    """``transaction()`` and ``complete_in()``."""

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTransaction]:
        """``BEGIN`` … ``COMMIT`` on one pooled connection; ``ROLLBACK`` on any exception
        (cancellation included). Several transactions may be open at once, each on its own
        connection, up to ``max_size``.

        If the commit fails (the connection died while committing), ``LedgerUnavailable`` is
        raised and the outcome is unknown: the transaction may or may not have committed. With
        ``complete_in`` inside, the next claim resolves it (``AlreadyDone`` if it committed).
        Inside the block, use ``tx`` and ``complete_in(tx, …)``; this ledger's other write calls
        from the same task are refused (they would wait on the transaction's own row locks).
        """
        self._guard("transaction")
        pool = await self._ensure_ready()
        psycopg, _ = driver()
        try:
            conn = await pool.getconn(timeout=self._acquire_timeout)
        except pool_timeout() as exc:
            raise self._pool_exhausted() from exc
        except psycopg.Error as exc:
            raise self._unavailable("transaction", exc) from exc
        task = asyncio.current_task()
        tx = PostgresTransaction(self, conn)
        try:
            try:
                await conn.execute("BEGIN")
            except psycopg.Error as exc:
                raise self._unavailable("transaction", exc) from exc
            if task is not None:
                self._tx_tasks.add(task)
            try:
                yield tx
            except BaseException as exc:
                tx._open = False
                # shielded: a second cancellation must not skip the rollback
                problem = await asyncio.shield(self._rollback(conn))
                if problem is not None:
                    exc.add_note(problem)
                raise
            tx._open = False
            try:
                await conn.execute("COMMIT")
            except psycopg.Error as exc:
                # a deferred constraint of the block's own rows fails here: data, rolled back
                raise self._error("commit", exc, COMMIT_HINT) from exc
        finally:
            tx._open = False
            if task is not None:
                self._tx_tasks.discard(task)
            # the pool rolls back anything left open and discards a broken connection
            await pool.putconn(conn)
            if conn.broken:
                await self._flush_dead_connections(pool)

    async def complete_in(self, tx: Transaction, claim: Claim, result: str | None = None) -> None:
        """Fence and mark the claim completed inside ``tx``; it commits with the business rows.
        Raises ``LeaseLost`` when the token is stale: let it leave the block so it rolls back."""
        if not isinstance(tx, PostgresTransaction) or tx._ledger is not self:
            raise ConfigurationError(
                "complete_in() needs a transaction opened by this ledger's transaction(); a "
                "transaction of another database cannot commit this ledger's row"
            )
        tx._check_open()
        psycopg, _ = driver()
        try:
            lost = await drive_on(tx._conn, complete_in_steps(self._s, claim, result))
        except (psycopg.Error, UnicodeEncodeError) as exc:
            raise self._error("complete_in", exc) from exc
        if lost is not None:
            raise lost
