"""The SQLite ledger: one class playing every ledger role, composed from the role mixins
(:mod:`.claims`, :mod:`.quarantine`, :mod:`.controls`, :mod:`.admin`) over their shared state
(:mod:`.base`), plus what is its own: the caller's transactions (business rows and the ledger row
commit together), the hooks the co-located outbox uses, and the lifecycle. The design is in
:mod:`replaysafe.stores.sqlite`."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

from replaysafe._url import take_options
from replaysafe.errors import ConfigurationError, LedgerError
from replaysafe.ledger.base import Claim, Transaction, TransactionalLedger
from replaysafe.stores.sqlite.admin import SQLiteAdmin
from replaysafe.stores.sqlite.claims import SQLiteClaims
from replaysafe.stores.sqlite.connection import SQLiteResult
from replaysafe.stores.sqlite.controls import SQLiteControls
from replaysafe.stores.sqlite.quarantine import SQLiteQuarantine

T = TypeVar("T")


def _noop() -> None:
    return None


class SQLiteTransaction(Transaction):
    """An open ``BEGIN IMMEDIATE`` transaction on the ledger's connection.

    Valid only inside its ``async with ledger.transaction()`` block. Errors of the caller's own
    SQL propagate unchanged (``sqlite3.IntegrityError`` …) so a handler can react to them; the
    block then rolls back when the exception leaves it.
    """

    def __init__(self, ledger: SQLiteLedger, generation: int) -> None:
        self._ledger = ledger
        self._generation = generation
        self._open = True

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> SQLiteResult:
        self._check_open()
        core = self._ledger._core
        return await self._ledger._run(partial(core.tx_execute, self._generation, sql, params))

    async def fetchall(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[tuple[Any, ...]]:
        return (await self.execute(sql, params)).rows

    def _check_open(self) -> None:
        if not self._open:
            raise LedgerError(
                "this transaction is finished (committed or rolled back); open a new one with "
                "`async with ledger.transaction() as tx`"
            )

    def __repr__(self) -> str:
        return f"SQLiteTransaction({self._ledger.path!r}, open={self._open})"


#: the query parameters of ``sqlite:PATH?…``, as the constructor takes them
_URL_OPTIONS = {"synchronous": str, "busy_timeout": float}


class SQLiteLedger(
    SQLiteClaims, SQLiteQuarantine, SQLiteControls, SQLiteAdmin, TransactionalLedger
):
    """The replay ledger in a SQLite file (WAL). See :mod:`replaysafe.stores.sqlite` for the design.

    While a :meth:`transaction` is open, every other call on this ledger object waits for it (the
    connection and SQLite's single write lock belong to that transaction), and other processes'
    writes wait up to ``busy_timeout``. Keep transactions short: the business rows and
    :meth:`complete_in`, not network calls. Calling this ledger's other methods from *inside* its
    own transaction, in the same task, raises ``ConfigurationError`` instead of deadlocking.
    """

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteLedger:
        """The ledger ``sqlite:PATH`` names (``open_ledger``): the file at PATH, created on first
        use. ``?synchronous=FULL|NORMAL|…&busy_timeout=SECONDS`` in the URL or as keywords
        (keywords win; ``clock`` only as a keyword). An unknown parameter is refused."""
        if not url.startswith("sqlite:"):
            raise ConfigurationError(
                f"{url!r} is not a SQLite ledger URL; write sqlite:PATH (the ledger file's path)"
            )
        rest, found = take_options(url, _URL_OPTIONS, what="SQLite ledger")
        path, query, unknown = rest.removeprefix("sqlite:").partition("?")
        if query or not path:
            raise ConfigurationError(
                f"SQLite ledger URL {url!r}: "
                + (f"unknown parameter(s) {unknown!r}; known: {', '.join(_URL_OPTIONS)}"
                   if query else "sqlite:PATH needs the path of the ledger file")
            )  # fmt: skip
        return cls(path, **{**found, **options})

    # ------------------------------------------------------------------ transactions

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SQLiteTransaction]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` on normal exit, ``ROLLBACK`` on any exception
        (cancellation included). Holds the ledger's lock for its whole life (see the class
        docstring). If the final commit fails, ``LedgerUnavailable`` is raised and nothing the
        block did may be assumed durable."""
        self._guard_reentry("transaction")
        async with self._lock:
            self._check_open()
            try:
                generation = await self._run(self._core.begin)
            except BaseException:
                # cancelled while BEGIN may already have run: never leave it open on the connection
                await asyncio.shield(self._submit(partial(self._core.rollback, None)))
                raise
            tx = SQLiteTransaction(self, generation)
            self._tx_task = asyncio.current_task()
            try:
                yield tx
            except BaseException as exc:
                tx._open = False
                # shielded: a cancellation arriving now must not skip the rollback
                problem = await asyncio.shield(
                    self._submit(partial(self._core.rollback, generation))
                )
                if problem is not None:
                    exc.add_note(problem)
                raise
            else:
                tx._open = False
                await asyncio.shield(self._submit(partial(self._core.commit, generation)))
            finally:
                tx._open = False
                self._tx_task = None

    async def complete_in(self, tx: Transaction, claim: Claim, result: str | None = None) -> None:
        """Fence and mark the claim completed inside ``tx``; it commits with the business rows.
        Raises ``LeaseLost`` when the token is stale: let it leave the block so it rolls back."""
        if not isinstance(tx, SQLiteTransaction) or tx._ledger is not self:
            raise ConfigurationError(
                "complete_in() needs a transaction opened by this ledger's transaction(); a "
                "transaction of another database cannot commit this ledger's row"
            )
        tx._check_open()
        fn = partial(self._core.complete_rows, claim, result)
        await self._run(partial(self._core.in_tx, tx._generation, fn, True))

    # ------------------------------------------------------------------ hooks for co-located stores

    async def run_job(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        """Internal hook for stores that live in this ledger's file (the outbox): run ``fn(conn)``
        on the connection thread under this ledger's lock, inside ``BEGIN IMMEDIATE`` … ``COMMIT``
        when ``write`` (rolled back if ``fn`` raises). ``sqlite3`` errors become
        ``LedgerUnavailable``. ``fn`` runs on another thread: it must touch only ``conn``."""
        return await (self._write(fn) if write else self._read(fn))

    def owns(self, tx: Transaction) -> bool:
        """Internal hook: True when ``tx`` was opened by this ledger's :meth:`transaction`."""
        return isinstance(tx, SQLiteTransaction) and tx._ledger is self

    # ------------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Close the connection after any running call or open transaction. Idempotent."""
        if self._closed:
            return
        self._guard_reentry("close")
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                await self._run(self._close_job)
            finally:
                self._executor.shutdown(wait=False)

    @asynccontextmanager
    async def idle(self) -> AsyncIterator[None]:
        """Hold the ledger idle: inside the block no statement or transaction of *this* ledger
        object runs, and every job queued before it has finished, so this process holds no SQLite
        lock on the file. Other calls wait until the block exits.

        For fault injection: a process stopped (``SIGSTOP``) inside the block stalls only itself.
        Stopped while one of its transactions holds the write lock, it would stall every process
        sharing the file until it resumes — a real hazard of a shared SQLite ledger (see
        docs/ledger-sqlite.md), but not the fault a stalled-holder test means to inject."""
        self._guard_reentry("idle")
        async with self._lock:
            self._check_open()
            # a rollback queued by a cancelled caller may still run: wait for the thread to drain
            await self._run(_noop)
            yield
