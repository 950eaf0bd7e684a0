"""The transactional outbox: SQLite and PostgreSQL stores pass the contract; the relay publishes
every committed row at least once, in order per key, and an effectively-once consumer applies each
exactly once whatever the relay went through."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from replaysafe import (
    BrokerUnavailable,
    Context,
    Effect,
    Envelope,
    Failpoints,
    Guarantee,
    PublishAmbiguous,
    RetryPolicy,
    SimulatedCrash,
    State,
)
from replaysafe import failpoints as fp
from replaysafe import observe as o
from replaysafe.brokers.base import Publisher
from replaysafe.brokers.memory import MemoryBroker
from replaysafe.envelope import HEADER_PUBLISHED_AT, decode_wire
from replaysafe.ledger.base import Acquired, OpKey, TransactionalLedger
from replaysafe.ledger.sqlite import SQLiteLedger
from replaysafe.outbox import OutboxStore, Relay, SQLiteOutboxStore
from replaysafe.testing import FakeClock
from replaysafe.testing.contracts import OutboxStoreContract

from .conftest import subprocess_env
from .runtime_harness import SOURCE, Harness

EO = Guarantee.EFFECTIVELY_ONCE
DEST = "order-events"


def event(n: int | str, *, key: str | None = None) -> Envelope:
    return Envelope.of(f"order-event:{n}", {"n": n, "order": f"order-{n}"}, key=key)


# ---------------------------------------------------------------------- contracts


class TestSQLiteOutbox(OutboxStoreContract):
    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> None:
        self.directory = tmp_path

    async def make_store(self, clock: FakeClock) -> tuple[TransactionalLedger, OutboxStore]:
        ledger = SQLiteLedger(self.directory / "ledger.db", clock=clock, synchronous="NORMAL")
        return ledger, SQLiteOutboxStore(ledger)


class TestPostgresOutbox(OutboxStoreContract):
    placeholder = "%s"

    @pytest.fixture(autouse=True)
    def _schema(self, pg_dsn: str, pg_schema: str) -> None:
        self.dsn, self.schema = pg_dsn, pg_schema

    def business_table(self) -> str:
        return f"{self.schema}.rs_outbox_contract_effects"

    async def make_store(self, clock: FakeClock) -> tuple[TransactionalLedger, OutboxStore]:
        from replaysafe.ledger.postgres import PostgresLedger
        from replaysafe.outbox import PostgresOutboxStore

        ledger = PostgresLedger(self.dsn, schema=self.schema, max_size=4)
        await ledger.migrate()
        return ledger, PostgresOutboxStore(ledger, clock=clock)


class TestPostgresOutboxOwnPool(TestPostgresOutbox):
    """The same table reached through the store's own pool (a service without a ledger)."""

    async def make_store(self, clock: FakeClock) -> tuple[TransactionalLedger, OutboxStore]:
        from replaysafe.ledger.postgres import PostgresLedger
        from replaysafe.outbox import PostgresOutboxStore

        ledger = PostgresLedger(self.dsn, schema=self.schema, max_size=4)
        await ledger.migrate()
        return ledger, PostgresOutboxStore(self.dsn, schema=self.schema, clock=clock)


# ---------------------------------------------------------------------- helpers


