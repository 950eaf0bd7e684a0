"""PROTOTYPE: a synchronous SQLite ledger for sync callers (issue 14's sync guard path).

Measured by ``bench/guard.py`` (path ``native``). Not public API yet: only ``claim``,
``claim_many``, ``extend``, ``complete``, ``complete_many`` and ``release``.

It shares everything but the thread hop with :class:`~replaysafe.ledger.sqlite.SQLiteLedger`: it
owns a private ``SQLiteLedger`` whose async API it never calls, and runs that ledger's own
connection-side code (``_job`` around ``_claim_rows``, ``_extend_rows``, ``_complete_rows``,
``_complete_many_rows``, ``_release_rows``) directly in the calling thread. So the SQL text, the
``BEGIN IMMEDIATE`` … ``COMMIT`` pattern, the state machine (``decide_claim`` / ``check_fence``),
the connection setup (WAL, ``synchronous``, schema creation and upgrade) and the error mapping to
``LedgerUnavailable`` / ``LedgerDataError`` exist once, in ``sqlite.py``.

Threads: one connection, used by one caller at a time under a ``threading.Lock`` (SQLite has one
writer per file anyway; the lock is held through the commit's fsync exactly as SQLite's own write
lock is). Other processes, and an async ``SQLiteLedger`` on the same file in this process, are
ordinary other connections: ``BEGIN IMMEDIATE`` and ``busy_timeout`` serialise them.

Before this becomes public, the connection-thread half of ``SQLiteLedger`` (connection, ``_job``,
the ``*_rows`` methods, error mapping) should move into a small class both ledgers hold, instead of
this one reaching into another class's private methods.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Self, TypeVar

from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.errors import LeaseLost, LedgerUnavailable
from replaysafe.ledger.base import Claim, ClaimOutcome, ClaimRequest, OpKey, Record
from replaysafe.ledger.sqlite import SQLiteLedger

T = TypeVar("T")


class SyncSQLiteLedger:
    """The SQLite ledger's claim/extend/complete/release for plain (non-async) code.

    Same options, same file format and the same guarantees as ``SQLiteLedger`` (see its module
    docstring): every call is one ``BEGIN IMMEDIATE`` transaction, fsynced when it returns (with
    the default ``synchronous="FULL"``); a stale token raises ``LeaseLost`` and changes nothing;
    a disk or lock error raises ``LedgerUnavailable`` and the call may or may not have committed
    (then do not complete at the broker). Safe to call from many threads (one call at a time).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock = SYSTEM_CLOCK,
        synchronous: str = "FULL",
        busy_timeout: float = 30.0,
    ) -> None:
        # validates the options exactly as the async ledger does; its executor thread is never
        # started (a ThreadPoolExecutor starts threads on first submit, and nothing submits)
        self._core = SQLiteLedger(
            path, clock=clock, synchronous=synchronous, busy_timeout=busy_timeout
        )
        self._lock = threading.Lock()
        self._closed = False

    @property
    def path(self) -> str:
        return self._core.path

    def now(self) -> float:
        """The ledger's clock (what leases are judged by)."""
        return self._core.now()

    def __repr__(self) -> str:
        return "Sync" + repr(self._core)

    def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        """Try to take the operation for ``lease`` seconds; as :meth:`SQLiteLedger.claim`."""
        request = ClaimRequest(key, fingerprint, owner, lease)
        return self._write(partial(self._core._claim_rows, [request]))[0]

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        """Claim a batch in one transaction (one fsync); as :meth:`SQLiteLedger.claim_many`."""
        if not requests:
            return []
        return self._write(partial(self._core._claim_rows, list(requests)))

    def extend(self, claim: Claim, lease: float) -> Claim:
        """Push the lease to ``now + lease``. Raises ``LeaseLost`` when the token is stale."""
        return self._write(partial(self._core._extend_rows, claim, lease))

    def complete(self, claim: Claim, result: str | None = None) -> Record:
        """Record the effect as done. Raises ``LeaseLost`` when the token is stale: then the
        caller must not complete at the broker."""
        return self._write(partial(self._core._complete_rows, claim, result))

    def complete_many(self, items: Sequence[tuple[Claim, str | None]]) -> list[Record | LeaseLost]:
        """Complete a batch in one transaction (one fsync); a stale claim yields its
        ``LeaseLost`` in place and does not stop the others."""
        if not items:
            return []
        return self._write(partial(self._core._complete_many_rows, list(items)))

    def release(self, claim: Claim, error: str | None = None) -> None:
        """Give the operation back (no effect happened): the next claim gets it at once. Raises
        ``LeaseLost`` when the token is stale."""
        self._write(partial(self._core._release_rows, claim, error))

    def close(self) -> None:
        """Close the connection (after a call running in another thread). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._core._closed = True  # its async API must not reopen the connection either
            self._core._drop_connection()
            self._core._executor.shutdown(wait=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._closed:
                raise LedgerUnavailable(
                    f"{self!r} is closed; open a new SyncSQLiteLedger on {self.path!r} to use it "
                    "again"
                )
            return self._core._job(fn, True)
