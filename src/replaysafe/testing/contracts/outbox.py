"""``OutboxStoreContract``: the conformance suite every outbox store passes.

A backend's test module subclasses it (with a ``Test`` prefix so pytest collects it)::

    class TestSQLiteOutbox(OutboxStoreContract):
        async def make_store(self, clock: FakeClock) -> tuple[TransactionalLedger, OutboxStore]:
            ledger = SQLiteLedger(tmp / "ledger.db", clock=clock)
            return ledger, SQLiteOutboxStore(ledger)

Rules for the subclass:

- ``make_store`` returns a *new, empty* ledger and the store living in its database, isolated from
  every other test; the store must stamp times with ``clock`` (the suite moves it to test ages
  and retention, never sleeping). The ``outbox`` fixture migrates the store, creates the business
  table and closes both afterwards.
- The business table is :meth:`OutboxStoreContract.business_table` (qualify it with the test's
  schema where tables are shared) and statements use :attr:`OutboxStoreContract.placeholder`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import pytest_asyncio

from replaysafe.brokers.memory import MemoryBroker
from replaysafe.envelope import BYTES, TEXT, Envelope, Limits, decode_wire, fingerprint_bytes
from replaysafe.errors import BadInput, ConfigurationError, FingerprintMismatch, PayloadTooLarge
from replaysafe.ledger.base import TransactionalLedger
from replaysafe.outbox.base import OutboxRow, OutboxState, OutboxStore, Skip
from replaysafe.testing import FakeClock

__all__ = ["OutboxCase", "OutboxStoreContract"]

DEST = "order-events"


class Rollback(Exception):
    """Raised inside a transaction to roll it back."""


@dataclass
class OutboxCase:
    """One case's world: the clock, the ledger and the store in its database."""

    contract: OutboxStoreContract
    clock: FakeClock
    ledger: TransactionalLedger
    store: OutboxStore

    async def stage(
        self, *envelopes: Envelope, destination: str = DEST, note: str | None = None
    ) -> None:
        """Stage ``envelopes`` (and a business row when ``note`` is given) in one transaction."""
        async with self.ledger.transaction() as tx:
            if note is not None:
                await tx.execute(self.contract.insert_sql(), (envelopes[0].operation_id, note))
            await self.store.stage(tx, destination, list(envelopes))

    async def business_rows(self) -> list[tuple[Any, ...]]:
        async with self.ledger.transaction() as tx:
            rows = await tx.fetchall(
                f"SELECT op, note FROM {self.contract.business_table()} ORDER BY op"
            )
        return [tuple(r) for r in rows]

    async def claim_all(self, limit: int, **kwargs: Any) -> list[OutboxRow]:
        """Claim one batch and mark it published; the rows claimed."""
        async with self.store.claim(limit, owner="contract", **kwargs) as batch:
            assert batch.active
            rows = list(batch.rows)
            await batch.mark_published([r.id for r in rows])
        return rows


def event(n: int | str, *, key: str | None = None, **extra: Any) -> Envelope:
    return Envelope.of(f"order-event:{n}", {"n": n, **extra}, key=key)