class Recorder(Publisher):
    """Publishes to a MemoryBroker and records every call (destination, operation ids, keys)."""

    def __init__(self, broker: MemoryBroker, delay: float = 0.0) -> None:
        self.broker = broker
        self.delay = delay
        self.calls: list[tuple[str, list[str], list[str | None]]] = []

    async def publish(self, destination: str, envelopes: Sequence[Envelope]) -> None:
        self.calls.append(
            (destination, [e.operation_id for e in envelopes], [e.key for e in envelopes])
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        await self.broker.publish(destination, envelopes)


@pytest_asyncio.fixture
async def sqlite_outbox(
    tmp_path: Path,
) -> AsyncIterator[tuple[SQLiteLedger, SQLiteOutboxStore, FakeClock]]:
    clock = FakeClock()
    ledger = SQLiteLedger(tmp_path / "producer.db", clock=clock, synchronous="NORMAL")
    store = SQLiteOutboxStore(ledger)
    await store.migrate()
    try:
        yield ledger, store, clock
    finally:
        await ledger.close()


async def stage(
    ledger: TransactionalLedger,
    store: OutboxStore,
    envelopes: Sequence[Envelope],
    destination: str = DEST,
) -> None:
    async with ledger.transaction() as tx:
        await store.stage(tx, destination, envelopes)


async def drain(relay: Relay, rounds: int = 100) -> int:
    """run_once until a pass publishes nothing (bounded)."""
    total = 0
    for _ in range(rounds):
        n = await relay.run_once()
        total += n
        if n == 0:
            return total
    raise AssertionError(f"the relay still had work after {rounds} passes")


def keyed_workload(n_keys: int, per_key: int) -> list[Envelope]:
    """Rows interleaved across keys: k0, k1, … k0, k1, …"""
    return [event(f"{k}-{i}", key=f"k{k}") for i in range(per_key) for k in range(n_keys)]


def first_seen(ops: Sequence[str | None]) -> list[str]:
    seen: dict[str, None] = {}
    for op in ops:
        if op is not None:
            seen.setdefault(op, None)
    return list(seen)


# ---------------------------------------------------------------------- relay: the happy path


async def test_relay_publishes_everything_once_in_order_per_key(
    sqlite_outbox: tuple[SQLiteLedger, SQLiteOutboxStore, FakeClock],
) -> None:
    ledger, store, clock = sqlite_outbox
    a = keyed_workload(6, 5)  # a hot-ish key has 5 rows: several waves per batch
    b = [event(f"b-{i}", key="hot" if i % 2 else None) for i in range(12)]
    for i in range(0, len(a), 7):
        await stage(ledger, store, a[i : i + 7])
    for i in range(0, len(b), 5):
        await stage(ledger, store, b[i : i + 5], destination="other-events")
    broker = MemoryBroker(clock=clock)
    publisher = Recorder(broker)
    relay = Relay(store, publisher, batch=7, clock=clock, failpoints=Failpoints())
    assert await drain(relay) == len(a) + len(b)
    assert broker.published(DEST) == [e.operation_id for e in a]  # no duplicate, same order
    assert Counter(broker.published("other-events")) == Counter(e.operation_id for e in b)
    for env_list, dest in ((a, DEST), (b, "other-events")):
        for key in {e.key for e in env_list if e.key is not None}:
            want = [e.operation_id for e in env_list if e.key == key]
            got = [m.operation_id for m in broker.messages(dest) if m.key == key]
            assert got == want, key
    # a publish call never carries two rows of one key: the later waits for the earlier's confirm
    for _, _, keys in publisher.calls:
        keyed = [k for k in keys if k is not None]
        assert len(keyed) == len(set(keyed))
    assert any(len(ops) > 1 for _, ops, _ in publisher.calls)  # and calls are real batches
    assert await store.pending_count() == 0
    assert relay.stats.total(o.OUTBOX_PUBLISHED) == len(a) + len(b)
    assert await relay.refresh_metrics() == (0, None)
    assert relay.stats.gauge(o.OUTBOX_PENDING) == 0.0
    assert relay.stats.gauge(o.OUTBOX_PUBLISH_LAG) == 0.0


async def test_relay_reports_pending_count_and_publish_lag(
    sqlite_outbox: tuple[SQLiteLedger, SQLiteOutboxStore, FakeClock],
) -> None:
    ledger, store, clock = sqlite_outbox
    await stage(ledger, store, [event(1, key="k"), event(2, key="k")])
    clock.advance(12)
    relay = Relay(store, MemoryBroker(clock=clock), clock=clock, failpoints=Failpoints())
    assert await relay.refresh_metrics() == (2, pytest.approx(12.0))
    assert relay.stats.gauge(o.OUTBOX_PENDING) == 2.0
    assert relay.stats.gauge(o.OUTBOX_PUBLISH_LAG) == pytest.approx(12.0)


# ---------------------------------------------------------------------- relay: crashes


async def test_relay_killed_between_publish_and_mark_duplicates_and_the_consumer_applies_once(
    tmp_path: Path,
) -> None:
    h = Harness()  # consumer side: memory broker, memory ledger, fake clock
    producer = SQLiteLedger(tmp_path / "producer.db", clock=h.clock, synchronous="NORMAL")
    store = SQLiteOutboxStore(producer)
    await store.migrate()
    orders = [event(i, key=f"customer-{i % 4}") for i in range(20)]
    for i in range(0, 20, 5):
        await stage(producer, store, orders[i : i + 5], destination=SOURCE)

    relay = Relay(store, h.broker, batch=8, clock=h.clock, failpoints=h.failpoints)
    h.failpoints.enable(fp.RELAY_AFTER_PUBLISH_BEFORE_MARK, "kill", times=1)
    with pytest.raises(SimulatedCrash):
        await relay.run_once()
    assert h.failpoints.fired[fp.RELAY_AFTER_PUBLISH_BEFORE_MARK] == 1
    crashed_batch = h.broker.published(SOURCE)
    assert len(crashed_batch) == 8  # published, never marked
    assert await store.pending_count() == 20  # nothing lost

    restarted = Relay(store, h.broker, batch=8, clock=h.clock, failpoints=h.failpoints)
    assert await restarted.run_once() == 0 and restarted.standby  # the dead relay's lease holds
    h.clock.advance(restarted.lease + 1)
    assert await drain(restarted) == 20
    copies = Counter(h.broker.published(SOURCE))
    assert set(copies) == {e.operation_id for e in orders}  # every row at least once
    assert {op for op, n in copies.items() if n == 2} == set(crashed_batch)  # the duplicates
    assert max(copies.values()) == 2
    # a duplicate is the same operation: same id, payload fingerprint and first publish time
    by_op: dict[str, list[Envelope]] = defaultdict(list)
    for m in h.broker.messages(SOURCE):
        by_op[m.operation_id or ""].append(decode_wire(m.body, m.headers, key=m.key))
    for op in crashed_batch:
        first, second = by_op[op]
        assert (first.fingerprint, first.published_at) == (second.fingerprint, second.published_at)
    # per-key order holds in first-publish order
    ops_by_key = {
        key: [e.operation_id for e in orders if e.key == key] for key in {e.key for e in orders}
    }
    for key, want in ops_by_key.items():
        got = first_seen([m.operation_id for m in h.broker.messages(SOURCE) if m.key == key])
        assert got == want

    # an effectively-once consumer applies each order exactly once
    async def charge(ctx: Context) -> str:
        return await h.probe.apply(ctx.payload["order"], ctx.payload["n"], ctx.idempotency_key)

    h.handler(EO, effect=Effect.keyed("payments"), lease=5)(charge)
    h.start(workers=2)
    await h.drain()
    await h.stop()
    assert h.probe.duplicates() == 0
    assert h.probe.missing(f"order-{i}" for i in range(20)) == set()
    assert h.total(o.DUPLICATE_HITS) + h.probe.replays_answered >= len(crashed_batch)
    await producer.close()


async def test_ambiguous_publish_is_retried_with_the_same_envelopes(
    sqlite_outbox: tuple[SQLiteLedger, SQLiteOutboxStore, FakeClock],
) -> None:
    ledger, store, clock = sqlite_outbox
    orders = [event(i, key=f"k{i % 2}") for i in range(6)]
    await stage(ledger, store, orders)
    fps = Failpoints()
    broker = MemoryBroker(clock=clock, failpoints=fps)
    # the broker stores order 3 and then the confirm is lost
    fps.enable(
        fp.PUBLISH_AFTER_ACCEPT,
        "raise",
        error=PublishAmbiguous("confirm lost"),
        when=lambda ctx: ctx["operation_id"] == "order-event:3",
        times=1,
    )
    relay = Relay(store, broker, clock=clock, failpoints=Failpoints(), retry_delay=0)
    assert await relay.run_once() == 6
    assert fps.fired[fp.PUBLISH_AFTER_ACCEPT] == 1
    assert relay.stats.total(o.PUBLISH_AMBIGUOUS, destination=DEST) == 1
    copies = Counter(broker.published(DEST))
    assert set(copies) == {e.operation_id for e in orders}  # not lost
    assert copies["order-event:3"] == 2  # retried: the broker holds two copies of one operation
    stamps = {
        m.headers[HEADER_PUBLISHED_AT]
        for m in broker.messages(DEST)
        if m.operation_id == "order-event:3"
    }
    assert len(stamps) == 1  # same first publish time on both copies
    assert await store.pending_count() == 0


async def test_a_failing_destination_stops_its_keys_and_backs_off_while_others_flow(
    sqlite_outbox: tuple[SQLiteLedger, SQLiteOutboxStore, FakeClock],
) -> None:
    ledger, store, clock = sqlite_outbox
    hot = [event(f"hot-{i}", key="hot") for i in range(3)]
    await stage(ledger, store, hot)
    await stage(ledger, store, [event("o-1", key="x"), event("o-2")], destination="other")
    fps = Failpoints()
    broker = MemoryBroker(clock=clock, failpoints=fps)
    # hot-1's publish never gets through (nothing stored): hot-2 must not overtake it
    fps.enable(
        fp.PUBLISH_BEFORE_ACCEPT,
        "raise",
        error=BrokerUnavailable("connection refused"),
        when=lambda ctx: ctx["operation_id"] == "order-event:hot-1",
    )
    relay = Relay(
        store, broker, clock=clock, failpoints=Failpoints(), retry_delay=0, poll_interval=1.0
    )
    assert await relay.run_once() == 3  # hot-0 and the other destination
    assert broker.published(DEST) == ["order-event:hot-0"]
    assert Counter(broker.published("other")) == Counter(["order-event:o-1", "order-event:o-2"])
    assert [r.operation_id for r in await store.fetch_pending(10)] == [
        "order-event:hot-1",
        "order-event:hot-2",
    ]
    assert relay.stats.total(o.OUTBOX_PUBLISH_FAILED, destination=DEST) == 1
    # backing off: the destination is not tried again before its backoff ends
    assert await relay.run_once() == 0
    assert fps.fired[fp.PUBLISH_BEFORE_ACCEPT] == 1
    fps.disable()
    clock.advance(1.5)
    assert await relay.run_once() == 2
    assert broker.published(DEST) == [e.operation_id for e in hot]


async def test_a_row_that_no_longer_decodes_blocks_only_its_key(
    sqlite_outbox: tuple[SQLiteLedger, SQLiteOutboxStore, FakeClock],
) -> None:
    ledger, store, clock = sqlite_outbox
    await stage(
        ledger, store, [event("a-0", key="a"), event("a-1", key="a"), event("b-0", key="b")]
    )
    await stage(ledger, store, [event("a-2", key="a"), event("c-0")])
    # someone edits a row by hand: its body no longer matches its fingerprint
    async with ledger.transaction() as tx:
        await tx.execute(
            "UPDATE replaysafe_outbox SET body = ? WHERE operation_id = ?",
            (b'{"n":"tampered"}', "order-event:a-1"),
        )
    broker = MemoryBroker(clock=clock)
    relay = Relay(store, broker, clock=clock, failpoints=Failpoints(), poll_interval=1.0)
    assert await relay.run_once() == 3
    assert broker.published(DEST) == ["order-event:a-0", "order-event:b-0", "order-event:c-0"]
    assert relay.stats.total(o.OUTBOX_BLOCKED) == 1
    assert await relay.run_once() == 0  # blocked key skipped while backing off
    async with ledger.transaction() as tx:  # the operator repairs the row
        await tx.execute(
            "UPDATE replaysafe_outbox SET body = ? WHERE operation_id = ?",
            (event("a-1").payload, "order-event:a-1"),
        )
    clock.advance(1.5)
    assert await relay.run_once() == 2
    assert broker.published(DEST)[3:] == ["order-event:a-1", "order-event:a-2"]


# ---------------------------------------------------------------------- transactional handler


async def test_transactional_handler_stages_events_with_its_business_row(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = SQLiteLedger(tmp_path / "ledger.db", clock=clock, synchronous="NORMAL")
    store = SQLiteOutboxStore(ledger)
    await store.migrate()
    async with ledger.transaction() as tx:
        await tx.execute("CREATE TABLE charges (order_id TEXT NOT NULL, amount INTEGER)")
    h = Harness(ledger=ledger, clock=clock)
    seen_on_retry: list[tuple[int, int, int]] = []

    async def book(ctx: Context) -> None:
        assert ctx.tx is not None
        order = ctx.payload["order"]
        if order == "order-2" and ctx.attempt == 2:
            # the failed first attempt left nothing behind, and the operation was claimable again
            (charges,) = await ctx.tx.fetchall(
                "SELECT COUNT(*) FROM charges WHERE order_id = ?", (order,)
            )
            (events,) = await ctx.tx.fetchall(
                "SELECT COUNT(*) FROM replaysafe_outbox WHERE operation_id = ?",
                (f"charged:{order}",),
            )
            seen_on_retry.append((ctx.attempt, charges[0], events[0]))
        await ctx.tx.execute("INSERT INTO charges VALUES (?, ?)", (order, ctx.payload["n"]))
        await store.stage(
            ctx.tx, DEST, [Envelope.of(f"charged:{order}", {"order": order}, key=order)]
        )
        if order == "order-2" and ctx.attempt == 1:
            raise RuntimeError("payment gateway said no (after the insert and the stage)")

    h.handler(
        EO,
        effect=Effect.transactional(),
        lease=5,
        retry=RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=0.2),
    )(book)
    await h.publish(event(1), event(2))
    h.start()
    await h.drain()
    await h.stop()
    assert seen_on_retry == [(2, 0, 0)]
    async with ledger.transaction() as tx:
        charges = await tx.fetchall("SELECT order_id, COUNT(*) FROM charges GROUP BY order_id")
    assert sorted(charges) == [("order-1", 1), ("order-2", 1)]
    rows = await store.fetch_pending(10)
    assert sorted(r.operation_id for r in rows) == ["charged:order-1", "charged:order-2"]
    for n in (1, 2):
        record = await ledger.get(OpKey(h.app.handlers["book"].scope, f"order-event:{n}"))
        assert record is not None and record.state is State.COMPLETED
    # and the relay publishes the staged events after the commit
    broker = MemoryBroker(clock=clock)
    assert await drain(Relay(store, broker, clock=clock, failpoints=Failpoints())) == 2
    assert sorted(broker.published(DEST)) == ["charged:order-1", "charged:order-2"]
    await ledger.close()


async def test_a_rolled_back_handler_transaction_leaves_the_operation_claimable(
    sqlite_outbox: tuple[SQLiteLedger, SQLiteOutboxStore, FakeClock],
) -> None:
    ledger, store, _ = sqlite_outbox
    key = OpKey("book", "order-event:9")
    outcome = await ledger.claim(key, "fp", "w1", 5.0)
    assert isinstance(outcome, Acquired)
    with pytest.raises(RuntimeError):
        async with ledger.transaction() as tx:
            await store.stage(tx, DEST, [event(9, key="k")])
            await ledger.complete_in(tx, outcome.claim, "done")
            raise RuntimeError("handler failed after staging")
    assert await store.pending_count() == 0
    record = await ledger.get(key)
    assert record is not None and record.state is State.IN_FLIGHT  # the completion rolled back
    await ledger.release(outcome.claim, "handler failed")
    assert isinstance(await ledger.claim(key, "fp", "w2", 5.0), Acquired)


# ---------------------------------------------------------------------- relay loop, lease, cleanup


async def test_relay_cleanup_deletes_published_rows_past_retention_in_bounded_batches(
    sqlite_outbox: tuple[SQLiteLedger, SQLiteOutboxStore, FakeClock],
) -> None:
    ledger, store, clock = sqlite_outbox
    relay = Relay(
        store,
        MemoryBroker(clock=clock),
        clock=clock,
        failpoints=Failpoints(),
        retention=3600,
        cleanup_batch=3,
        cleanup_batches=2,
    )
    await stage(ledger, store, [event(f"old-{i}") for i in range(8)])
    assert await drain(relay) == 8
    clock.advance(3000)
    await stage(ledger, store, [event("recent")])
    assert await drain(relay) == 1
    await stage(ledger, store, [event("pending")])
    assert await relay.cleanup() == 0  # nothing is past retention yet
    clock.advance(1000)  # old rows: 4000 s, recent: 1000 s
    assert await relay.cleanup() == 6  # bounded: 2 statements of 3 rows
    assert await relay.cleanup() == 2
    assert await relay.cleanup() == 0
    with sqlite3.connect(ledger.path) as conn:
        left = sorted(r[0] for r in conn.execute("SELECT operation_id FROM replaysafe_outbox"))
    assert left == ["order-event:pending", "order-event:recent"]


async def test_relay_loop_drains_and_stops_gracefully(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "p.db", synchronous="NORMAL")  # real clock
    store = SQLiteOutboxStore(ledger)
    await store.migrate()
    broker = MemoryBroker()
    relay = Relay(store, broker, batch=10, poll_interval=0.02, failpoints=Failpoints())
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        for i in range(5):
            await stage(ledger, store, [event(f"{i}-{j}", key=f"k{j}") for j in range(7)])
        deadline = time.monotonic() + 30
        while len(broker.published(DEST)) < 35:
            assert time.monotonic() < deadline, "the relay did not publish everything"
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert Counter(broker.published(DEST)) == Counter(
        f"order-event:{i}-{j}" for i in range(5) for j in range(7)
    )
    assert await store.pending_count() == 0
    assert relay.stats.gauge(o.OUTBOX_PENDING) is not None
    with sqlite3.connect(ledger.path) as conn:  # the clean stop released the relay lease
        assert conn.execute("SELECT relay_owner FROM replaysafe_outbox_meta").fetchone() == (None,)
    await ledger.close()


async def test_one_relay_per_sqlite_file_and_takeover_after_its_lease(
    sqlite_outbox: tuple[SQLiteLedger, SQLiteOutboxStore, FakeClock],
) -> None:
    ledger, store, clock = sqlite_outbox
    broker = MemoryBroker(clock=clock)
    a = Relay(store, broker, clock=clock, failpoints=Failpoints(), owner="a", lease=10)
    b = Relay(store, broker, clock=clock, failpoints=Failpoints(), owner="b", lease=10)
    await stage(ledger, store, [event(1, key="k")])
    assert await a.run_once() == 1
    await stage(ledger, store, [event(2, key="k")])
    assert await b.run_once() == 0 and b.standby  # a holds the lease
    clock.advance(11)  # a died silently: its lease runs out
    assert await b.run_once() == 1 and not b.standby
    await stage(ledger, store, [event(3, key="k")])
    assert await a.run_once() == 0 and a.standby
    await store.release("b")  # a clean stop hands over at once
    assert await a.run_once() == 1
    assert broker.published(DEST) == [f"order-event:{i}" for i in (1, 2, 3)]


# ---------------------------------------------------------------------- PostgreSQL


@pytest_asyncio.fixture
async def pg_outbox(pg_dsn: str, pg_schema: str) -> AsyncIterator[tuple[Any, Any]]:
    from replaysafe.ledger.postgres import PostgresLedger
    from replaysafe.outbox import PostgresOutboxStore

    ledger = PostgresLedger(pg_dsn, schema=pg_schema, max_size=6)
    await ledger.migrate()
    store = PostgresOutboxStore(ledger)
    await store.migrate()
    try:
        yield ledger, store
    finally:
        await store.close()
        await ledger.close()


async def test_two_postgres_relays_never_publish_a_row_twice(
    pg_dsn: str, pg_schema: str, pg_outbox: tuple[Any, Any]
) -> None:
    from replaysafe.ledger.postgres import PostgresLedger
    from replaysafe.outbox import PostgresOutboxStore

    ledger, store = pg_outbox
    orders = keyed_workload(60, 4)  # 240 rows, a key's rows 60 apart
    for i in range(0, len(orders), 40):
        await stage(ledger, store, orders[i : i + 40])
    broker = MemoryBroker()
    log: list[tuple[str, str]] = []  # (relay, operation id) in publish order

    class Tagged(Recorder):
        def __init__(self, name: str) -> None:
            super().__init__(broker, delay=0.005)
            self.name = name

        async def publish(self, destination: str, envelopes: Sequence[Envelope]) -> None:
            await super().publish(destination, envelopes)
            log.extend((self.name, e.operation_id) for e in envelopes)

    # the second relay has its own pool, as a second process would
    other_ledger = PostgresLedger(pg_dsn, schema=pg_schema, max_size=2)
    relays = [
        Relay(store, Tagged("r1"), batch=20, poll_interval=0.01, failpoints=Failpoints()),
        Relay(
            PostgresOutboxStore(other_ledger),
            Tagged("r2"),
            batch=20,
            poll_interval=0.01,
            failpoints=Failpoints(),
        ),
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r.run(stop)) for r in relays]
    try:
        deadline = time.monotonic() + 60
        while len(broker.published(DEST)) < len(orders):
            assert time.monotonic() < deadline, "the relays did not publish everything"
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await other_ledger.close()
    copies = Counter(broker.published(DEST))
    assert copies == Counter(e.operation_id for e in orders)  # each exactly once
    by_relay = Counter(name for name, _ in log)
    assert by_relay["r1"] > 0 and by_relay["r2"] > 0, by_relay  # they really ran side by side
    for k in range(60):
        want = [f"order-event:{k}-{i}" for i in range(4)]
        assert [m.operation_id for m in broker.messages(DEST) if m.key == f"k{k}"] == want
    assert await store.pending_count() == 0


