"""The conformance suite of :class:`~replaysafe.ledger.base.TransactionalLedger`: every role's
suite plus the transactional boundary."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import pytest_asyncio

from replaysafe.errors import (
    LeaseLost,
    ReplaysafeError,
)
from replaysafe.ledger.base import (
    AlreadyDone,
    LedgerBackend,
    State,
    TransactionalLedger,
)
from replaysafe.testing import FakeClock
from replaysafe.testing.contracts._ledger_base import (
    FP,
    KEY,
    acquire,
    must_get,
)
from replaysafe.testing.contracts.ledger import LedgerBackendContract


class TransactionalLedgerContract(LedgerBackendContract):
    """Adds the transactional boundary: business rows and the ledger row commit or roll back
    together.

    The subclass supplies the SQL for a business table, since placeholders and types differ per
    database: :meth:`insert_sql` (required) and :meth:`business_table_sql` (the default is portable
    SQL). The table is read back with a parameterless ``SELECT op, note FROM rs_contract_effects``.
    """

    def business_table_sql(self) -> str:
        """``CREATE TABLE`` for ``rs_contract_effects(op, note)``, both text."""
        return (
            "CREATE TABLE IF NOT EXISTS rs_contract_effects (op TEXT NOT NULL, note TEXT NOT NULL)"
        )

    def insert_sql(self) -> str:
        """An insert of ``(op, note)`` into ``rs_contract_effects`` with this database's
        placeholders, e.g. ``INSERT INTO rs_contract_effects (op, note) VALUES (?, ?)``."""
        raise NotImplementedError

    @pytest_asyncio.fixture
    async def tledger(self, ledger: LedgerBackend) -> TransactionalLedger:
        assert isinstance(ledger, TransactionalLedger)
        assert ledger.transactional is True
        async with ledger.transaction() as tx:
            await tx.execute(self.business_table_sql())
        return ledger

    async def effects(self, ledger: TransactionalLedger) -> list[tuple[Any, ...]]:
        async with ledger.transaction() as tx:
            return sorted(await tx.fetchall("SELECT op, note FROM rs_contract_effects"))

    async def test_business_row_and_completion_commit_together(
        self, tledger: TransactionalLedger
    ) -> None:
        claim = await acquire(tledger, KEY, self.lease)
        async with tledger.transaction() as tx:
            await tx.execute(self.insert_sql(), (KEY.operation_id, "charged"))
            await tledger.complete_in(tx, claim, "receipt-1")
        assert await self.effects(tledger) == [(KEY.operation_id, "charged")]
        record = await must_get(tledger, KEY)
        assert (record.state, record.result) == (State.COMPLETED, "receipt-1")
        assert isinstance(await tledger.claim(KEY, FP, "w2", self.lease), AlreadyDone)

    async def test_fetchall_sees_the_transactions_own_writes(
        self, tledger: TransactionalLedger
    ) -> None:
        async with tledger.transaction() as tx:
            await tx.execute(self.insert_sql(), ("op-1", "n1"))
            rows = await tx.fetchall("SELECT op, note FROM rs_contract_effects")
        assert [tuple(r) for r in rows] == [("op-1", "n1")]

    async def test_exception_rolls_back_business_row_and_completion(
        self, tledger: TransactionalLedger
    ) -> None:
        claim = await acquire(tledger, KEY, self.lease)
        before = await must_get(tledger, KEY)

        class HandlerFailed(Exception):
            pass

        with pytest.raises(HandlerFailed):
            async with tledger.transaction() as tx:
                await tx.execute(self.insert_sql(), (KEY.operation_id, "charged"))
                await tledger.complete_in(tx, claim, "receipt-1")
                raise HandlerFailed
        assert await self.effects(tledger) == []
        assert await tledger.get(KEY) == before
        # nothing happened, so the same claim can still finish the job
        async with tledger.transaction() as tx:
            await tx.execute(self.insert_sql(), (KEY.operation_id, "charged"))
            await tledger.complete_in(tx, claim, "receipt-2")
        assert await self.effects(tledger) == [(KEY.operation_id, "charged")]
        assert (await must_get(tledger, KEY)).result == "receipt-2"

    async def test_rolled_back_operation_can_be_released_and_claimed_again(
        self, tledger: TransactionalLedger
    ) -> None:
        claim = await acquire(tledger, KEY, self.lease)
        with pytest.raises(ZeroDivisionError):
            async with tledger.transaction() as tx:
                await tx.execute(self.insert_sql(), (KEY.operation_id, "charged"))
                await tledger.complete_in(tx, claim)
                _ = 1 / 0
        await tledger.release(claim, "ZeroDivisionError")
        again = await acquire(tledger, KEY, self.lease, owner="w2")
        assert (again.attempt, again.recovered) == (2, False)
        assert await self.effects(tledger) == []

    async def test_cancellation_inside_the_transaction_rolls_back(
        self, tledger: TransactionalLedger
    ) -> None:
        claim = await acquire(tledger, KEY, self.lease)
        inside = asyncio.Event()

        async def handler() -> None:
            async with tledger.transaction() as tx:
                await tx.execute(self.insert_sql(), (KEY.operation_id, "charged"))
                await tledger.complete_in(tx, claim)
                inside.set()
                await asyncio.Event().wait()  # parked until cancelled

        task = asyncio.create_task(handler())
        await asyncio.wait_for(inside.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await self.effects(tledger) == []
        assert (await must_get(tledger, KEY)).state is State.IN_FLIGHT
        assert (await tledger.complete(claim)).state is State.COMPLETED  # the ledger still works

    async def test_stale_complete_in_raises_lease_lost_and_rolls_back(
        self, tledger: TransactionalLedger, clock: FakeClock
    ) -> None:
        stale = await acquire(tledger, KEY, self.lease, owner="w1")
        await self.expire(clock)
        current = await acquire(tledger, KEY, self.lease, owner="w2")
        with pytest.raises(LeaseLost):
            async with tledger.transaction() as tx:
                await tx.execute(self.insert_sql(), (KEY.operation_id, "charged twice?"))
                await tledger.complete_in(tx, stale, "nope")
        assert await self.effects(tledger) == []
        record = await must_get(tledger, KEY)
        assert (record.state, record.token, record.owner) == (
            State.IN_FLIGHT,
            current.token,
            "w2",
        )

    async def test_callers_sql_error_propagates_unchanged_and_rolls_back(
        self, tledger: TransactionalLedger
    ) -> None:
        claim = await acquire(tledger, KEY, self.lease)
        with pytest.raises(Exception) as raised:  # the driver's own type, whatever it is
            async with tledger.transaction() as tx:
                await tx.execute(self.insert_sql(), (KEY.operation_id, "charged"))
                await tledger.complete_in(tx, claim)
                await tx.execute("INSERT INTO rs_contract_no_such_table (x) VALUES (1)")
        assert not isinstance(raised.value, ReplaysafeError), raised.value
        assert await self.effects(tledger) == []
        assert (await must_get(tledger, KEY)).state is State.IN_FLIGHT
