"""MemoryLedger, the reference implementation, passes the ledger contract."""

from __future__ import annotations

from replaysafe.ledger import Ledger, MemoryLedger
from replaysafe.testing import FakeClock
from replaysafe.testing.contracts.ledger import LedgerContract


class TestMemoryLedger(LedgerContract):
    async def make_ledger(self, clock: FakeClock) -> Ledger:
        return MemoryLedger(clock)