async def test_postgres_relay_killed_before_its_mark_publishes_again(
    pg_outbox: tuple[Any, Any],
) -> None:
    ledger, store = pg_outbox
    await stage(ledger, store, [event(i, key=f"k{i % 2}") for i in range(6)])
    broker = MemoryBroker()
    fps = Failpoints()
    fps.enable(fp.RELAY_AFTER_PUBLISH_BEFORE_MARK, "kill", times=1)
    with pytest.raises(SimulatedCrash):
        await Relay(store, broker, failpoints=fps).run_once()
    assert await store.pending_count() == 6  # the claim's transaction rolled back
    assert await drain(Relay(store, broker, failpoints=fps)) == 6
    copies = Counter(broker.published(DEST))
    assert set(copies.values()) == {2} and len(copies) == 6


async def test_a_postgres_claim_never_overtakes_a_key_another_relay_holds(
    pg_outbox: tuple[Any, Any],
) -> None:
    ledger, store = pg_outbox
    await stage(
        ledger, store, [event("k-0", key="k"), event("k-1", key="k"), event("x-0", key="x")]
    )
    await stage(ledger, store, [event("k-2", key="k"), event("free")])
    holding, done = asyncio.Event(), asyncio.Event()

    async def relay_a() -> list[str]:
        async with store.claim(1, owner="a") as batch:
            holding.set()
            await asyncio.wait_for(done.wait(), 30)
            return [r.operation_id for r in batch.rows]

    a = asyncio.create_task(relay_a())
    await asyncio.wait_for(holding.wait(), 30)
    try:
        async with store.claim(10, owner="b") as batch:
            got_b = [r.operation_id for r in batch.rows]
    finally:
        done.set()
    assert await a == ["order-event:k-0"]
    # k-1 and k-2 wait until k-0 is confirmed; other keys and keyless rows flow
    assert got_b == ["order-event:x-0", "order-event:free"]
    async with store.claim(10, owner="b") as batch:  # a's claim ended unmarked: k-0 comes first
        assert [r.operation_id for r in batch.rows][:3] == [
            "order-event:k-0",
            "order-event:k-1",
            "order-event:x-0",
        ]


