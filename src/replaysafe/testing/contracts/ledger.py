"""Conformance suites for replay ledgers.

A backend is supported when it passes these. A backend's test module subclasses the suite (the
class names carry no ``Test`` prefix, so pytest collects only the subclasses)::

    class TestSQLiteLedger(TransactionalLedgerContract):
        async def make_ledger(self, clock: FakeClock) -> Ledger:
            return SQLiteLedger(tmp_dir / f"{uuid4().hex}.db", clock=clock)

        def insert_sql(self) -> str:
            return "INSERT INTO rs_contract_effects (op, note) VALUES (?, ?)"

Rules for the subclass:

- ``make_ledger`` returns a new, *empty* ledger, isolated from every other test (the suite counts
  quarantine entries and purges globally). The ``ledger`` fixture calls it and closes the ledger.
- Time moves only through :meth:`LedgerContract.advance`. The default moves the ``FakeClock``
  handed to ``make_ledger``; a backend that judges leases by its database's clock overrides it with
  a real sleep. The suite therefore uses short leases (:attr:`LedgerContract.lease`) and advances
  only a little past them, and never asserts exact timestamps, only their order.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
import pytest_asyncio

from replaysafe.errors import LeaseLost, ReplaysafeError
from replaysafe.ledger.base import (
    MAX_QUARANTINE_COPY,
    Acquired,
    AlreadyDone,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    Conflict,
    InFlight,
    Ledger,
    OpKey,
    Quarantined,
    QuarantineRequest,
    Record,
    State,
    TransactionalLedger,
)
from replaysafe.quarantine import EffectRisk, QuarantineReason
from replaysafe.testing import FakeClock

KEY = OpKey("orders", "capture-payment:order-1")
FP = "fp-a"
OTHER_FP = "fp-b"


async def acquire(
    ledger: Ledger, key: OpKey, lease: float, owner: str = "w1", fingerprint: str = FP
) -> Claim:
    """Claim ``key`` and insist that it is acquired."""
    outcome = await ledger.claim(key, fingerprint, owner, lease)
    assert isinstance(outcome, Acquired), f"expected Acquired for {key}, got {outcome!r}"
    return outcome.claim


async def must_get(ledger: Ledger, key: OpKey) -> Record:
    record = await ledger.get(key)
    assert record is not None, f"no record for {key}"
    return record


def shape(item: ClaimOutcome | Record | LeaseLost) -> tuple[Any, ...]:
    """An outcome without its backend-specific values (token numbers, timestamps), so a batch
    form can be compared with the single form run on another scope."""
    if isinstance(item, LeaseLost):
        return ("LeaseLost",)
    if isinstance(item, Record):
        return ("Record", item.state, item.attempts, item.fingerprint, item.owner, item.result)
    if isinstance(item, Acquired):
        c = item.claim
        return ("Acquired", c.attempt, c.recovered, c.owner, c.fingerprint)
    r = item.record
    return (type(item).__name__, r.state, r.attempts, r.fingerprint, r.result)


class LedgerContract:
    """Behaviour every :class:`~replaysafe.ledger.base.Ledger` must show (see the state machine in
    :mod:`replaysafe.ledger.base`)."""

    #: lease used throughout, seconds: short, because a real-clock backend really waits for it
    lease: ClassVar[float] = 1.0
    #: how far past a lease the suite moves time to let it expire
    margin: ClassVar[float] = 0.25

    async def make_ledger(self, clock: FakeClock) -> Ledger:
        """Return a new, empty ledger whose leases are judged by ``clock`` (or by the database's
        clock, together with an :meth:`advance` that really waits)."""
        raise NotImplementedError

    async def advance(self, clock: FakeClock, seconds: float) -> None:
        """Move the ledger's time forward by ``seconds``."""
        clock.advance(seconds)

    async def expire(self, clock: FakeClock, lease: float | None = None) -> None:
        await self.advance(clock, (self.lease if lease is None else lease) + self.margin)

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest_asyncio.fixture
    async def ledger(self, clock: FakeClock) -> AsyncIterator[Ledger]:
        ledger = await self.make_ledger(clock)
        try:
            yield ledger
        finally:
            await ledger.close()

    # ------------------------------------------------------------------ claim

    async def test_unknown_operation_has_no_record(self, ledger: Ledger) -> None:
        assert await ledger.get(KEY) is None

    async def test_first_claim_is_acquired_with_attempt_one_and_a_token(
        self, ledger: Ledger
    ) -> None:
        outcome = await ledger.claim(KEY, FP, "w1", self.lease)
        assert isinstance(outcome, Acquired)
        claim = outcome.claim
        assert (claim.key, claim.fingerprint, claim.owner) == (KEY, FP, "w1")
        assert claim.attempt == 1
        assert claim.recovered is False
        assert claim.token > 0
        record = await must_get(ledger, KEY)
        assert record.state is State.IN_FLIGHT
        assert (record.token, record.owner, record.attempts) == (claim.token, "w1", 1)
        assert record.fingerprint == FP
        assert record.lease_until == claim.lease_until
        assert record.completed_at is None

    async def test_claim_while_lease_is_live_is_in_flight_and_changes_nothing(
        self, ledger: Ledger
    ) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        before = await must_get(ledger, KEY)
        for owner in ("w2", "w1"):  # the same owner gets no re-entry either
            outcome = await ledger.claim(KEY, FP, owner, self.lease)
            assert isinstance(outcome, InFlight), outcome
            assert outcome.record.token == claim.token
            assert outcome.record.owner == "w1"
        assert await ledger.get(KEY) == before

    async def test_claim_after_expiry_takes_over_as_recovered(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        first = await acquire(ledger, KEY, self.lease, owner="w1")
        await self.expire(clock)
        outcome = await ledger.claim(KEY, FP, "w2", self.lease)
        assert isinstance(outcome, Acquired), outcome
        second = outcome.claim
        assert second.attempt == 2
        assert second.recovered is True
        assert second.token > first.token
        assert second.owner == "w2"
        record = await must_get(ledger, KEY)
        assert (record.state, record.token, record.owner, record.attempts) == (
            State.IN_FLIGHT,
            second.token,
            "w2",
            2,
        )

    async def test_attempts_count_every_successful_claim_and_nothing_else(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        first = await acquire(ledger, KEY, self.lease)
        assert isinstance(await ledger.claim(KEY, FP, "w2", self.lease), InFlight)
        await ledger.release(first, "transient")
        await acquire(ledger, KEY, self.lease, owner="w2")
        await self.expire(clock)
        third = await acquire(ledger, KEY, self.lease, owner="w3")
        assert third.attempt == 3
        assert (await must_get(ledger, KEY)).attempts == 3

    # ------------------------------------------------------------------ fencing

    @pytest.mark.parametrize("call", ["extend", "complete", "release", "quarantine"])
    async def test_stale_token_is_fenced_and_changes_nothing(
        self, ledger: Ledger, clock: FakeClock, call: str
    ) -> None:
        stale = await acquire(ledger, KEY, self.lease, owner="w1")
        await self.expire(clock)
        current = await acquire(ledger, KEY, self.lease, owner="w2")
        before = await must_get(ledger, KEY)
        with pytest.raises(LeaseLost):
            await self._call(ledger, call, stale)
        assert await ledger.get(KEY) == before
        assert await ledger.quarantined() == []  # a fenced quarantine writes no entry either
        # and the current holder is untouched by the refused call
        done = await ledger.complete(current, "ok")
        assert done.state is State.COMPLETED

    @pytest.mark.parametrize("ended_by", ["complete", "release", "quarantine"])
    @pytest.mark.parametrize("call", ["extend", "complete", "release", "quarantine"])
    async def test_claim_is_stale_once_its_attempt_ended(
        self, ledger: Ledger, ended_by: str, call: str
    ) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        await self._call(ledger, ended_by, claim)
        before = await must_get(ledger, KEY)
        entries = await ledger.quarantined()
        with pytest.raises(LeaseLost):
            await self._call(ledger, call, claim)
        assert await ledger.get(KEY) == before
        assert await ledger.quarantined() == entries

    async def test_expired_holder_not_taken_over_can_still_extend_and_complete(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        await self.expire(clock)
        extended = await ledger.extend(claim, self.lease)
        assert extended.token == claim.token
        assert extended.lease_until > claim.lease_until
        assert (await must_get(ledger, KEY)).lease_until == extended.lease_until
        assert isinstance(await ledger.claim(KEY, FP, "w2", self.lease), InFlight)
        done = await ledger.complete(extended, "late but current")
        assert (done.state, done.result, done.token) == (
            State.COMPLETED,
            "late but current",
            claim.token,
        )

    async def test_expired_holder_not_taken_over_can_complete_directly(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        await self.expire(clock)
        assert (await ledger.complete(claim)).state is State.COMPLETED

    async def test_extend_keeps_the_lease_alive_past_its_first_end(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        await self.advance(clock, self.lease * 0.6)
        extended = await ledger.extend(claim, self.lease)
        assert extended.lease_until > claim.lease_until
        await self.advance(clock, self.lease * 0.6)  # past the first lease, inside the new one
        assert isinstance(await ledger.claim(KEY, FP, "w2", self.lease), InFlight)
        await self.expire(clock)
        assert isinstance(await ledger.claim(KEY, FP, "w2", self.lease), Acquired)

    # ------------------------------------------------------------------ complete / release

    async def test_completed_operation_is_already_done_with_its_result(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        done = await ledger.complete(claim, "receipt-77")
        assert done.state is State.COMPLETED
        assert done.result == "receipt-77"
        assert done.lease_until is None
        assert done.completed_at is not None
        assert await ledger.get(KEY) == done
        await self.expire(clock)  # completion does not expire with the lease
        for owner in ("w1", "w2"):
            outcome = await ledger.claim(KEY, FP, owner, self.lease)
            assert isinstance(outcome, AlreadyDone), outcome
            assert outcome.record.result == "receipt-77"
        assert (await must_get(ledger, KEY)).attempts == 1

    async def test_released_operation_is_claimable_at_once(self, ledger: Ledger) -> None:
        first = await acquire(ledger, KEY, self.lease, owner="w1")
        await ledger.release(first, "connection reset")
        released = await must_get(ledger, KEY)
        assert released.state is State.RELEASED
        assert released.last_error == "connection reset"
        assert released.lease_until is None
        outcome = await ledger.claim(KEY, FP, "w2", self.lease)  # no time has passed
        assert isinstance(outcome, Acquired), outcome
        assert outcome.claim.attempt == 2
        assert outcome.claim.recovered is False  # a clean release: no unknown outcome
        assert outcome.claim.token > first.token

    # ------------------------------------------------------------------ key-reuse conflict

    @pytest.mark.parametrize(
        "state", ["in_flight", "expired", "completed", "released", "quarantined"]
    )
    async def test_different_fingerprint_conflicts_on_every_path(
        self, ledger: Ledger, clock: FakeClock, state: str
    ) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        if state == "expired":
            await self.expire(clock)
        elif state != "in_flight":
            ending = {"completed": "complete", "released": "release", "quarantined": "quarantine"}
            await self._call(ledger, ending[state], claim)
        before = await must_get(ledger, KEY)
        outcome = await ledger.claim(KEY, OTHER_FP, "w2", self.lease)
        assert isinstance(outcome, Conflict), outcome
        assert outcome.record.fingerprint == FP
        assert await ledger.get(KEY) == before

    # ------------------------------------------------------------------ quarantine

    async def test_quarantine_with_claim_quarantines_the_operation(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        request = self._request(
            QuarantineReason.OUTCOME_UNKNOWN, risk=EffectRisk.OUTCOME_UNKNOWN, detail="crashed"
        )
        entry = await ledger.quarantine(request, claim)
        assert entry.id == request.entry_id()
        assert (entry.reason, entry.risk, entry.seen) == (
            QuarantineReason.OUTCOME_UNKNOWN,
            EffectRisk.OUTCOME_UNKNOWN,
            1,
        )
        record = await must_get(ledger, KEY)
        assert record.state is State.QUARANTINED
        assert record.last_error == "crashed"
        await self.expire(clock)  # quarantine does not expire
        outcome = await ledger.claim(KEY, FP, "w2", self.lease)
        assert isinstance(outcome, Quarantined), outcome
        assert outcome.record.attempts == 1

    async def test_quarantine_without_claim_leaves_the_record_alone(self, ledger: Ledger) -> None:
        await acquire(ledger, KEY, self.lease)
        before = await must_get(ledger, KEY)
        conflicting = self._request(QuarantineReason.KEY_REUSE_CONFLICT, fingerprint=OTHER_FP)
        entry = await ledger.quarantine(conflicting)
        assert entry.fingerprint == OTHER_FP
        assert await ledger.get(KEY) == before
        assert [e.id for e in await ledger.quarantined()] == [entry.id]

    async def test_quarantine_entries_are_idempotent_per_message(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        first = await ledger.quarantine(
            self._request(QuarantineReason.MAX_ATTEMPTS, attempts=5, detail="first")
        )
        await self.advance(clock, 0.05)
        again = await ledger.quarantine(
            self._request(QuarantineReason.MAX_ATTEMPTS, attempts=6, detail="second")
        )
        assert again.id == first.id
        assert again.seen == 2
        assert (again.first_detail, again.last_detail) == ("first", "second")
        assert again.attempts == 6
        assert again.created_at == first.created_at
        assert again.updated_at >= first.updated_at
        assert await ledger.quarantined() == [again]
        # another reason for the same message is another entry
        other = await ledger.quarantine(self._request(QuarantineReason.NON_RETRYABLE_ERROR))
        assert other.id != first.id
        assert len(await ledger.quarantined()) == 2

    async def test_quarantined_message_copy_is_capped(self, ledger: Ledger) -> None:
        big = bytes(range(256)) * (MAX_QUARANTINE_COPY // 256 + 2)
        request = self._request(
            QuarantineReason.PAYLOAD_TOO_LARGE, message=big, content_type="application/json"
        )
        entry = await ledger.quarantine(request)
        assert entry.message == big[:MAX_QUARANTINE_COPY]
        (stored,) = await ledger.quarantined()
        assert stored.message == big[:MAX_QUARANTINE_COPY]
        assert stored.content_type == "application/json"

    async def test_quarantined_filters_by_reason_oldest_first_with_limit(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        ids: dict[QuarantineReason, list[str]] = {}
        for i in range(3):
            for reason in (QuarantineReason.MALFORMED_PAYLOAD, QuarantineReason.MAX_ATTEMPTS):
                e = await ledger.quarantine(self._request(reason, operation_id=f"op-{i}"))
                ids.setdefault(reason, []).append(e.id)
                await self.advance(clock, 0.01)
        for reason, expected in ids.items():
            got = await ledger.quarantined(reason=reason)
            assert [e.id for e in got] == expected
            assert all(e.reason == reason for e in got)
        assert len(await ledger.quarantined()) == 6
        assert [e.id for e in await ledger.quarantined(limit=2)] == [
            ids[QuarantineReason.MALFORMED_PAYLOAD][0],
            ids[QuarantineReason.MAX_ATTEMPTS][0],
        ]
        assert await ledger.quarantined(reason=QuarantineReason.BEYOND_HORIZON) == []

    async def test_bad_input_without_operation_id_is_keyed_by_message_bytes(
        self, ledger: Ledger
    ) -> None:
        def bad(body: bytes) -> QuarantineRequest:
            return QuarantineRequest(
                scope="orders", reason=QuarantineReason.MALFORMED_PAYLOAD, message=body
            )

        a = await ledger.quarantine(bad(b"{not json"))
        b = await ledger.quarantine(bad(b"{also not json"))
        a2 = await ledger.quarantine(bad(b"{not json"))
        assert a.id != b.id
        assert a2.id == a.id and a2.seen == 2
        assert (a.operation_id, a.fingerprint, a.message) == (None, None, b"{not json")
        assert len(await ledger.quarantined()) == 2

    # ------------------------------------------------------------------ tokens

    async def test_tokens_strictly_increase_across_operations(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        keys = [OpKey("orders", f"op-{i}") for i in range(3)]
        claims = [await acquire(ledger, k, self.lease) for k in keys]
        tokens = [c.token for c in claims]
        await ledger.release(claims[0])
        tokens.append((await acquire(ledger, keys[0], self.lease, owner="w2")).token)
        await self.expire(clock)
        tokens.append((await acquire(ledger, keys[1], self.lease, owner="w2")).token)
        tokens.append((await acquire(ledger, OpKey("orders", "op-new"), self.lease)).token)
        assert all(a < b for a, b in itertools.pairwise(tokens)), tokens

    # ------------------------------------------------------------------ purge

    async def test_purge_forgets_only_completed_records_older_than_the_cutoff(
        self, ledger: Ledger, clock: FakeClock
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

    async def test_purge_respects_its_limit(self, ledger: Ledger, clock: FakeClock) -> None:
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

    # ------------------------------------------------------------------ batch forms

    async def test_claim_many_equals_the_single_form(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        def keys(scope: str) -> list[OpKey]:
            return [OpKey(scope, f"op-{i}") for i in range(6)]

        # identical history in two scopes; then the same requests, batched in one, single in other
        for scope in ("batch", "single"):
            k = keys(scope)
            await ledger.complete(await acquire(ledger, k[2], self.lease), "r2")
            await ledger.complete(await acquire(ledger, k[3], self.lease), "r3")
            await ledger.quarantine(
                self._request(QuarantineReason.NON_RETRYABLE_ERROR, operation_id=f"{scope}-4"),
                await acquire(ledger, k[4], self.lease),
            )
            await ledger.release(await acquire(ledger, k[5], self.lease))
            await acquire(ledger, OpKey(scope, "expired"), self.lease)
        await self.expire(clock)

        def requests(scope: str) -> list[ClaimRequest]:
            k = keys(scope)
            lease = self.lease
            return [
                ClaimRequest(k[0], FP, "w1", lease),  # new -> Acquired
                ClaimRequest(k[1], FP, "w1", lease),  # new -> Acquired
                ClaimRequest(k[0], FP, "w2", lease),  # repeated in the batch -> InFlight
                ClaimRequest(k[2], OTHER_FP, "w1", lease),  # Conflict
                ClaimRequest(k[3], FP, "w1", lease),  # AlreadyDone
                ClaimRequest(k[4], FP, "w1", lease),  # Quarantined
                ClaimRequest(k[5], FP, "w1", lease),  # released -> Acquired, attempt 2
                ClaimRequest(OpKey(scope, "expired"), FP, "w2", lease),  # recovered
            ]

        batch = await ledger.claim_many(requests("batch"))
        single = [
            await ledger.claim(r.key, r.fingerprint, r.owner, r.lease) for r in requests("single")
        ]
        assert [shape(o) for o in batch] == [shape(o) for o in single]
        assert [type(o) for o in batch] == [
            Acquired,
            Acquired,
            InFlight,
            Conflict,
            AlreadyDone,
            Quarantined,
            Acquired,
            Acquired,
        ]
        tokens = [o.claim.token for o in batch if isinstance(o, Acquired)]
        assert all(a < b for a, b in itertools.pairwise(tokens)), tokens
        for kb, ks in zip(keys("batch"), keys("single"), strict=True):
            assert shape(await must_get(ledger, kb)) == shape(await must_get(ledger, ks))
        assert await ledger.claim_many([]) == []

    async def test_complete_many_equals_the_single_form(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        async def setup(scope: str) -> list[tuple[Claim, str | None]]:
            a = await acquire(ledger, OpKey(scope, "a"), self.lease)
            stale = await acquire(ledger, OpKey(scope, "b"), self.lease)
            await ledger.release(stale)
            await acquire(ledger, OpKey(scope, "b"), self.lease, owner="w2")
            c = await acquire(ledger, OpKey(scope, "c"), self.lease)
            return [(a, "ra"), (stale, "rb"), (c, None), (a, "ra-again")]

        batch_items = await setup("batch")
        single_items = await setup("single")
        batch = await ledger.complete_many(batch_items)
        single: list[Record | LeaseLost] = []
        for claim, result in single_items:
            try:
                single.append(await ledger.complete(claim, result))
            except LeaseLost as exc:
                single.append(exc)
        assert [shape(o) for o in batch] == [shape(o) for o in single]
        assert [type(o) for o in batch] == [Record, LeaseLost, Record, LeaseLost]
        for name in ("a", "b", "c"):
            b, s = (
                await must_get(ledger, OpKey("batch", name)),
                await must_get(ledger, OpKey("single", name)),
            )
            assert shape(b) == shape(s)
        assert (await must_get(ledger, OpKey("batch", "a"))).result == "ra"
        assert (await must_get(ledger, OpKey("batch", "b"))).state is State.IN_FLIGHT
        assert await ledger.complete_many([]) == []

    # ------------------------------------------------------------------ keys

    async def test_scopes_are_a_composite_key(self, ledger: Ledger) -> None:
        left, right = OpKey("a:b", "c"), OpKey("a", "b:c")
        l_claim = await acquire(ledger, left, self.lease)
        r_claim = await acquire(ledger, right, self.lease)  # would be InFlight if they collided
        await ledger.complete(l_claim, "left")
        assert (await must_get(ledger, right)).state is State.IN_FLIGHT
        assert (await ledger.complete(r_claim, "right")).result == "right"
        assert (await must_get(ledger, left)).result == "left"

    async def test_same_operation_id_in_two_scopes_is_two_operations(self, ledger: Ledger) -> None:
        billing, shipping = OpKey("billing", "order-9"), OpKey("shipping", "order-9")
        b = await acquire(ledger, billing, self.lease)
        s = await acquire(ledger, shipping, self.lease, fingerprint=OTHER_FP)  # no Conflict
        await ledger.release(b, "retry")
        assert (await must_get(ledger, billing)).state is State.RELEASED
        assert (await must_get(ledger, shipping)).state is State.IN_FLIGHT
        assert (await must_get(ledger, shipping)).token == s.token

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _request(
        reason: QuarantineReason,
        *,
        operation_id: str | None = KEY.operation_id,
        fingerprint: str | None = FP,
        risk: EffectRisk = EffectRisk.RELEASED_CLEANLY,
        attempts: int = 1,
        detail: str = "",
        message: bytes | None = b'{"amount": 10}',
        content_type: str | None = None,
    ) -> QuarantineRequest:
        return QuarantineRequest(
            scope=KEY.scope,
            reason=reason,
            operation_id=operation_id,
            fingerprint=fingerprint,
            risk=risk,
            attempts=attempts,
            detail=detail,
            message=message,
            content_type=content_type,
        )

    async def _call(self, ledger: Ledger, call: str, claim: Claim) -> None:
        """Run one of the fenced calls with ``claim``."""
        if call == "extend":
            await ledger.extend(claim, self.lease)
        elif call == "complete":
            await ledger.complete(claim, "result")
        elif call == "release":
            await ledger.release(claim, "error")
        elif call == "quarantine":
            await ledger.quarantine(self._request(QuarantineReason.OUTCOME_UNKNOWN), claim)
        else:  # pragma: no cover - a typo in the suite
            raise AssertionError(call)


class TransactionalLedgerContract(LedgerContract):
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
    async def tledger(self, ledger: Ledger) -> TransactionalLedger:
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


__all__ = [
    "LedgerContract",
    "TransactionalLedgerContract",
    "acquire",
    "must_get",
    "shape",
]
