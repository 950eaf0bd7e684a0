"""Conformance suites for replay ledgers, one per role of :mod:`replaysafe.ledger.base`.

- :class:`LedgerContract`: the claim role (:class:`~replaysafe.ledger.base.Ledger`: the state
  machine, fencing, batches, effect-start marks);
- :class:`~replaysafe.testing.contracts.QuarantineStoreContract`,
  :class:`~replaysafe.testing.contracts.HandlerControlsContract`,
  :class:`~replaysafe.testing.contracts.LedgerAdminContract`: the other three roles;
- :class:`LedgerBackendContract`: all four, for a store playing every role (every built-in
  backend); :class:`~replaysafe.testing.contracts.TransactionalLedgerContract` adds the
  transactional boundary to it.

A backend is supported when it passes the suites of the roles it plays. Its test module
subclasses them (the class names carry no ``Test`` prefix, so pytest collects only the
subclasses)::

    class TestSQLiteLedger(TransactionalLedgerContract):
        async def make_ledger(self, clock: FakeClock) -> LedgerBackend:
            return SQLiteLedger(tmp_dir / f"{uuid4().hex}.db", clock=clock)

        def insert_sql(self) -> str:
            return "INSERT INTO rs_contract_effects (op, note) VALUES (?, ?)"

Rules for the subclass:

- ``make_ledger`` returns a new, *empty* ledger, isolated from every other test (the suite counts
  quarantine entries and purges globally). The ``ledger`` fixture calls it and closes the ledger.
- Time moves only through :meth:`LedgerFixtures.advance`. The default moves the ``FakeClock``
  handed to ``make_ledger``; a backend that judges leases by its database's clock overrides it with
  a real sleep. The suites therefore use short leases (:attr:`LedgerFixtures.lease`) and advance
  only a little past them, and never assert exact timestamps, only their order.
"""

from __future__ import annotations

import itertools

import pytest

from replaysafe.errors import (
    LeaseLost,
    LedgerDataError,
)
from replaysafe.ledger.base import (
    Acquired,
    AlreadyDone,
    Claim,
    ClaimRequest,
    Conflict,
    InFlight,
    LedgerBackend,
    OpKey,
    Quarantined,
    Record,
    State,
)
from replaysafe.quarantine import QuarantineReason
from replaysafe.testing import FakeClock
from replaysafe.testing.contracts._ledger_base import (
    FP,
    HOSTILE,
    HOSTILE_BODY,
    HOSTILE_STORED,
    KEY,
    OTHER_FP,
    LedgerFixtures,
    acquire,
    must_get,
    shape,
)
from replaysafe.testing.contracts.admin import LedgerAdminContract
from replaysafe.testing.contracts.controls import HandlerControlsContract
from replaysafe.testing.contracts.quarantine import QuarantineStoreContract