async def test_postgres_claim_rolls_back_its_marks_when_the_relay_dies(
    pg_outbox: tuple[Any, Any],
) -> None:
    ledger, store = pg_outbox
    await stage(ledger, store, [event(i, key="k") for i in range(3)])
    with pytest.raises(SimulatedCrash):
        async with store.claim(10, owner="a") as batch:
            assert await batch.mark_published([r.id for r in batch.rows]) == 3
            raise SimulatedCrash("relay_after_publish_before_mark")
    assert [r.operation_id for r in await store.fetch_pending(10)] == [
        f"order-event:{i}" for i in range(3)
    ]


async def test_postgres_stagers_of_one_key_commit_in_sequence_order(
    pg_outbox: tuple[Any, Any],
) -> None:
    ledger, store = pg_outbox
    first_open, release_first = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        async with ledger.transaction() as tx:
            await store.stage(tx, DEST, [event("first", key="k")])
            first_open.set()
            await asyncio.wait_for(release_first.wait(), 30)

    async def second() -> None:
        await first_open.wait()
        async with ledger.transaction() as tx:
            await store.stage(tx, DEST, [event("second", key="k")])
            await store.stage(tx, DEST, [event("unrelated", key="other")])

    t1 = asyncio.create_task(first())
    await first_open.wait()
    t2 = asyncio.create_task(second())
    # the second stager waits for the first one's key lock: it cannot commit first with a later id
    done, _ = await asyncio.wait({t2}, timeout=0.5)
    assert not done
    release_first.set()
    await asyncio.wait_for(asyncio.gather(t1, t2), 30)
    rows = await store.fetch_pending(10)
    assert [r.operation_id for r in rows] == [
        "order-event:first",
        "order-event:second",
        "order-event:unrelated",
    ]