class OutboxStoreContract:
    """Behaviour every :class:`~replaysafe.outbox.base.OutboxStore` must show."""

    placeholder: ClassVar[str] = "?"

    async def make_store(self, clock: FakeClock) -> tuple[TransactionalLedger, OutboxStore]:
        """A new, empty transactional ledger and the outbox store in its database, stamping times
        with ``clock``."""
        raise NotImplementedError

    def business_table(self) -> str:
        """Name of the business table ``(op, note)`` the suite writes beside outbox rows."""
        return "rs_outbox_contract_effects"

    def insert_sql(self) -> str:
        p = self.placeholder
        return f"INSERT INTO {self.business_table()} (op, note) VALUES ({p}, {p})"

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest_asyncio.fixture
    async def outbox(self, clock: FakeClock) -> AsyncIterator[OutboxCase]:
        ledger, store = await self.make_store(clock)
        try:
            await store.migrate()
            await store.migrate()  # idempotent
            async with ledger.transaction() as tx:
                await tx.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.business_table()} "
                    "(op TEXT NOT NULL, note TEXT NOT NULL)"
                )
            yield OutboxCase(self, clock, ledger, store)
        finally:
            await store.close()
            await ledger.close()

    # ------------------------------------------------------------------ staging and visibility

    async def test_staged_rows_commit_with_the_business_row(self, outbox: OutboxCase) -> None:
        a, b = event(1, key="order-1"), event(2, key="order-2")
        await outbox.stage(a, b, note="charged")
        rows = await outbox.store.fetch_pending(10)
        assert [(r.operation_id, r.key, r.destination) for r in rows] == [
            (a.operation_id, "order-1", DEST),
            (b.operation_id, "order-2", DEST),
        ]
        assert all(r.state is OutboxState.PENDING and r.published_at_broker is None for r in rows)
        assert rows[0].id < rows[1].id
        assert await outbox.business_rows() == [(a.operation_id, "charged")]
        assert await outbox.store.pending_count() == 2

    async def test_rolled_back_transaction_leaves_no_row(self, outbox: OutboxCase) -> None:
        with pytest.raises(Rollback):
            async with outbox.ledger.transaction() as tx:
                await tx.execute(self.insert_sql(), ("order-event:1", "charged"))
                await outbox.store.stage(tx, DEST, [event(1, key="k")])
                raise Rollback
        assert await outbox.store.fetch_pending(10) == []
        assert await outbox.store.pending_count() == 0
        assert await outbox.store.oldest_pending_age() is None
        assert await outbox.business_rows() == []
        async with outbox.store.claim(10, owner="contract") as batch:
            assert batch.rows == []

    @pytest.mark.parametrize("outcome", ["commit", "rollback"])
    async def test_uncommitted_rows_are_never_visible_to_a_reader(
        self, outbox: OutboxCase, outcome: str
    ) -> None:
        staged, looked = asyncio.Event(), asyncio.Event()

        async def writer() -> None:
            with contextlib.suppress(Rollback):
                async with outbox.ledger.transaction() as tx:
                    await outbox.store.stage(tx, DEST, [event(1, key="k")])
                    staged.set()
                    # the transaction stays open until the reader answered or is known to wait
                    await asyncio.wait_for(looked.wait(), 30.0)
                    if outcome == "rollback":
                        raise Rollback

        async def reader() -> tuple[list[OutboxRow] | None, list[OutboxRow]]:
            await staged.wait()
            # a store may answer at once (MVCC: nothing committed yet) or wait for the writer
            # (SQLite: one connection); it must never see the uncommitted row
            read = asyncio.ensure_future(outbox.store.fetch_pending(10))
            done, _ = await asyncio.wait({read}, timeout=0.5)
            early = read.result() if done else None
            looked.set()
            return early, await read

        _, (early, late) = await asyncio.gather(writer(), reader())
        if early is not None:  # answered while the writer's transaction was open
            assert early == []
        else:  # waited for the writer: sees its outcome
            assert [r.operation_id for r in late] == (
                ["order-event:1"] if outcome == "commit" else []
            )
        expected = ["order-event:1"] if outcome == "commit" else []
        assert [r.operation_id for r in await outbox.store.fetch_pending(10)] == expected

    async def test_stage_refuses_what_a_consumer_would_quarantine_before_writing(
        self, outbox: OutboxCase
    ) -> None:
        good = event(1, key="k")
        forged = Envelope(
            "order-event:2", b'{"n":2}', {"n": 2}, fingerprint_bytes(b"other"), key="k"
        )
        async with outbox.ledger.transaction() as tx:
            with pytest.raises(FingerprintMismatch):
                await outbox.store.stage(tx, DEST, [good, forged])
            with pytest.raises(ConfigurationError):
                await outbox.store.stage(tx, "", [good])
            with pytest.raises(ConfigurationError):
                await outbox.store.stage(tx, DEST, good)  # type: ignore[arg-type]
        # the transaction committed, but nothing of a refused call was written
        assert await outbox.store.fetch_pending(10) == []

    async def test_stage_applies_the_stores_limits(self, outbox: OutboxCase) -> None:
        saved = outbox.store.limits
        outbox.store.limits = Limits(max_payload_bytes=64)
        try:
            async with outbox.ledger.transaction() as tx:
                with pytest.raises(PayloadTooLarge):
                    await outbox.store.stage(tx, DEST, [event(1, pad="x" * 100)])
                with pytest.raises(BadInput):
                    await outbox.store.stage(
                        tx, DEST, [Envelope("op-1", b"\x80\x81", None, fingerprint_bytes(b""))]
                    )
        finally:
            outbox.store.limits = saved
        assert await outbox.store.pending_count() == 0

    async def test_stage_refuses_a_foreign_transaction(self, outbox: OutboxCase) -> None:
        with pytest.raises(ConfigurationError):
            await outbox.store.stage(object(), DEST, [event(1)])

    # ------------------------------------------------------------------ order

    async def test_order_per_key_is_kept_across_transactions_and_batches(
        self, outbox: OutboxCase
    ) -> None:
        staged: list[Envelope] = []
        for t in range(4):  # interleaved keys over several transactions
            batch = [event(f"{t}-{i}", key=f"k{i % 3}") for i in range(5)]
            staged += batch
            await outbox.stage(*batch)
        published: list[OutboxRow] = []
        for _ in range(20):
            rows = await outbox.claim_all(3)
            if not rows:
                break
            assert len(rows) <= 3
            published += rows
        assert [r.operation_id for r in published] == [e.operation_id for e in staged]
        ids = [r.id for r in published]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        for key in ("k0", "k1", "k2"):
            assert [r.operation_id for r in published if r.key == key] == [
                e.operation_id for e in staged if e.key == key
            ]
        assert await outbox.store.pending_count() == 0

    async def test_fetch_pending_is_in_sequence_order_and_bounded(self, outbox: OutboxCase) -> None:
        await outbox.stage(*[event(i, key="k") for i in range(5)])
        rows = await outbox.store.fetch_pending(3)
        assert [r.operation_id for r in rows] == [f"order-event:{i}" for i in range(3)]
        with pytest.raises(ConfigurationError):
            await outbox.store.fetch_pending(0)

    async def test_claim_leaves_out_what_the_relay_skips(self, outbox: OutboxCase) -> None:
        await outbox.stage(event(1, key="a"), event(2, key="b"), event(3), event(4, key="a"))
        await outbox.stage(event(5, key="x"), destination="other")
        ids = {r.operation_id: r.id for r in await outbox.store.fetch_pending(10)}
        skip = Skip(
            destinations=frozenset({"other"}),
            keys=frozenset({(DEST, "a")}),
            row_ids=frozenset({ids["order-event:3"]}),
        )
        async with outbox.store.claim(10, owner="contract", skip=skip) as batch:
            assert [r.operation_id for r in batch.rows] == ["order-event:2"]
        # skipping a key never lets its later rows through; without the skip everything comes back
        async with outbox.store.claim(10, owner="contract") as batch:
            assert [r.operation_id for r in batch.rows] == [f"order-event:{i}" for i in range(1, 6)]

    async def test_claim_ending_in_an_exception_leaves_its_rows_pending(
        self, outbox: OutboxCase
    ) -> None:
        await outbox.stage(event(1, key="k"), event(2, key="k"))
        with pytest.raises(Rollback):
            async with outbox.store.claim(10, owner="contract") as batch:
                await batch.mark_published([r.id for r in batch.rows][:1])
                raise Rollback  # as a relay crashing before its claim ended
        # a store with a claim transaction rolled the mark back; one without marked row 1 only:
        # either way nothing unpublished was lost and the order is intact
        left = [r.operation_id for r in await outbox.store.fetch_pending(10)]
        assert left in (["order-event:1", "order-event:2"], ["order-event:2"])

    # ------------------------------------------------------------------ marks

    async def test_mark_published_is_idempotent_and_keeps_the_first_mark(
        self, outbox: OutboxCase
    ) -> None:
        await outbox.stage(event(1, key="k"), event(2, key="k"))
        rows = await outbox.store.fetch_pending(10)
        first = outbox.clock.now()
        assert await outbox.store.mark_published([rows[0].id]) == 1
        outbox.clock.advance(100)
        assert await outbox.store.mark_published([rows[0].id]) == 0
        assert await outbox.store.mark_published([]) == 0
        assert [r.id for r in await outbox.store.fetch_pending(10)] == [rows[1].id]
        # the mark kept its first time: a cleanup just after it deletes the row
        assert await outbox.store.cleanup(first + 1, 10) == 1
        assert await outbox.store.mark_published([rows[0].id]) == 0  # gone: still harmless

    # ------------------------------------------------------------------ gauges

    async def test_pending_count_and_publish_lag(self, outbox: OutboxCase) -> None:
        store = outbox.store
        assert (await store.pending_count(), await store.oldest_pending_age()) == (0, None)
        await outbox.stage(event(1, key="k"))
        outbox.clock.advance(5)
        await outbox.stage(event(2, key="k"), event(3))
        outbox.clock.advance(2)
        assert await store.pending_count() == 3
        assert await store.oldest_pending_age() == pytest.approx(7.0, abs=1e-3)
        first = (await store.fetch_pending(1))[0]
        await store.mark_published([first.id])
        assert await store.pending_count() == 2
        assert await store.oldest_pending_age() == pytest.approx(2.0, abs=1e-3)

    # ------------------------------------------------------------------ cleanup

    async def test_cleanup_respects_retention_and_limit(self, outbox: OutboxCase) -> None:
        store, clock = outbox.store, outbox.clock
        await outbox.stage(*[event(f"early-{i}") for i in range(5)])
        await outbox.stage(event("pending-1"), event("pending-2"))
        await store.mark_published(
            [r.id for r in await store.fetch_pending(10) if "early" in r.operation_id]
        )
        early = clock.now()
        clock.advance(100)
        await outbox.stage(*[event(f"late-{i}") for i in range(3)])
        await store.mark_published(
            [r.id for r in await store.fetch_pending(10) if "late" in r.operation_id]
        )
        clock.advance(100)
        assert [await store.cleanup(early + 50, 2) for _ in range(4)] == [2, 2, 1, 0]
        assert await store.pending_count() == 2  # pending rows are never deleted
        assert await store.cleanup(clock.now() + 1, 10) == 3
        assert await store.cleanup(clock.now() + 1, 10) == 0
        assert [r.operation_id for r in await store.fetch_pending(10)] == [
            "order-event:pending-1",
            "order-event:pending-2",
        ]
        with pytest.raises(ConfigurationError):
            await store.cleanup(clock.now(), 0)

    # ------------------------------------------------------------------ the wire

    async def test_envelopes_round_trip_through_the_broker(self, outbox: OutboxCase) -> None:
        clock = outbox.clock
        sent = [
            Envelope.of(
                "capture:order-1", {"amount": 10, "note": "café"}, key="order-1",
                headers={"tenant": "acme", "trace": "t-1"},
            ),
            Envelope.of("capture:order-2", [1, 2.5, None], published_at=clock.now() - 30),
            Envelope("greet:1", b"hello", "hello", fingerprint_bytes(b"hello"), TEXT, "k-2"),
            Envelope("blob:1", b"\x00\xff", b"\x00\xff", fingerprint_bytes(b"\x00\xff"), BYTES),
        ]  # fmt: skip
        staged_at = clock.now()
        await outbox.stage(*sent)
        clock.advance(3)  # the publish happens later: the first publish time must not move
        rows = await outbox.store.fetch_pending(10)
        broker = MemoryBroker(clock=clock)
        for row in rows:
            assert row.staged_at == pytest.approx(staged_at, abs=1e-3)
            await broker.publish(row.destination, [row.envelope()])
        got = [
            decode_wire(m.body, m.headers, content_type=m.content_type, key=m.key)
            for m in broker.messages(DEST)
        ]
        assert len(got) == len(sent)
        for before, after in zip(sent, got, strict=True):
            assert after.operation_id == before.operation_id
            assert after.key == before.key
            assert dict(after.headers) == dict(before.headers)
            assert after.payload == before.payload
            assert after.value == before.value
            assert after.fingerprint == before.fingerprint
            assert after.content_type == before.content_type
            expected_at = before.published_at if before.published_at is not None else staged_at
            assert after.published_at == pytest.approx(expected_at, abs=1e-3)
        # reading the row again gives the same envelope: a republish is the same operation
        again = await outbox.store.fetch_pending(10)
        assert [r.envelope() for r in again] == [r.envelope() for r in rows]
