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
from dataclasses import replace
from typing import Any, ClassVar

import pytest
import pytest_asyncio

from replaysafe.errors import (
    ConfigurationError,
    LeaseLost,
    LedgerDataError,
    LedgerError,
    LedgerUnavailable,
    ReplaysafeError,
)
from replaysafe.ledger.base import (
    MAX_HANDLER_NAME,
    MAX_PAUSE_TEXT,
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
    QuarantineEntry,
    QuarantineRequest,
    Record,
    State,
    TransactionalLedger,
    storable_text,
)
from replaysafe.quarantine import EffectRisk, QuarantineReason
from replaysafe.testing import FakeClock

KEY = OpKey("orders", "capture-payment:order-1")
FP = "fp-a"
OTHER_FP = "fp-b"
#: text from outside that no store can hold verbatim: a NUL, a byte that was not UTF-8 (decoded
#: with surrogateescape, as the Kafka adapter decodes headers) and a lone surrogate
HOSTILE = "a\x00b\udcff\ud800c"
#: how every ledger stores it (``storable_text``): readable, and valid in every store
HOSTILE_STORED = "a\\x00b\\xff\\ud800c"
#: a message body with a NUL and bytes that are not UTF-8 (stored as bytes, exactly)
HOSTILE_BODY = b'\x00\xff\xfe{"a": "\x00"}'
#: a producer's publish time (exact in binary and in microseconds, so every store keeps it as is)
PUBLISHED_AT = 1_789_999_000.25


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

    # ------------------------------------------------------------------ inspect: one entry

    async def test_quarantine_entry_returns_what_quarantine_stored(self, ledger: Ledger) -> None:
        request = self._request(
            QuarantineReason.BEYOND_HORIZON,
            detail="published before the replay horizon",
            content_type="application/json",
            published_at=PUBLISHED_AT,
        )
        stored = await ledger.quarantine(request)
        entry = await ledger.quarantine_entry(request.entry_id())
        assert entry == stored
        assert entry is not None
        assert (entry.scope, entry.reason, entry.operation_id, entry.fingerprint) == (
            KEY.scope,
            QuarantineReason.BEYOND_HORIZON,
            KEY.operation_id,
            FP,
        )
        assert entry.published_at == pytest.approx(PUBLISHED_AT, abs=1e-3)
        assert request.message is not None
        assert (entry.message, entry.message_size, entry.truncated) == (
            request.message,
            len(request.message),
            False,
        )
        assert entry.content_type == "application/json"
        assert (entry.seen, entry.redrives, entry.redriven_at) == (1, 0, None)
        assert await ledger.quarantine_entry("no-such-entry") is None
        # a repeat of the message is the same entry: first publish time and size are kept
        again = await ledger.quarantine(request)
        assert await ledger.quarantine_entry(stored.id) == again
        assert (again.seen, again.published_at, again.message_size) == (
            2,
            entry.published_at,
            entry.message_size,
        )

    async def test_quarantine_entry_without_message_or_publish_time(self, ledger: Ledger) -> None:
        stored = await ledger.quarantine(
            self._request(QuarantineReason.NON_RETRYABLE_ERROR, message=None)
        )
        entry = await ledger.quarantine_entry(stored.id)
        assert entry == stored
        assert entry is not None
        assert (entry.message, entry.message_size, entry.truncated, entry.published_at) == (
            None,
            0,
            False,
            None,
        )

    @pytest.mark.parametrize("extra", [0, 1, MAX_QUARANTINE_COPY])
    async def test_quarantine_entry_says_when_the_message_copy_was_truncated(
        self, ledger: Ledger, extra: int
    ) -> None:
        body = bytes(range(256)) * (MAX_QUARANTINE_COPY // 256) + b"x" * extra
        stored = await ledger.quarantine(
            self._request(QuarantineReason.PAYLOAD_TOO_LARGE, message=body)
        )
        entry = await ledger.quarantine_entry(stored.id)
        assert entry is not None
        assert entry.message == body[:MAX_QUARANTINE_COPY]
        assert entry.message_size == len(body)
        assert entry.truncated is (extra > 0)
        (listed,) = await ledger.quarantined()
        assert (listed.message_size, listed.truncated) == (len(body), extra > 0)

    # ------------------------------------------------------------------ redrive

    async def test_redrive_releases_a_quarantined_operation_with_attempts_reset(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        first = await acquire(ledger, KEY, self.lease)
        await ledger.release(first, "transient")
        second = await acquire(ledger, KEY, self.lease, owner="w2")
        assert second.attempt == 2
        request = self._request(
            QuarantineReason.MAX_ATTEMPTS, attempts=2, detail="gave up", published_at=PUBLISHED_AT
        )
        entry = await ledger.quarantine(request, second)
        assert isinstance(await ledger.claim(KEY, FP, "w3", self.lease), Quarantined)
        await self.advance(clock, 0.05)

        redriven = await ledger.redrive(entry.id)
        assert (redriven.id, redriven.reason, redriven.seen) == (entry.id, entry.reason, 1)
        assert redriven.redrives == 1
        assert redriven.redriven_at is not None
        assert redriven.redriven_at >= entry.created_at
        # kept, so the caller can check the copy against the replay horizon before republishing
        assert redriven.published_at == pytest.approx(PUBLISHED_AT, abs=1e-3)
        assert await ledger.quarantine_entry(entry.id) == redriven
        record = await must_get(ledger, KEY)
        assert (record.state, record.attempts, record.lease_until) == (State.RELEASED, 0, None)
        assert (record.fingerprint, record.token) == (FP, second.token)

        # the republished copy is claimed afresh: first attempt, full retry budget
        outcome = await ledger.claim(KEY, FP, "w3", self.lease)
        assert isinstance(outcome, Acquired), outcome
        assert (outcome.claim.attempt, outcome.claim.recovered) == (1, False)
        assert outcome.claim.token > second.token

        # a second redrive is recorded too, and leaves the operation (now in flight) alone
        before = await must_get(ledger, KEY)
        again = await ledger.redrive(entry.id)
        assert again.redrives == 2
        assert again.redriven_at is not None and again.redriven_at >= redriven.redriven_at
        assert await ledger.get(KEY) == before
        assert (await ledger.complete(outcome.claim, "done")).state is State.COMPLETED

    @pytest.mark.parametrize(
        ("reason", "fingerprint", "answer"),
        [
            (QuarantineReason.BEYOND_HORIZON, FP, AlreadyDone),
            (QuarantineReason.KEY_REUSE_CONFLICT, OTHER_FP, Conflict),
        ],
    )
    async def test_redrive_leaves_a_completed_operation_completed(
        self,
        ledger: Ledger,
        reason: QuarantineReason,
        fingerprint: str,
        answer: type[ClaimOutcome],
    ) -> None:
        done = await ledger.complete(await acquire(ledger, KEY, self.lease), "receipt-1")
        entry = await ledger.quarantine(self._request(reason, fingerprint=fingerprint))
        redriven = await ledger.redrive(entry.id)
        assert (redriven.redrives, redriven.redriven_at is not None) == (1, True)
        assert await ledger.get(KEY) == done  # never re-opened: the copy is not re-run
        outcome = await ledger.claim(KEY, fingerprint, "w2", self.lease)
        assert isinstance(outcome, answer), outcome
        assert isinstance(outcome, AlreadyDone | Conflict)
        assert (outcome.record.state, outcome.record.result) == (State.COMPLETED, "receipt-1")

    async def test_redrive_of_bad_input_records_the_redrive_and_creates_no_operation(
        self, ledger: Ledger
    ) -> None:
        entry = await ledger.quarantine(
            QuarantineRequest("orders", QuarantineReason.MALFORMED_PAYLOAD, message=b"{not json")
        )
        redriven = await ledger.redrive(entry.id)
        assert (redriven.operation_id, redriven.message, redriven.redrives) == (
            None,
            b"{not json",
            1,
        )
        assert (await ledger.summary()).by_state == {}

    async def test_redrive_of_an_unknown_entry_raises_and_changes_nothing(
        self, ledger: Ledger
    ) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        await ledger.quarantine(self._request(QuarantineReason.MAX_ATTEMPTS), claim)
        entries = await ledger.quarantined()
        record = await must_get(ledger, KEY)
        with pytest.raises(LedgerError, match="no-such-entry") as raised:
            await ledger.redrive("no-such-entry")
        # not a fencing or availability problem: retrying cannot help, the message says what can
        assert not isinstance(raised.value, LeaseLost | LedgerUnavailable), raised.value
        assert await ledger.quarantined() == entries
        assert await ledger.get(KEY) == record

    # ------------------------------------------------------------------ text from outside

    async def test_text_from_outside_is_stored_escaped_and_its_entry_round_trips(
        self, ledger: Ledger
    ) -> None:
        # a bad message as a plain producer can send it: every text field holds a NUL, a byte
        # that is not UTF-8 and a lone surrogate (PostgreSQL refused such a row: issue 13 #14)
        request = QuarantineRequest(
            scope=KEY.scope,
            reason=QuarantineReason.UNSUPPORTED_CONTENT_TYPE,
            detail=f"content type {HOSTILE} is not supported",
            message=HOSTILE_BODY,
            content_type=HOSTILE,
            identity=f"rs-operation-id={HOSTILE}",
            published_at=PUBLISHED_AT,
        )
        assert storable_text(HOSTILE) == HOSTILE_STORED
        entry = await ledger.quarantine(request)  # not LedgerUnavailable, not UnicodeEncodeError
        assert entry.id == request.entry_id()
        assert (entry.content_type, entry.first_detail, entry.last_detail) == (
            HOSTILE_STORED,
            f"content type {HOSTILE_STORED} is not supported",
            f"content type {HOSTILE_STORED} is not supported",
        )
        assert (entry.message, entry.message_size) == (HOSTILE_BODY, len(HOSTILE_BODY))
        assert await ledger.quarantine_entry(entry.id) == entry
        assert await ledger.quarantined() == [entry]
        assert await ledger.quarantined(reason=QuarantineReason.UNSUPPORTED_CONTENT_TYPE) == [entry]
        # the identity is never escaped into another one: these are three different messages
        for identity in (f"rs-operation-id={HOSTILE_STORED}", "rs-operation-id=a\x00b"):
            other = await ledger.quarantine(replace(request, identity=identity))
            assert other.id != entry.id
        again = await ledger.quarantine(request)
        assert (again.id, again.seen, again.content_type) == (entry.id, 2, HOSTILE_STORED)
        redriven = await ledger.redrive(entry.id)
        assert (redriven.redrives, redriven.message, redriven.content_type) == (
            1,
            HOSTILE_BODY,
            HOSTILE_STORED,
        )
        assert await ledger.purge_quarantine([entry.id]) == 1

    async def test_error_text_from_outside_is_stored_escaped_on_the_operation(
        self, ledger: Ledger
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

    async def test_pause_text_from_outside_is_stored_escaped(self, ledger: Ledger) -> None:
        await ledger.set_paused("charge", True, reason=HOSTILE, by=f"ops {HOSTILE}")
        state = (await ledger.paused())["charge"]
        assert (state.reason, state.by) == (HOSTILE_STORED, f"ops {HOSTILE_STORED}")

    @pytest.mark.parametrize("bad", ["op\x00nul", "op\udcff", "op\ud800"])
    async def test_a_key_the_store_cannot_hold_is_refused_as_data_never_as_an_outage(
        self, ledger: Ledger, bad: str
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

    # ------------------------------------------------------------------ purge_quarantine

    async def test_purge_quarantine_by_ids(self, ledger: Ledger, clock: FakeClock) -> None:
        a, b, c = await self._quarantine_some(ledger, clock, [QuarantineReason.MAX_ATTEMPTS] * 3)
        assert await ledger.purge_quarantine([a.id, c.id, "no-such-entry"]) == 2
        assert [e.id for e in await ledger.quarantined()] == [b.id]
        assert await ledger.quarantine_entry(a.id) is None
        assert await ledger.purge_quarantine([]) == 0  # no ids means nothing, never everything
        assert await ledger.purge_quarantine(["no-such-entry"]) == 0
        assert await ledger.purge_quarantine([a.id]) == 0  # already gone
        assert [e.id for e in await ledger.quarantined()] == [b.id]

    async def test_purge_quarantine_by_reason(self, ledger: Ledger, clock: FakeClock) -> None:
        bad, poison = QuarantineReason.MALFORMED_PAYLOAD, QuarantineReason.MAX_ATTEMPTS
        entries = await self._quarantine_some(ledger, clock, [bad, poison, bad, poison, bad])
        assert await ledger.purge_quarantine(reason=bad) == 3
        assert [e.id for e in await ledger.quarantined()] == [entries[1].id, entries[3].id]
        assert await ledger.purge_quarantine(reason=QuarantineReason.BEYOND_HORIZON) == 0
        assert len(await ledger.quarantined()) == 2

    async def test_purge_quarantine_older_than(self, ledger: Ledger, clock: FakeClock) -> None:
        old = await self._quarantine_some(ledger, clock, [QuarantineReason.MAX_ATTEMPTS] * 2)
        await self.advance(clock, 0.5)
        cutoff = ledger.now()
        await self.advance(clock, 0.5)
        (new,) = await self._quarantine_some(
            ledger, clock, [QuarantineReason.MAX_ATTEMPTS], prefix="new"
        )
        assert all(e.created_at < cutoff < new.created_at for e in old)
        assert await ledger.purge_quarantine(older_than=cutoff) == 2
        assert [e.id for e in await ledger.quarantined()] == [new.id]
        assert await ledger.purge_quarantine(older_than=cutoff) == 0

    async def test_purge_quarantine_respects_its_limit_oldest_first(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        entries = await self._quarantine_some(ledger, clock, [QuarantineReason.MAX_ATTEMPTS] * 5)
        ids = [e.id for e in entries]
        assert await ledger.purge_quarantine(limit=0) == 0
        assert await ledger.purge_quarantine(limit=2) == 2
        assert [e.id for e in await ledger.quarantined()] == ids[2:]
        assert await ledger.purge_quarantine(ids[::-1], limit=2) == 2  # oldest first, not by id
        assert [e.id for e in await ledger.quarantined()] == ids[4:]
        assert await ledger.purge_quarantine() == 1
        assert await ledger.quarantined() == []

    async def test_purge_quarantine_applies_every_filter_together(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        bad, poison = QuarantineReason.MALFORMED_PAYLOAD, QuarantineReason.MAX_ATTEMPTS
        o1, o2, o3 = await self._quarantine_some(ledger, clock, [bad, poison, bad])
        await self.advance(clock, 0.5)
        cutoff = ledger.now()
        await self.advance(clock, 0.5)
        (n1,) = await self._quarantine_some(ledger, clock, [bad], prefix="new")
        # o2: wrong reason; o3: not named; n1: too new. Only o1 matches all three.
        assert (
            await ledger.purge_quarantine([o1.id, o2.id, n1.id], reason=bad, older_than=cutoff) == 1
        )
        assert {e.id for e in await ledger.quarantined()} == {o2.id, o3.id, n1.id}
        assert await ledger.purge_quarantine(reason=bad, older_than=cutoff) == 1  # o3
        assert await ledger.purge_quarantine([o2.id, n1.id], reason=poison) == 1  # o2
        assert [e.id for e in await ledger.quarantined()] == [n1.id]

    async def test_purge_quarantine_leaves_operation_records_alone(self, ledger: Ledger) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        await ledger.quarantine(self._request(QuarantineReason.NON_RETRYABLE_ERROR), claim)
        done_key = OpKey("orders", "done")
        await ledger.complete(await acquire(ledger, done_key, self.lease), "r")
        records = [await must_get(ledger, KEY), await must_get(ledger, done_key)]
        assert await ledger.purge_quarantine() == 1
        assert await ledger.quarantined() == []
        assert [await ledger.get(KEY), await ledger.get(done_key)] == records
        # still quarantined: dropping the entry does not make the operation claimable again
        assert isinstance(await ledger.claim(KEY, FP, "w2", self.lease), Quarantined)

    # ------------------------------------------------------------------ summary

    async def test_summary_of_an_empty_ledger(self, ledger: Ledger) -> None:
        summary = await ledger.summary()
        assert summary.by_state == {}
        assert (summary.expired_leases, summary.oldest_in_flight_at) == (0, None)
        assert (summary.hot_operations, summary.quarantined_by_reason) == ([], {})
        assert summary.completed_last_hour == 0
        assert abs(summary.now - ledger.now()) < 5
        assert summary.approx_bytes is None or summary.approx_bytes >= 0

    async def test_summary_oldest_in_flight_is_the_claim_time_not_the_last_extend(
        self, ledger: Ledger, clock: FakeClock
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
        self, ledger: Ledger, clock: FakeClock
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

    # ------------------------------------------------------------------ mark_started

    async def _claim_marking(self, ledger: Ledger, key: OpKey, owner: str = "w1") -> Claim:
        """Claim ``key`` with ``marks_start`` (how the runtime claims for unkeyed effects)."""
        [outcome] = await ledger.claim_many([ClaimRequest(key, FP, owner, self.lease, True)])
        assert isinstance(outcome, Acquired), f"expected Acquired for {key}, got {outcome!r}"
        return outcome.claim

    async def test_a_takeover_learns_whether_the_previous_holder_started_its_effect(
        self, ledger: Ledger, clock: FakeClock
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
        self, ledger: Ledger, clock: FakeClock
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

    async def test_mark_started_is_fenced_per_claim(self, ledger: Ledger, clock: FakeClock) -> None:
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

    async def test_redrive_forgets_an_unstarted_attempt(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        claim = await self._claim_marking(ledger, KEY)
        entry = await ledger.quarantine(self._request(QuarantineReason.MAX_ATTEMPTS), claim)
        await ledger.redrive(entry.id)
        rec = await must_get(ledger, KEY)
        assert (rec.state, rec.attempts, rec.unstarted_attempt) == (State.RELEASED, 0, None)

    async def test_a_marking_claim_completes_to_the_record_get_returns(
        self, ledger: Ledger
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

    # ------------------------------------------------------------------ handler control

    async def test_no_handler_is_paused_in_a_new_ledger(self, ledger: Ledger) -> None:
        assert await ledger.paused() == {}

    async def test_pause_is_recorded_with_reason_and_author_and_resume_clears_it(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        await ledger.set_paused("charge", True, reason="provider outage", by="alice")
        [(name, state)] = (await ledger.paused()).items()
        assert name == state.handler == "charge"
        assert (state.reason, state.by) == ("provider outage", "alice")
        assert state.since > 0
        await self.advance(clock, 0.05)
        # pausing again replaces reason, author and time
        await ledger.set_paused("charge", True, reason="still down")
        again = (await ledger.paused())["charge"]
        assert (again.reason, again.by) == ("still down", "")
        assert again.since >= state.since
        await ledger.set_paused("charge", False)
        assert await ledger.paused() == {}
        await ledger.set_paused("charge", False)  # resuming a running handler changes nothing
        assert await ledger.paused() == {}

    async def test_pause_flags_are_per_handler_name(self, ledger: Ledger) -> None:
        names = ["a:b", "a", "b", "ünïcode ✓", "x" * MAX_HANDLER_NAME]
        for name in names:
            await ledger.set_paused(name, True, reason=f"r-{name[:10]}")
        await ledger.set_paused("a", False)
        got = await ledger.paused()
        assert sorted(got) == sorted(n for n in names if n != "a")
        assert all(got[n].reason == f"r-{n[:10]}" for n in got)

    async def test_pause_touches_no_operation(self, ledger: Ledger) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        before = await must_get(ledger, KEY)
        await ledger.set_paused(KEY.scope, True)
        # pausing is the workers' business (they stop fetching): the ledger still answers
        assert await must_get(ledger, KEY) == before
        assert (await ledger.complete(claim, "done")).state is State.COMPLETED
        other = OpKey(KEY.scope, "another")
        assert isinstance(await ledger.claim(other, FP, "w1", self.lease), Acquired)
        summary = await ledger.summary()
        assert sum(summary.by_state.values()) == 2

    async def test_pause_text_is_capped_and_bad_handler_names_are_refused(
        self, ledger: Ledger
    ) -> None:
        await ledger.set_paused("charge", True, reason="é" * MAX_PAUSE_TEXT, by="b" * 5000)
        state = (await ledger.paused())["charge"]
        assert state.reason == "é" * (MAX_PAUSE_TEXT // 2)  # cut between characters, not inside
        assert state.by == "b" * MAX_PAUSE_TEXT
        for bad in ["", "tab\there", "nul\x00", "x" * (MAX_HANDLER_NAME + 1)]:
            with pytest.raises(ConfigurationError, match="handler name"):
                await ledger.set_paused(bad, True)
        assert list(await ledger.paused()) == ["charge"]

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
        published_at: float | None = None,
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
            published_at=published_at,
        )

    async def _quarantine_some(
        self,
        ledger: Ledger,
        clock: FakeClock,
        reasons: list[QuarantineReason],
        prefix: str = "op",
    ) -> list[QuarantineEntry]:
        """One entry per reason (operations ``{prefix}-0`` …), created in this order."""
        entries = []
        for i, reason in enumerate(reasons):
            entries.append(
                await ledger.quarantine(self._request(reason, operation_id=f"{prefix}-{i}"))
            )
            await self.advance(clock, 0.01)
        return entries

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