async def test_postgres_store_refuses_an_autocommit_connection_outside_a_transaction(
    pg_dsn: str, pg_outbox: tuple[Any, Any]
) -> None:
    import psycopg

    from replaysafe import ConfigurationError

    _, store = pg_outbox
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        with pytest.raises(ConfigurationError):
            await store.stage(conn, DEST, [event(1)])
        async with conn.transaction():  # the caller's own transaction, no ledger involved
            await store.stage(conn, DEST, [event(2, key="k")])
    assert [r.operation_id for r in await store.fetch_pending(10)] == ["order-event:2"]


async def test_postgres_store_errors_name_the_fix_and_hide_the_password(
    pg_dsn: str, pg_schema: str
) -> None:
    from replaysafe import ConfigurationError, LedgerUnavailable
    from replaysafe.outbox import PostgresOutboxStore

    store = PostgresOutboxStore(pg_dsn, schema=pg_schema)
    try:
        with pytest.raises(ConfigurationError, match="migrate"):
            await store.pending_count()
    finally:
        await store.close()
    secret = "postgresql://app:hunter2@127.0.0.1:1/nowhere"
    bad = PostgresOutboxStore(secret, connect_timeout=2)
    assert "hunter2" not in repr(bad)
    with pytest.raises(LedgerUnavailable) as info:
        await bad.pending_count()
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
    await bad.close()
    with pytest.raises(ConfigurationError):
        PostgresOutboxStore(pg_dsn, schema="Bad-Schema")


