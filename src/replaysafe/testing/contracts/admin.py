"""The conformance suite of the admin role (:class:`~replaysafe.ledger.base.LedgerAdmin`)."""

from __future__ import annotations

import pytest

from replaysafe.ledger.base import (
    LedgerBackend,
    OpKey,
    QuarantineRequest,
    State,
)
from replaysafe.quarantine import QuarantineReason
from replaysafe.testing import FakeClock
from replaysafe.testing.contracts._ledger_base import (
    KEY,
    LedgerFixtures,
    acquire,
    must_get,
)


class LedgerAdminContract(LedgerFixtures):
    """Behaviour every :class:`~replaysafe.ledger.base.LedgerAdmin` must show: the summary
    ``inspect`` reads and the horizon purge."""

    async def test_summary_of_an_empty_ledger(self, ledger: LedgerBackend) -> None:
        summary = await ledger.summary()
        assert summary.by_state == {}
        assert (summary.expired_leases, summary.oldest_in_flight_at) == (0, None)
        assert (summary.hot_operations, summary.quarantined_by_reason) == ([], {})
        assert summary.completed_last_hour == 0
        assert abs(summary.now - ledger.now()) < 5
        assert summary.approx_bytes is None or summary.approx_bytes >= 0

    async def test_summary_oldest_in_flight_is_the_claim_time_not_the_last_extend(
        self, ledger: LedgerBackend, clock: FakeClock
    ) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        claimed = (await must_get(ledger, KEY)).updated_at
        await self.advance(clock, self.lease / 2)
        await ledger.extend(claim, self.lease)
        assert (await must_get(ledger, KEY)).updated_at == pytest.approx(claimed, abs=1e-3)
        summary = await ledger.summary()
        assert summary.oldest_in_flight_at == pytest.approx(claimed, abs=1e-3)
        assert summary.now - claimed >= self.lease / 2 - 0.05

    async def test_summary_counts_states_leases_hot_operations_and_quarantine(
        self, ledger: LedgerBackend, clock: FakeClock
    ) -> None:
        async def retried(key: OpKey, times: int) -> None:
            for _ in range(times):
                await ledger.release(await acquire(ledger, key, self.lease), "transient")

        done = OpKey("orders", "done")
        await ledger.complete(await acquire(ledger, done, self.lease), "r")
        released, tie = OpKey("orders", "retried"), OpKey("billing", "retried")
        await retried(released, 2)
        await retried(tie, 2)
        stuck = OpKey("orders", "stuck")
        await retried(stuck, 2)
        stuck_claim = await acquire(ledger, stuck, self.lease)  # attempt 3, then "crashes"
        quarantined = OpKey("orders", "quarantined")
        await ledger.quarantine(
            self._request(QuarantineReason.MAX_ATTEMPTS, operation_id=quarantined.operation_id),
            await acquire(ledger, quarantined, self.lease),
        )
        await ledger.quarantine(
            QuarantineRequest("orders", QuarantineReason.MALFORMED_PAYLOAD, message=b"{")
        )
        await self.expire(clock)  # stuck's lease is over; nobody has taken it over yet
        live = OpKey("orders", "live")
        await acquire(ledger, live, self.lease * 30)  # long: live however slow the machine

        summary = await ledger.summary()
        assert summary.by_state == {
            State.COMPLETED.value: 1,
            State.RELEASED.value: 2,
            State.IN_FLIGHT.value: 2,
            State.QUARANTINED.value: 1,
        }
        assert summary.expired_leases == 1
        stuck_record, live_record = await must_get(ledger, stuck), await must_get(ledger, live)
        oldest = summary.oldest_in_flight_at
        assert oldest is not None
        assert oldest == pytest.approx(stuck_record.updated_at, abs=1e-3)
        assert oldest < live_record.updated_at
        # most attempts first; ties in key order (scope, then operation id)
        assert summary.hot_operations == [(stuck, 3), (tie, 2), (released, 2)]
        assert summary.quarantined_by_reason == {
            QuarantineReason.MAX_ATTEMPTS.value: 1,
            QuarantineReason.MALFORMED_PAYLOAD.value: 1,
        }
        assert summary.completed_last_hour == 1
        assert summary.now >= live_record.updated_at
        assert summary.approx_bytes is None or summary.approx_bytes > 0
        assert (await ledger.summary(top=1)).hot_operations == [(stuck, 3)]
        assert (await ledger.summary(top=0)).hot_operations == []

        # the expired lease is taken over and completed: nothing expired or stuck is left
        takeover = await acquire(ledger, stuck, self.lease, owner="w2")
        assert takeover.recovered and takeover.token > stuck_claim.token
        await ledger.complete(takeover)
        after = await ledger.summary()
        assert after.by_state[State.COMPLETED.value] == 2
        assert after.by_state[State.IN_FLIGHT.value] == 1
        assert after.expired_leases == 0
        assert after.oldest_in_flight_at == pytest.approx(live_record.updated_at, abs=1e-3)
        assert after.hot_operations[0] == (stuck, 4)
        assert after.completed_last_hour == 2

    async def test_purge_forgets_only_completed_records_older_than_the_cutoff(
        self, ledger: LedgerBackend, clock: FakeClock
    ) -> None:
        old_done = [OpKey("orders", f"old-{i}") for i in range(2)]
        for key in old_done:
            await ledger.complete(await acquire(ledger, key, self.lease))
        in_flight = OpKey("orders", "in-flight")
        await acquire(ledger, in_flight, self.lease)
        released = OpKey("orders", "released")
        await ledger.release(await acquire(ledger, released, self.lease))
        quarantined = OpKey("orders", "quarantined")
        await ledger.quarantine(
            self._request(QuarantineReason.NON_RETRYABLE_ERROR, operation_id="quarantined"),
            await acquire(ledger, quarantined, self.lease),
        )
        await self.advance(clock, 0.5)
        cutoff = ledger.now()
        await self.advance(clock, 0.5)
        recent = OpKey("orders", "recent")
        last = await acquire(ledger, recent, self.lease)
        await ledger.complete(last)

        assert await ledger.purge(cutoff) == 2
        for key in old_done:
            assert await ledger.get(key) is None
        for key in (in_flight, released, quarantined, recent):
            assert await ledger.get(key) is not None, key
        assert await ledger.purge(cutoff) == 0
        assert len(await ledger.quarantined()) == 1  # purge never touches quarantine entries
        # a purged operation is new to the ledger again (that is what the replay horizon means),
        # and its new token still exceeds every token issued before
        again = await acquire(ledger, old_done[0], self.lease)
        assert again.attempt == 1
        assert again.token > last.token

    async def test_purge_respects_its_limit(self, ledger: LedgerBackend, clock: FakeClock) -> None:
        keys = [OpKey("orders", f"op-{i}") for i in range(5)]
        for key in keys:
            await ledger.complete(await acquire(ledger, key, self.lease))
        await self.advance(clock, 0.1)
        cutoff = ledger.now()
        assert await ledger.purge(cutoff, limit=2) == 2
        assert await ledger.purge(cutoff, limit=2) == 2
        assert await ledger.purge(cutoff, limit=2) == 1
        assert await ledger.purge(cutoff, limit=2) == 0
        assert [await ledger.get(k) for k in keys] == [None] * 5
