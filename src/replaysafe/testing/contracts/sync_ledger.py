"""The ledger contract, run through a backend's sync twin (``Ledger.sync()``).

:func:`through_sync_twin` wraps a ledger so that every method a :class:`SyncLedger` has (claim,
claim_many, mark_started, extend, complete, complete_many, release, quarantine, get) goes to the
twin, called synchronously, and everything else (purge, summary, pause flags, redrive, close) to
the async ledger itself. Subclass the ordinary contract and return the wrapped ledger::

    class TestSQLiteSyncTwin(LedgerBackendContract):
        async def make_ledger(self, clock: FakeClock) -> Ledger:
            return through_sync_twin(SQLiteLedger(self.path, clock=clock))

so every promise of the contract is checked on the twin, and on the twin and the async ledger
sharing one store (what a sync guard beside an async worker does).
"""

from __future__ import annotations

from typing import Any

from replaysafe.ledger.base import Ledger, SyncLedger

#: the methods a sync twin answers (the rest stay with the async ledger)
TWIN_METHODS = (
    "claim",
    "claim_many",
    "mark_started",
    "extend",
    "complete",
    "complete_many",
    "release",
    "quarantine",
    "get",
)


class _ThroughTwin:
    """An async ledger whose claim-path methods run on its sync twin (see the module)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self.twin: SyncLedger = ledger.sync()
        assert isinstance(self.twin, SyncLedger)

    def __getattr__(self, name: str) -> Any:
        if name in TWIN_METHODS:
            fn = getattr(self.twin, name)

            async def call(*args: Any, **kwargs: Any) -> Any:
                return fn(*args, **kwargs)

            return call
        return getattr(self._ledger, name)

    async def close(self) -> None:
        self.twin.close()
        await self._ledger.close()

    def __repr__(self) -> str:
        return f"through_sync_twin({self._ledger!r})"


def through_sync_twin(ledger: Ledger) -> Ledger:
    """``ledger`` with its claim path on its sync twin (for the contract suite)."""
    return _ThroughTwin(ledger)  # type: ignore[return-value]