# ---------------------------------------------------------------------- real brokers


async def test_resolve_broker_knows_every_adapter_and_hides_credentials() -> None:
    from replaysafe import ConfigurationError
    from replaysafe.brokers.kafka import KafkaBroker
    from replaysafe.brokers.nats import NATSBroker
    from replaysafe.brokers.rabbitmq import RabbitMQBroker
    from replaysafe.brokers.sqs import SQSBroker
    from replaysafe.cli.outbox import resolve_broker

    expected = {
        "memory": MemoryBroker,
        "amqp://app:hunter2@127.0.0.1:5672/": RabbitMQBroker,
        "sqs://eu-west-1": SQSBroker,
        "sqs+http://127.0.0.1:4566/eu-west-1": SQSBroker,
        "kafka://127.0.0.1:9092,127.0.0.1:9093": KafkaBroker,
        "nats://app:hunter2@127.0.0.1:4222": NATSBroker,
    }
    for spec, kind in expected.items():
        broker = resolve_broker(spec)  # nothing connects until first use
        try:
            assert isinstance(broker, kind), spec
            assert "hunter2" not in repr(broker)
        finally:
            await broker.close()
    with pytest.raises(ConfigurationError) as info:
        resolve_broker("mqtt://app:hunter2@host:1883")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigurationError):
        resolve_broker("kafka://")


