"""The MySQL / MariaDB ledger: every role (``claims.py``, ``quarantine.py``, ``controls.py``,
``admin.py``) on one pool, plus the transactional boundary (:meth:`MySQLLedger.transaction`,
:meth:`MySQLLedger.complete_in`): business rows, the ledger row and outbox rows commit together.

What a caller can lose or see twice: a call whose connection died mid-call (server restart,
``KILL``, network cut, failover) raises ``LedgerUnavailable`` and *may or may not have
committed*. That is never unsafe: an unknown claim is answered ``InFlight`` until its lease
expires and is then taken over with ``recovered=True``; an unknown completion is found by the
next claim as ``AlreadyDone``. After such an error the caller must not complete at the broker,
exactly as after ``LeaseLost``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Self

from replaysafe.errors import ConfigurationError, LedgerError
from replaysafe.ledger.base import Claim, Transaction, TransactionalLedger
from replaysafe.stores.mysql import errors as err
from replaysafe.stores.mysql.admin import AdminMixin
from replaysafe.stores.mysql.claims import ClaimsMixin
from replaysafe.stores.mysql.connection import MySQLConfig, driver
from replaysafe.stores.mysql.controls import ControlsMixin
from replaysafe.stores.mysql.core import COMMIT_HINT
from replaysafe.stores.mysql.quarantine import QuarantineMixin

if TYPE_CHECKING:
    from asyncmy.connection import Connection
    from asyncmy.cursors import Cursor


class MySQLTransaction(Transaction):
    """An open transaction on one pooled connection, handed to a transactional handler as
    ``ctx.tx``. Valid only inside its ``async with ledger.transaction()`` block. Statements use
    the driver's ``%s`` placeholders. The caller's own SQL errors propagate unchanged (asyncmy's
    ``IntegrityError`` …) so a handler can react to them; a connection that died under a
    statement is ``LedgerUnavailable`` (nothing of the transaction committed). MySQL commits
    implicitly before and after DDL (``CREATE TABLE`` …): keep DDL out of business
    transactions."""

    def __init__(self, ledger: MySQLLedger, conn: Connection) -> None:
        self._ledger = ledger
        self._conn = conn
        self._open = True

    @property
    def connection(self) -> Connection:
        """The asyncmy connection. Do not commit or roll back on it."""
        self._check_open()
        return self._conn

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Cursor:
        """Run one statement; returns the (closed-over, fully read) asyncmy cursor:
        ``rowcount``, ``lastrowid``, ``fetchall()``."""
        self._check_open()
        cur = self._conn.cursor()
        try:
            await cur.execute(sql, params or None)
        except BaseException as exc:
            if err.is_connection_loss(exc):
                raise err.map_error(self._ledger.config, "transaction statement", exc) from None
            raise
        return cur

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
        return f"MySQLTransaction({self._ledger!r}, open={self._open})"


class MySQLLedger(ClaimsMixin, QuarantineMixin, ControlsMixin, AdminMixin, TransactionalLedger):
    """The replay ledger in MySQL 8 / MariaDB 10.6+ (InnoDB). See ``docs/ledger-mysql.md``.

    Build it from a :class:`MySQLConfig` (``MySQLLedger(config)``), from its keywords
    (``MySQLLedger(host=…, database=…, table_prefix=…)``) or from a URL
    (``MySQLLedger.from_url("mysql://user:pass@host:3306/db?table_prefix=rs_")``). Create the
    tables once with :meth:`migrate` (or ``auto_migrate=True``); without them the first call
    raises ``ConfigurationError`` naming what to run. The pool opens on first use, or
    explicitly with :meth:`open` / ``async with``.
    """

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MySQLLedger:
        """The ledger at ``url`` (``mysql://`` or ``mariadb://``; see
        :meth:`MySQLConfig.from_url`); ``options`` win over the URL."""
        return cls(MySQLConfig.from_url(url, **options))

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[MySQLTransaction]:
        """``BEGIN`` … ``COMMIT`` on one pooled connection; ``ROLLBACK`` on any exception
        (cancellation included: the connection is then closed, which rolls back on the server).
        Several transactions may be open at once, each on its own connection, up to
        ``max_size``. READ COMMITTED, like every connection of this store.

        If the commit fails (the connection died while committing), ``LedgerUnavailable`` is
        raised and the outcome is unknown; with ``complete_in`` inside, the next claim resolves
        it (``AlreadyDone`` if it committed). Inside the block use ``tx`` and
        ``complete_in(tx, …)``; this ledger's other write calls from the same task are refused
        (they would wait on the transaction's own row locks)."""
        self._guard("transaction")
        pool = await self._ensure_ready()
        asyncmy = driver()
        conn = await pool.acquire()
        broken = False
        task = asyncio.current_task()
        tx = MySQLTransaction(self, conn)
        try:
            try:
                await conn.begin()
            except asyncmy.errors.MySQLError as exc:
                broken = True
                raise err.map_error(self.config, "transaction", exc) from None
            if task is not None:
                self._tx_tasks.add(task)
            try:
                yield tx
            except BaseException as exc:
                tx._open = False
                broken = await self._rollback(conn, exc)
                raise
            tx._open = False
            try:
                await conn.commit()
            except (asyncmy.errors.MySQLError, OSError) as exc:
                broken = True
                raise err.map_error(self.config, "commit", exc, COMMIT_HINT) from None
        finally:
            tx._open = False
            if task is not None:
                self._tx_tasks.discard(task)
            pool.release(conn, broken=broken)

    async def complete_in(self, tx: Transaction, claim: Claim, result: str | None = None) -> None:
        """Fence and mark the claim completed inside ``tx``; it commits with the business rows.
        Raises ``LeaseLost`` when the token is stale: let it leave the block so it rolls back."""
        if not isinstance(tx, MySQLTransaction) or tx._ledger is not self:
            raise ConfigurationError(
                "complete_in() needs a transaction opened by this ledger's transaction(); a "
                "transaction of another database cannot commit this ledger's row"
            )
        tx._check_open()
        try:
            await self._complete_on(tx._conn, claim, result)
        except BaseException as exc:
            if err.is_driver_error(exc) or isinstance(exc, UnicodeEncodeError | OSError):
                raise err.map_error(self.config, "complete_in", exc) from None
            raise


__all__ = ["MySQLLedger", "MySQLTransaction"]
