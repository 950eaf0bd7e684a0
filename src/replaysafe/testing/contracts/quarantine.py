"""The conformance suite of the quarantine role
(:class:`~replaysafe.ledger.base.QuarantineStore`)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from replaysafe.errors import (
    LeaseLost,
    LedgerError,
    LedgerUnavailable,
)
from replaysafe.ledger.base import (
    MAX_QUARANTINE_COPY,
    Acquired,
    AlreadyDone,
    ClaimOutcome,
    Conflict,
    LedgerBackend,
    OpKey,
    Quarantined,
    QuarantineRequest,
    State,
    storable_text,
)
from replaysafe.quarantine import EffectRisk, QuarantineReason
from replaysafe.testing import FakeClock
from replaysafe.testing.contracts._ledger_base import (
    FP,
    HOSTILE,
    HOSTILE_BODY,
    HOSTILE_STORED,
    KEY,
    OTHER_FP,
    PUBLISHED_AT,
    LedgerFixtures,
    acquire,
    must_get,
)


class QuarantineStoreContract(LedgerFixtures):
    """Behaviour every :class:`~replaysafe.ledger.base.QuarantineStore` must show: durable,
    idempotent entries, faithful copies, filters, redrive and purge."""

    async def test_quarantine_with_claim_quarantines_the_operation(
        self, ledger: LedgerBackend, clock: FakeClock
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

    async def test_quarantine_without_claim_leaves_the_record_alone(
        self, ledger: LedgerBackend
    ) -> None:
        await acquire(ledger, KEY, self.lease)
        before = await must_get(ledger, KEY)
        conflicting = self._request(QuarantineReason.KEY_REUSE_CONFLICT, fingerprint=OTHER_FP)
        entry = await ledger.quarantine(conflicting)
        assert entry.fingerprint == OTHER_FP
        assert await ledger.get(KEY) == before
        assert [e.id for e in await ledger.quarantined()] == [entry.id]

    async def test_quarantine_entries_are_idempotent_per_message(
        self, ledger: LedgerBackend, clock: FakeClock
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

    async def test_quarantined_message_copy_is_capped(self, ledger: LedgerBackend) -> None:
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
        self, ledger: LedgerBackend, clock: FakeClock
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
        self, ledger: LedgerBackend
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

    async def test_quarantine_entry_returns_what_quarantine_stored(
        self, ledger: LedgerBackend
    ) -> None:
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

    async def test_quarantine_entry_without_message_or_publish_time(
        self, ledger: LedgerBackend
    ) -> None:
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
        self, ledger: LedgerBackend, extra: int
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

    async def test_redrive_releases_a_quarantined_operation_with_attempts_reset(
        self, ledger: LedgerBackend, clock: FakeClock
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
        ledger: LedgerBackend,
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
        self, ledger: LedgerBackend
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
        self, ledger: LedgerBackend
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

    async def test_text_from_outside_is_stored_escaped_and_its_entry_round_trips(
        self, ledger: LedgerBackend
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

    async def test_purge_quarantine_by_ids(self, ledger: LedgerBackend, clock: FakeClock) -> None:
        a, b, c = await self._quarantine_some(ledger, clock, [QuarantineReason.MAX_ATTEMPTS] * 3)
        assert await ledger.purge_quarantine([a.id, c.id, "no-such-entry"]) == 2
        assert [e.id for e in await ledger.quarantined()] == [b.id]
        assert await ledger.quarantine_entry(a.id) is None
        assert await ledger.purge_quarantine([]) == 0  # no ids means nothing, never everything
        assert await ledger.purge_quarantine(["no-such-entry"]) == 0
        assert await ledger.purge_quarantine([a.id]) == 0  # already gone
        assert [e.id for e in await ledger.quarantined()] == [b.id]

    async def test_purge_quarantine_by_reason(
        self, ledger: LedgerBackend, clock: FakeClock
    ) -> None:
        bad, poison = QuarantineReason.MALFORMED_PAYLOAD, QuarantineReason.MAX_ATTEMPTS
        entries = await self._quarantine_some(ledger, clock, [bad, poison, bad, poison, bad])
        assert await ledger.purge_quarantine(reason=bad) == 3
        assert [e.id for e in await ledger.quarantined()] == [entries[1].id, entries[3].id]
        assert await ledger.purge_quarantine(reason=QuarantineReason.BEYOND_HORIZON) == 0
        assert len(await ledger.quarantined()) == 2

    async def test_purge_quarantine_older_than(
        self, ledger: LedgerBackend, clock: FakeClock
    ) -> None:
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
        self, ledger: LedgerBackend, clock: FakeClock
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
        self, ledger: LedgerBackend, clock: FakeClock
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

    async def test_purge_quarantine_leaves_operation_records_alone(
        self, ledger: LedgerBackend
    ) -> None:
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

    async def test_redrive_forgets_an_unstarted_attempt(
        self, ledger: LedgerBackend, clock: FakeClock
    ) -> None:
        claim = await self._claim_marking(ledger, KEY)
        entry = await ledger.quarantine(self._request(QuarantineReason.MAX_ATTEMPTS), claim)
        await ledger.redrive(entry.id)
        rec = await must_get(ledger, KEY)
        assert (rec.state, rec.attempts, rec.unstarted_attempt) == (State.RELEASED, 0, None)