async def _consume(broker: Any, dest: str, group: str, n: int) -> list[Envelope]:
    sub = await broker.subscribe(dest, group, prefetch=n)
    got: list[Envelope] = []
    try:
        while len(got) < n:
            d = await asyncio.wait_for(anext(sub), 30)
            got.append(decode_wire(d.body, d.headers, content_type=d.content_type, key=d.key))
            await d.ack()
    finally:
        await sub.close()
    return got


async def test_relay_publishes_through_rabbitmq(
    amqp_url: str, sqlite_outbox: tuple[SQLiteLedger, SQLiteOutboxStore, FakeClock]
) -> None:
    import uuid

    from replaysafe.cli.outbox import resolve_broker

    ledger, store, _ = sqlite_outbox
    dest = f"outbox-test-{uuid.uuid4().hex[:10]}"
    orders = keyed_workload(3, 3)
    await stage(ledger, store, orders, destination=dest)
    broker: Any = resolve_broker(amqp_url)
    try:
        await broker.declare(dest, ["billing"])  # before publishing: unroutable is refused
        assert await drain(Relay(store, broker, failpoints=Failpoints())) == len(orders)
        got = await _consume(broker, dest, "billing", len(orders))
    finally:
        with contextlib.suppress(Exception):
            await broker.delete(dest, ["billing"])
        await broker.close()
    # one consumer on one queue: each key's rows arrive in staging order (the adapter may reorder
    # envelopes *within* one publish call; the relay never puts two rows of a key in one call)
    assert sorted(e.operation_id for e in got) == sorted(e.operation_id for e in orders)
    for k in range(3):
        assert [e.operation_id for e in got if e.key == f"k{k}"] == [
            e.operation_id for e in orders if e.key == f"k{k}"
        ]
    assert {e.operation_id: e.fingerprint for e in got} == {
        e.operation_id: e.fingerprint for e in orders
    }


