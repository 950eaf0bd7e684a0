"""Isolation of suspects: run a recovered operation alone in its worker process.

Why: the attempt counter lives in the ledger and is charged by the claim, so a poison message
that kills its process (a segfault, the OOM killer) reaches its ``max_attempts`` budget and is
quarantined. But every other operation the process held at that moment is charged too, and after
the crash they come back *together* (same visibility timeout, same uncommitted offsets), so the
same neighbours die with the poison again and again and reach the budget with it: a chaos run
quarantined 54-124 operations for 20 poison ones. An operation whose previous holder lost its lease
without finishing (``Claim.recovered``) is a suspect; running it while nothing else runs in the
process means a crash during it charges nobody else, and its neighbours (suspects too) finish one
by one instead of dying with it.

The lock is a writer-preferring readers-writer lock: ordinary executions share it, a suspect takes
it alone, and while a suspect waits no new ordinary execution starts (otherwise a busy worker would
starve it). It only orders executions inside one process; other processes are untouched, which is
right because a crash only charges the claims of the process that died.
"""

from __future__ import annotations

import asyncio


class SuspectLock:
    """Shared for ordinary executions, exclusive for suspects (see the module docstring).

    Plain acquire/release pairs (the caller releases in ``finally``), no context managers: the
    shared side then costs two integer updates when no suspect is around, once per batch."""

    __slots__ = ("_changed", "_readers", "_writer", "_writers_waiting")

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._changed: asyncio.Event | None = None

    @property
    def busy(self) -> bool:
        """True while a suspect runs or waits (ordinary executions then wait to start)."""
        return self._writer or self._writers_waiting > 0

    def _wake(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def _wait_change(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    async def shared_acquire(self) -> None:
        while self._writer or self._writers_waiting:
            await self._wait_change()
        self._readers += 1

    def shared_release(self) -> None:
        self._readers -= 1
        if self._readers == 0 and self._writers_waiting:
            self._wake()

    async def exclusive_acquire(self) -> None:
        self._writers_waiting += 1
        try:
            while self._writer or self._readers:
                await self._wait_change()
        except BaseException:
            self._writers_waiting -= 1
            self._wake()  # executions held back for this suspect may start now
            raise
        self._writers_waiting -= 1
        self._writer = True

    def exclusive_release(self) -> None:
        self._writer = False
        self._wake()
