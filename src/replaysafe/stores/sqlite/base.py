"""What every role of :class:`~replaysafe.stores.sqlite.ledger.SQLiteLedger` shares: the core
(connection, statements, clock), the one connection thread and the lock that serialises use of
it. The role mixins (:mod:`.claims`, :mod:`.quarantine`, :mod:`.controls`, :mod:`.admin`) run
their jobs through :meth:`SQLiteLedgerBase._write` / :meth:`SQLiteLedgerBase._read`."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.errors import ConfigurationError, LedgerUnavailable
from replaysafe.stores.sqlite.core import SQLiteCore

T = TypeVar("T")


class SQLiteLedgerBase:
    """The async SQLite ledger's shared state and its event-loop side: jobs are queued on a
    single-worker executor (the connection's one thread) under an ``asyncio.Lock``. Not a ledger by
    itself: :class:`~replaysafe.stores.sqlite.ledger.SQLiteLedger` composes it with the roles."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock = SYSTEM_CLOCK,
        synchronous: str = "FULL",
        busy_timeout: float = 30.0,
    ) -> None:
        # the options (validated there), the connection and every statement: shared with the
        # sync twin (see SQLiteCore); touched only on the executor thread, under self._lock
        self._core = SQLiteCore(
            path, clock=clock, synchronous=synchronous, busy_timeout=busy_timeout
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replaysafe-sqlite")
        # Touched only on the event loop.
        self._lock = asyncio.Lock()
        self._tx_task: asyncio.Task[Any] | None = None
        self._closed = False

    @property
    def path(self) -> str:
        return self._core.path

    def now(self) -> float:
        return self._core.clock.now()

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return f"SQLiteLedger({self.path!r}, synchronous={self._core.synchronous!r}{state})"

    # ------------------------------------------------------------------ event-loop side

    async def _run(self, job: Callable[[], T]) -> T:
        """Run ``job`` on the connection thread. The caller holds ``self._lock``."""
        return await self._submit(job)

    def _submit(self, job: Callable[[], T]) -> asyncio.Future[T]:
        """Queue ``job`` now, before any ``await``: the executor runs jobs in submission order, so
        a rollback queued here always runs before the job of whoever takes the lock next, even
        when the caller is cancelled while waiting for it."""
        return asyncio.wrap_future(self._executor.submit(job))

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._locked(partial(self._core.job, fn, True))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._locked(partial(self._core.job, fn, False))

    async def _locked(self, job: Callable[[], T]) -> T:
        self._guard_reentry("this call")
        async with self._lock:
            self._check_open()
            return await self._run(job)

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerUnavailable(
                f"{self!r} is closed; open a new SQLiteLedger on {self.path!r} to use it again"
            )

    def _guard_reentry(self, what: str) -> None:
        task = asyncio.current_task()
        if task is not None and task is self._tx_task:
            raise ConfigurationError(
                f"{what} on {self!r} from inside its own open transaction() would wait for that "
                "transaction forever; use tx.execute()/complete_in(tx, ...) inside the block, or "
                "call it after the block"
            )

    # ------------------------------------------------------------------ connection thread

    def _close_job(self) -> None:
        self._core.drop_connection()
