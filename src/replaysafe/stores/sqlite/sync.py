"""The SQLite ledger's sync twin, for plain threads: the same core (statements, state machine,
error mapping) run in the caller's thread under a ``threading.Lock`` instead of on an executor
under an ``asyncio.Lock``."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, ClassVar, Self, TypeVar

from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.errors import ConfigurationError, LeaseLost, LedgerError, LedgerUnavailable
from replaysafe.ledger.base import (
    Claim,
    ClaimOutcome,
    ClaimRequest,
    OpKey,
    QuarantineEntry,
    QuarantineRequest,
    Record,
)
from replaysafe.stores.sqlite.connection import SQLiteResult
from replaysafe.stores.sqlite.core import SQLiteCore
from replaysafe.stores.sqlite.rows import load

T = TypeVar("T")


class SyncSQLiteTransaction:
    """An open ``BEGIN IMMEDIATE`` transaction on a :class:`SyncSQLiteLedger`'s connection: the
    sync mirror of :class:`SQLiteTransaction` (the same placeholders, ``?`` or ``:name``, and the
    same :class:`SQLiteResult`, its rows fetched, so no live cursor outlives the block).

    Valid only inside its ``with ledger.transaction()`` block, and from the thread running that
    block (or one it waits for): the connection runs one statement at a time. Errors of the
    caller's own SQL propagate unchanged (``sqlite3.IntegrityError`` …) so a handler can react to
    them; the block then rolls back when the exception leaves it.
    """

    def __init__(self, ledger: SyncSQLiteLedger, generation: int) -> None:
        self._ledger = ledger
        self._generation = generation
        self._open = True

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> SQLiteResult:
        """Run one statement inside the transaction; its rows are fetched into the result."""
        self._check_open()
        return self._ledger._core.tx_execute(self._generation, sql, params)

    def fetchall(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[tuple[Any, ...]]:
        """Run a query inside the transaction and return all rows."""
        return self.execute(sql, params).rows

    def _check_open(self) -> None:
        if not self._open:
            raise LedgerError(
                "this transaction is finished (committed or rolled back); open a new one with "
                "`with ledger.transaction() as tx`"
            )

    def __repr__(self) -> str:
        return f"SyncSQLiteTransaction({self._ledger.path!r}, open={self._open})"


class SyncSQLiteLedger:
    """The SQLite ledger for plain (non-async) code: :class:`SQLiteLedger`'s claim path (a
    :class:`~replaysafe.ledger.base.SyncLedger`) run in the caller's thread.
    ``SQLiteLedger.sync()`` makes one with that ledger's options.

    Same options, file format, SQL, state machine and error mapping as ``SQLiteLedger`` (both run
    a :class:`SQLiteCore`): every call is one ``BEGIN IMMEDIATE`` transaction, fsynced when it
    returns (with the default ``synchronous="FULL"``); a stale token raises ``LeaseLost`` and
    changes nothing; refused data raises ``LedgerDataError`` (nothing written); a disk or lock
    error raises ``LedgerUnavailable`` and the call may or may not have committed (then do not
    complete at the broker).

    Transactional effects: :meth:`transaction` and :meth:`complete_in`, as on ``SQLiteLedger``
    (business rows and the ledger row commit or roll back together).

    Threads: one connection, used by one call at a time under a ``threading.Lock`` held through
    the commit's fsync (SQLite has one writer per file anyway), so it is safe from several threads
    at once (a keeper thread extending leases while the caller runs the effect). An async
    ``SQLiteLedger`` on the same file, and other processes, are ordinary other connections:
    ``BEGIN IMMEDIATE`` and ``busy_timeout`` serialise them.
    """

    #: ``transaction()`` and ``complete_in()``: the ledger row commits with the business rows
    transactional: ClassVar[bool] = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock = SYSTEM_CLOCK,
        synchronous: str = "FULL",
        busy_timeout: float = 30.0,
    ) -> None:
        self._core = SQLiteCore(
            path, clock=clock, synchronous=synchronous, busy_timeout=busy_timeout
        )
        self._lock = threading.Lock()
        self._closed = False
        # the thread inside this twin's transaction(), holding self._lock (None: none is open);
        # only ever equal to a reader's own ident when the reader is that thread, so it is read
        # without the lock
        self._tx_thread: int | None = None

    @property
    def path(self) -> str:
        return self._core.path

    def now(self) -> float:
        """The ledger's clock (what leases are judged by)."""
        return self._core.clock.now()

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return f"SyncSQLiteLedger({self.path!r}, synchronous={self._core.synchronous!r}{state})"

    def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        """Try to take the operation for ``lease`` seconds; as :meth:`SQLiteLedger.claim`."""
        request = ClaimRequest(key, fingerprint, owner, lease)
        return self._call(partial(self._core.claim_rows, [request]), True)[0]

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        """Claim a batch in one transaction (one fsync); as :meth:`SQLiteLedger.claim_many`."""
        if not requests:
            return []
        return self._call(partial(self._core.claim_rows, list(requests)), True)

    def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        """Mark a batch started in one transaction (one fsync): fenced per claim, a stale one
        yields its ``LeaseLost`` in place and writes nothing."""
        if not claims:
            return []
        return self._call(partial(self._core.mark_started_rows, list(claims)), True)

    def extend(self, claim: Claim, lease: float) -> Claim:
        """Push the lease to ``now + lease``. Raises ``LeaseLost`` when the token is stale."""
        return self._call(partial(self._core.extend_rows, claim, lease), True)

    def complete(self, claim: Claim, result: str | None = None) -> Record:
        """Record the effect as done. Raises ``LeaseLost`` when the token is stale: then the
        caller must not complete at the broker."""
        return self._call(partial(self._core.complete_rows, claim, result), True)

    def complete_many(self, items: Sequence[tuple[Claim, str | None]]) -> list[Record | LeaseLost]:
        """Complete a batch in one transaction (one fsync); a stale claim yields its
        ``LeaseLost`` in place and does not stop the others."""
        if not items:
            return []
        return self._call(partial(self._core.complete_many_rows, list(items)), True)

    def release(self, claim: Claim, error: str | None = None) -> None:
        """Give the operation back (no effect happened): the next claim gets it at once. Raises
        ``LeaseLost`` when the token is stale."""
        self._call(partial(self._core.release_rows, claim, error), True)

    def quarantine(self, request: QuarantineRequest, claim: Claim | None = None) -> QuarantineEntry:
        """Record the entry (and, with ``claim``, move the record to QUARANTINED under fencing)
        in one fsynced transaction; as :meth:`SQLiteLedger.quarantine`."""
        return self._call(partial(self._core.quarantine_rows, request, claim), True)

    def get(self, key: OpKey) -> Record | None:
        """The stored record of ``key``, or None. Reads only."""
        return self._call(partial(load, key=key), False)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SyncSQLiteTransaction]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` on normal exit, ``ROLLBACK`` on any exception
        (``KeyboardInterrupt`` included), as :meth:`SQLiteLedger.transaction`.

        Holds this twin's lock for the whole block, so every other call on the twin waits for it,
        from any thread (the keeper's lease extensions included; keep transactions short), and
        SQLite's write lock from ``BEGIN``, so other connections' writes wait up to
        ``busy_timeout``. A call on the twin from inside its own block raises
        ``ConfigurationError`` instead of waiting for itself forever. Raises ``LedgerUnavailable``
        when the write lock cannot be had within ``busy_timeout`` (nothing began) and when the
        final commit fails (then nothing the block did may be assumed durable)."""
        self._check_not_in_tx("transaction()")
        with self._lock:
            self._check_open()
            try:
                generation = self._core.begin()
            except BaseException:
                # an interrupt may land after BEGIN ran: never leave it open on the connection
                self._core.rollback(None)
                raise
            tx = SyncSQLiteTransaction(self, generation)
            self._tx_thread = threading.get_ident()
            try:
                yield tx
            except BaseException as exc:
                tx._open = False
                problem = self._core.rollback(generation)
                if problem is not None:
                    exc.add_note(problem)
                raise
            else:
                tx._open = False
                self._core.commit(generation)
            finally:
                tx._open = False
                self._tx_thread = None

    def complete_in(self, tx: object, claim: Claim, result: str | None = None) -> None:
        """Fence and mark the claim completed inside ``tx`` (opened by this twin's
        :meth:`transaction`); it commits with the business rows. Raises ``LeaseLost`` when the
        token is stale (nothing written): let it leave the block so the block rolls back."""
        if not isinstance(tx, SyncSQLiteTransaction) or tx._ledger is not self:
            raise ConfigurationError(
                "complete_in() needs a transaction opened by this ledger's transaction(); a "
                "transaction of another connection or database cannot commit this ledger's row"
            )
        tx._check_open()
        self._core.in_tx(tx._generation, partial(self._core.complete_rows, claim, result), True)

    def close(self) -> None:
        """Close the connection (after a call running in another thread). Idempotent; later
        calls raise ``LedgerUnavailable``."""
        self._check_not_in_tx("close()")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._core.drop_connection()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
        if self._tx_thread == threading.get_ident():
            self._check_not_in_tx("this call")
        with self._lock:
            self._check_open()
            return self._core.job(fn, write)

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerUnavailable(
                f"{self!r} is closed; open a new one (SQLiteLedger.sync(), or "
                f"SyncSQLiteLedger({self.path!r})) to use it again"
            )

    def _check_not_in_tx(self, what: str) -> None:
        if self._tx_thread == threading.get_ident():
            raise ConfigurationError(
                f"{what} on {self!r} from inside its own open transaction() would wait for that "
                "transaction forever; use tx.execute()/complete_in(tx, ...) inside the block, or "
                "call it after the block"
            )