async def test_relay_publishes_through_sqs(
    sqs_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    sqlite_outbox: tuple[SQLiteLedger, SQLiteOutboxStore, FakeClock],
) -> None:
    import uuid

    from replaysafe.cli.outbox import resolve_broker

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    ledger, store, _ = sqlite_outbox
    dest = f"outbox-test-{uuid.uuid4().hex[:10]}"
    orders = [event(i) for i in range(5)]
    await stage(ledger, store, orders, destination=dest)
    from replaysafe.brokers.sqs import SQSBroker

    broker: Any = resolve_broker(f"sqs+{sqs_endpoint}/us-east-1")
    # the consumer polls briefly, so closing it does not wait out a 20 s long poll
    consumer = SQSBroker(endpoint_url=sqs_endpoint, region="us-east-1", wait_time=1)
    try:
        await broker.create_queue(dest)
        assert await drain(Relay(store, broker, failpoints=Failpoints())) == len(orders)
        got = await _consume(consumer, dest, "billing", len(orders))
    finally:
        with contextlib.suppress(Exception):
            await broker.delete_queue(dest)
        await consumer.close()
        await broker.close()
    # a standard queue does not keep order; every operation arrives
    assert sorted(e.operation_id for e in got) == sorted(e.operation_id for e in orders)


# ---------------------------------------------------------------------- CLI and real processes


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "replaysafe.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(**(env or {})),
    )


def _pending(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        (n,) = conn.execute(
            "SELECT COUNT(*) FROM replaysafe_outbox WHERE state = 'pending'"
        ).fetchone()
    return int(n)


async def _staged_file(path: Path, n: int) -> None:
    ledger = SQLiteLedger(path)
    store = SQLiteOutboxStore(ledger)
    await store.migrate()
    await stage(ledger, store, [event(i, key=f"k{i % 3}") for i in range(n)])
    await ledger.close()


def test_cli_pending_and_relay_once(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    asyncio.run(_staged_file(path, 5))
    out = _cli("outbox", "pending", "--ledger", f"sqlite:{path}", "--json")
    assert out.returncode == 0, out.stderr
    assert '"pending": 5' in out.stdout
    out = _cli("outbox", "relay", "--ledger", f"sqlite:{path}", "--broker", "memory", "--once")
    assert out.returncode == 0, out.stderr
    assert "published 5" in out.stdout
    assert _pending(path) == 0


def test_cli_migrate_and_pending_on_postgres(pg_dsn: str, pg_schema: str) -> None:
    env = {"REPLAYSAFE_PG_DSN": pg_dsn}
    where = ("--ledger", "postgres", "--schema", pg_schema)
    out = _cli("outbox", "pending", *where, env=env)
    assert out.returncode != 0 and "migrate" in out.stderr  # says how to fix it
    out = _cli("outbox", "migrate", *where, env=env)
    assert out.returncode == 0, out.stderr
    out = _cli("outbox", "pending", *where, "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert '"pending": 0' in out.stdout


def test_relay_process_killed_after_publish_loses_nothing(tmp_path: Path) -> None:
    """A real process dies (os._exit) between publish and mark; a restarted one finishes."""
    path = tmp_path / "app.db"
    asyncio.run(_staged_file(path, 6))
    # a stable owner: the restarted relay resumes at once instead of waiting out the dead one's
    # lease
    args = ("outbox", "relay", "--ledger", f"sqlite:{path}", "--broker", "memory", "--once",
            "--owner", "relay-1")  # fmt: skip
    died = _cli(*args, env={"REPLAYSAFE_FAILPOINTS": "relay_after_publish_before_mark=exit"})
    assert died.returncode == 137, (died.returncode, died.stderr)
    assert _pending(path) == 6  # published to the (lost) broker, never marked: still pending
    again = _cli(*args)
    assert again.returncode == 0, again.stderr
    assert _pending(path) == 0


def test_relay_process_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    asyncio.run(_staged_file(path, 4))
    proc = subprocess.Popen(
        [sys.executable, "-m", "replaysafe.cli", "outbox", "relay", "--ledger", f"sqlite:{path}",
         "--broker", "memory", "--poll-interval", "0.05"],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while _pending(path) > 0:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the relay process did not publish"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    assert "stopped" in out
    with sqlite3.connect(path) as conn:  # graceful: the lease was handed back
        assert conn.execute("SELECT relay_owner FROM replaysafe_outbox_meta").fetchone() == (None,)
