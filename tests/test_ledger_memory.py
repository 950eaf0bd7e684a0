"""MemoryLedger, the reference implementation, passes the ledger contract."""

from __future__ import annotations

from replaysafe.ledger import Ledger, MemoryLedger
from replaysafe.testing import FakeClock
from replaysafe.testing.contracts import LedgerBackendContract
from replaysafe.testing.contracts.sync_ledger import through_sync_twin


class TestMemoryLedger(LedgerBackendContract):
    async def make_ledger(self, clock: FakeClock) -> Ledger:
        return MemoryLedger(clock)


class TestMemoryLedgerSyncTwin(LedgerBackendContract):
    """The whole contract with the claim path on ``MemoryLedger.sync()`` (issue 14)."""

    async def make_ledger(self, clock: FakeClock) -> Ledger:
        return through_sync_twin(MemoryLedger(clock))