class LedgerBatchCases(LedgerFixtures):
    """The claim role's batch forms and effect-start marks (``claim_many``, ``mark_started``,
    ``complete_many``): part of :class:`LedgerContract`."""

    async def test_claim_many_equals_the_single_form(
        self, ledger: LedgerBackend, clock: FakeClock
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

    async def test_a_takeover_learns_whether_the_previous_holder_started_its_effect(
        self, ledger: LedgerBackend, clock: FakeClock
    ) -> None:
        started, unstarted = OpKey("orders", "started"), OpKey("orders", "unstarted")
        unmarked, released = OpKey("orders", "unmarked"), OpKey("orders", "released")
        s = await self._claim_marking(ledger, started)
        await self._claim_marking(ledger, unstarted)
        await acquire(ledger, unmarked, self.lease)  # claimed without marks_start
        await ledger.release(await self._claim_marking(ledger, released))
        assert (await must_get(ledger, unstarted)).unstarted_attempt == 1
        assert (await must_get(ledger, unmarked)).unstarted_attempt is None
        assert await ledger.mark_started([s]) == [s]
        assert (await must_get(ledger, started)).unstarted_attempt is None
        await self.expire(clock)
        # read back on recovery, whatever the new claim itself declares (the single form too)
        [a, b] = await ledger.claim_many(
            [
                ClaimRequest(started, FP, "w2", self.lease, True),
                ClaimRequest(unstarted, FP, "w2", self.lease),
            ]
        )
        c = await ledger.claim(unmarked, FP, "w2", self.lease)
        d = await ledger.claim(released, FP, "w2", self.lease)
        assert isinstance(a, Acquired) and isinstance(b, Acquired), (a, b)
        assert isinstance(c, Acquired) and isinstance(d, Acquired), (c, d)
        assert (a.claim.recovered, a.claim.previous_started, a.claim.attempt) == (True, True, 2)
        assert (b.claim.recovered, b.claim.previous_started, b.claim.attempt) == (True, False, 2)
        # never marked and never declared: it may have started (conservative)
        assert (c.claim.recovered, c.claim.previous_started) == (True, True)
        assert d.claim.recovered is False
        # the takeover's own attempt is "not started" only when nothing before it may have
        # started and it declared marks_start
        assert (await must_get(ledger, started)).unstarted_attempt is None
        assert (await must_get(ledger, unstarted)).unstarted_attempt is None
        e = await ledger.claim_many(
            [ClaimRequest(unstarted, FP, "w3", self.lease, True)]
        )  # not expired: in flight
        assert isinstance(e[0], InFlight)

    async def test_an_attempt_that_may_have_started_is_never_forgotten(
        self, ledger: LedgerBackend, clock: FakeClock
    ) -> None:
        """Attempt 1 marked its effect started and died; attempt 2 took over and died before
        marking (before it could even quarantine). Attempt 3 must still learn that an earlier
        effect may have happened: reading only attempt 2 would re-run a charge that happened."""
        first = await self._claim_marking(ledger, KEY)
        await ledger.mark_started([first])
        await self.expire(clock)
        second = await self._claim_marking(ledger, KEY, owner="w2")
        assert (second.recovered, second.previous_started) == (True, True)
        await self.expire(clock)
        [third] = await ledger.claim_many([ClaimRequest(KEY, FP, "w3", self.lease, True)])
        assert isinstance(third, Acquired)
        assert (third.claim.attempt, third.claim.recovered, third.claim.previous_started) == (
            3, True, True
        )  # fmt: skip
        # while a chain of attempts that never started stays re-runnable
        other = OpKey("orders", "never-started")
        await self._claim_marking(ledger, other)
        await self.expire(clock)
        again = await self._claim_marking(ledger, other, owner="w2")
        await self.expire(clock)
        [last] = await ledger.claim_many([ClaimRequest(other, FP, "w3", self.lease, True)])
        assert isinstance(last, Acquired) and again.previous_started is False
        assert (last.claim.attempt, last.claim.previous_started) == (3, False)

    async def test_mark_started_is_fenced_per_claim(
        self, ledger: LedgerBackend, clock: FakeClock
    ) -> None:
        old = await self._claim_marking(ledger, KEY)
        await self.expire(clock)
        new = await self._claim_marking(ledger, KEY, owner="w2")
        other = await self._claim_marking(ledger, OpKey("orders", "other"))
        [lost] = await ledger.mark_started([old])
        assert isinstance(lost, LeaseLost)
        assert (await must_get(ledger, KEY)).unstarted_attempt == 2  # the stale mark wrote nothing
        out = await ledger.mark_started([old, other, new, other])
        assert isinstance(out[0], LeaseLost) and out[1:] == [other, new, other]
        assert (await must_get(ledger, KEY)).unstarted_attempt is None
        await ledger.complete(other)  # a claim whose attempt ended is stale too
        [done] = await ledger.mark_started([other])
        assert isinstance(done, LeaseLost)
        assert await ledger.mark_started([]) == []

    async def test_a_marking_claim_completes_to_the_record_get_returns(
        self, ledger: LedgerBackend
    ) -> None:
        """``complete`` returns the record as stored also for a claim made with
        ``marks_start`` (marked or not): ``get`` reads the same record back."""
        for op, mark in (("never-marked", False), ("marked", True)):
            claim = await self._claim_marking(ledger, OpKey("orders", op))
            if mark:
                await ledger.mark_started([claim])
            done = await ledger.complete(claim, "r")
            assert await ledger.get(claim.key) == done
        claim = await self._claim_marking(ledger, OpKey("orders", "batch"))
        [in_batch] = await ledger.complete_many([(claim, "r")])
        assert await ledger.get(claim.key) == in_batch

    async def test_complete_many_equals_the_single_form(
        self, ledger: LedgerBackend, clock: FakeClock
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


class LedgerContract(LedgerBatchCases):
    """Behaviour every :class:`~replaysafe.ledger.base.Ledger` (the claim role) must show: the
    state machine in :mod:`replaysafe.ledger.base`, fencing, and (:class:`LedgerBatchCases`)
    batches and marks."""

    async def test_unknown_operation_has_no_record(self, ledger: LedgerBackend) -> None:
        assert await ledger.get(KEY) is None

    async def test_first_claim_is_acquired_with_attempt_one_and_a_token(
        self, ledger: LedgerBackend
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
        self, ledger: LedgerBackend
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
        self, ledger: LedgerBackend, clock: FakeClock
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
        self, ledger: LedgerBackend, clock: FakeClock
    ) -> None:
        first = await acquire(ledger, KEY, self.lease)
        assert isinstance(await ledger.claim(KEY, FP, "w2", self.lease), InFlight)
        await ledger.release(first, "transient")
        await acquire(ledger, KEY, self.lease, owner="w2")
        await self.expire(clock)
        third = await acquire(ledger, KEY, self.lease, owner="w3")
        assert third.attempt == 3
        assert (await must_get(ledger, KEY)).attempts == 3

    @pytest.mark.parametrize("call", ["extend", "complete", "release", "quarantine"])
    async def test_stale_token_is_fenced_and_changes_nothing(
        self, ledger: LedgerBackend, clock: FakeClock, call: str
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
        self, ledger: LedgerBackend, ended_by: str, call: str
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
        self, ledger: LedgerBackend, clock: FakeClock
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
        self, ledger: LedgerBackend, clock: FakeClock
    ) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        await self.expire(clock)
        assert (await ledger.complete(claim)).state is State.COMPLETED

    async def test_extend_keeps_the_lease_alive_past_its_first_end(
        self, ledger: LedgerBackend, clock: FakeClock
    ) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        await self.advance(clock, self.lease * 0.6)
        extended = await ledger.extend(claim, self.lease)
        assert extended.lease_until > claim.lease_until
        await self.advance(clock, self.lease * 0.6)  # past the first lease, inside the new one
        assert isinstance(await ledger.claim(KEY, FP, "w2", self.lease), InFlight)
        await self.expire(clock)
        assert isinstance(await ledger.claim(KEY, FP, "w2", self.lease), Acquired)

    async def test_completed_operation_is_already_done_with_its_result(
        self, ledger: LedgerBackend, clock: FakeClock
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

    async def test_released_operation_is_claimable_at_once(self, ledger: LedgerBackend) -> None:
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

    @pytest.mark.parametrize(
        "state", ["in_flight", "expired", "completed", "released", "quarantined"]
    )
    async def test_different_fingerprint_conflicts_on_every_path(
        self, ledger: LedgerBackend, clock: FakeClock, state: str
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

    async def test_error_text_from_outside_is_stored_escaped_on_the_operation(
        self, ledger: LedgerBackend
    ) -> None:
        first = await acquire(ledger, KEY, self.lease)
        await ledger.release(first, f"handler raised {HOSTILE}")
        record = await must_get(ledger, KEY)
        assert (record.state, record.last_error) == (
            State.RELEASED,
            f"handler raised {HOSTILE_STORED}",
        )
        second = await acquire(ledger, KEY, self.lease, owner="w2")
        assert second.attempt == 2
        request = self._request(
            QuarantineReason.MAX_ATTEMPTS,
            attempts=2,
            detail=HOSTILE,
            message=HOSTILE_BODY,
            content_type=HOSTILE,
        )
        entry = await ledger.quarantine(request, second)
        assert (entry.first_detail, entry.content_type) == (HOSTILE_STORED, HOSTILE_STORED)
        record = await must_get(ledger, KEY)
        assert (record.state, record.last_error) == (State.QUARANTINED, HOSTILE_STORED)
        await ledger.redrive(entry.id)
        third = await acquire(ledger, KEY, self.lease, owner="w3")
        assert (await ledger.complete(third, "done")).state is State.COMPLETED

    @pytest.mark.parametrize("bad", ["op\x00nul", "op\udcff", "op\ud800"])
    async def test_a_key_the_store_cannot_hold_is_refused_as_data_never_as_an_outage(
        self, ledger: LedgerBackend, bad: str
    ) -> None:
        """Keys and results are stored verbatim, never escaped (an escape could make two keys
        one). A store that cannot hold one (PostgreSQL: NUL, lone surrogates; SQLite: lone
        surrogates) refuses the call with ``LedgerDataError`` and writes nothing; the others
        hold it exactly. Never ``LedgerUnavailable``: retrying cannot help."""
        key = OpKey(KEY.scope, bad)
        try:
            outcome = await ledger.claim(key, FP, "w1", self.lease)
        except LedgerDataError:
            assert (await ledger.summary()).by_state == {}
        else:
            assert isinstance(outcome, Acquired), outcome
            assert outcome.claim.key == key
            assert (await must_get(ledger, key)).key == key
        # a result with the same characters, on a key every store holds
        claim = await acquire(ledger, KEY, self.lease)
        try:
            done = await ledger.complete(claim, bad)
        except LedgerDataError:
            # nothing written: the claim is still current and completes with a storable result
            assert (await must_get(ledger, KEY)).state is State.IN_FLIGHT
            assert (await ledger.complete(claim, "ok")).result == "ok"
        else:
            assert done.result == bad
            assert (await must_get(ledger, KEY)).result == bad

    async def test_tokens_strictly_increase_across_operations(
        self, ledger: LedgerBackend, clock: FakeClock
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

    async def test_scopes_are_a_composite_key(self, ledger: LedgerBackend) -> None:
        left, right = OpKey("a:b", "c"), OpKey("a", "b:c")
        l_claim = await acquire(ledger, left, self.lease)
        r_claim = await acquire(ledger, right, self.lease)  # would be InFlight if they collided
        await ledger.complete(l_claim, "left")
        assert (await must_get(ledger, right)).state is State.IN_FLIGHT
        assert (await ledger.complete(r_claim, "right")).result == "right"
        assert (await must_get(ledger, left)).result == "left"

    async def test_same_operation_id_in_two_scopes_is_two_operations(
        self, ledger: LedgerBackend
    ) -> None:
        billing, shipping = OpKey("billing", "order-9"), OpKey("shipping", "order-9")
        b = await acquire(ledger, billing, self.lease)
        s = await acquire(ledger, shipping, self.lease, fingerprint=OTHER_FP)  # no Conflict
        await ledger.release(b, "retry")
        assert (await must_get(ledger, billing)).state is State.RELEASED
        assert (await must_get(ledger, shipping)).state is State.IN_FLIGHT
        assert (await must_get(ledger, shipping)).token == s.token


class LedgerBackendContract(
    LedgerContract, QuarantineStoreContract, HandlerControlsContract, LedgerAdminContract
):
    """Every role's suite, for a :class:`~replaysafe.ledger.base.LedgerBackend` (one store
    playing all four roles, as every built-in backend does)."""
