"""MemoryBroker: the broker contract in each redelivery model, plus model-specific behaviour.

Time is a FakeClock throughout: nothing here sleeps on the real clock, and every wait for a
delivery is bounded.
"""

from __future__ import annotations

import asyncio
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replaysafe.brokers.base import (
    Broker,
    Delivery,
    RedeliveryKind,
    SettleGranularity,
    Subscription,
)
from replaysafe.brokers.memory import MemoryBroker, partition_for
from replaysafe.clock import Clock
from replaysafe.envelope import HEADER_OPERATION_ID, HEADER_PUBLISHED_AT, Envelope, decode_wire
from replaysafe.errors import (
    BrokerUnavailable,
    CapabilityError,
    ConfigurationError,
    PublishAmbiguous,
)
from replaysafe.failpoints import PUBLISH_AFTER_ACCEPT, PUBLISH_BEFORE_ACCEPT, Failpoints
from replaysafe.testing import FakeClock
from replaysafe.testing.contracts.broker import BrokerContract

NACK = RedeliveryKind.NACK
VISIBILITY = RedeliveryKind.VISIBILITY_TIMEOUT
OFFSET = RedeliveryKind.OFFSET_REWIND

# --------------------------------------------------------------------------- the contract


class _MemoryContract(BrokerContract):
    mode: RedeliveryKind

    async def make_broker(self, clock: Clock) -> Broker:
        return MemoryBroker(clock=clock, failpoints=Failpoints())

    async def prepare_source(self, broker: Broker, source: str) -> None:
        assert isinstance(broker, MemoryBroker)
        broker.declare(source, mode=self.mode, visibility_timeout=2.0, partitions=4)


class TestMemoryNackContract(_MemoryContract):
    mode = NACK


class TestMemoryVisibilityContract(_MemoryContract):
    mode = VISIBILITY


class TestMemoryOffsetContract(_MemoryContract):
    mode = OFFSET


class TestMemoryDefaultModeContract(BrokerContract):
    """Undeclared destinations take ``default_mode`` (here the SQS-like model, 30 s visibility)."""

    async def make_broker(self, clock: Clock) -> Broker:
        return MemoryBroker(clock=clock, failpoints=Failpoints(), default_mode=VISIBILITY)


# --------------------------------------------------------------------------- helpers

Q = "orders"
G = "billing"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, mode: RedeliveryKind, **kw: float) -> MemoryBroker:
    broker = MemoryBroker(clock=clock, failpoints=Failpoints())
    broker.declare(Q, mode=mode, **kw)  # type: ignore[arg-type]
    return broker


def env(op: str, key: str | None = None) -> Envelope:
    return Envelope.of(op, {"op": op}, key=key)


def op_of(d: Delivery) -> str:
    return d.headers[HEADER_OPERATION_ID]


async def turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def recv(sub: Subscription) -> Delivery:
    async with asyncio.timeout(2.0):  # in-process: a due delivery arrives in a few loop turns
        return await anext(sub)


async def recv_n(sub: Subscription, n: int) -> list[Delivery]:
    return [await recv(sub) for _ in range(n)]


async def nothing(sub: Subscription) -> None:
    """Assert ``sub`` has nothing to deliver right now."""
    task = asyncio.ensure_future(anext(sub))
    await turns()
    done = task.done()
    task.cancel()
    await asyncio.wait({task})
    if done and not task.cancelled() and task.exception() is None:
        pytest.fail(f"unexpected delivery {op_of(task.result())}")


async def advance(clock: FakeClock, seconds: float) -> None:
    await turns()
    clock.advance(seconds)
    await turns()


# --------------------------------------------------------------------------- common


async def test_capabilities_per_mode(clock: FakeClock) -> None:
    broker = MemoryBroker(clock=clock)
    for name, mode in (("n", NACK), ("v", VISIBILITY), ("o", OFFSET)):
        broker.declare(name, mode=mode)
        caps = broker.capabilities(name)
        assert caps.redelivery is mode
        assert caps.delivery_count is True
        assert caps.extend_visibility is (mode is VISIBILITY)
        assert caps.ordered_within_key is (mode is OFFSET)
        assert caps.settle_granularity is (
            SettleGranularity.CUMULATIVE_OFFSET if mode is OFFSET else SettleGranularity.MESSAGE
        )
    assert broker.capabilities("undeclared").redelivery is NACK


async def test_declare_is_idempotent_and_refuses_a_conflicting_redeclare(clock: FakeClock) -> None:
    broker = make(clock, OFFSET, partitions=3)
    broker.declare(Q, mode=OFFSET, partitions=3)
    with pytest.raises(ConfigurationError, match="already exists"):
        broker.declare(Q, mode=NACK)
    await broker.publish("implicit", [env("a")])  # created with the default model
    with pytest.raises(ConfigurationError):
        broker.declare("implicit", mode=VISIBILITY)
    with pytest.raises(ConfigurationError):
        broker.declare("bad", mode=OFFSET, partitions=0)


async def test_messages_are_stored_in_wire_form(clock: FakeClock) -> None:
    broker = make(clock, NACK)
    sent = Envelope.of("op-1", {"b": 1, "a": [1, 2]}, key="k", headers={"x-tenant": "acme"})
    clock.advance(5)
    await broker.publish(Q, [sent])
    (stored,) = broker.messages(Q)
    assert stored.body == sent.payload
    assert stored.timestamp == clock.now()
    assert stored.headers["content-type"] == "application/json"
    assert stored.headers[HEADER_OPERATION_ID] == "op-1"
    assert HEADER_PUBLISHED_AT not in stored.headers  # the broker stamps nothing itself
    d = await recv(await broker.subscribe(Q, G))
    got = decode_wire(
        d.body,
        d.headers,
        content_type=d.content_type,
        key=d.key,
        broker_timestamp=d.broker_timestamp,
    )
    assert got.published_at == stored.timestamp  # falls back to the broker's timestamp
    assert got.headers == {"x-tenant": "acme"}
    assert isinstance(d.headers, dict)
    d.headers["x-tenant"] = "mutated"  # a consumer's copy cannot alter the stored message
    assert broker.messages(Q)[0].headers["x-tenant"] == "acme"


async def test_failpoint_before_accept_stores_nothing_after_accept_stores(clock: FakeClock) -> None:
    broker = make(clock, NACK)
    fp = broker.failpoints
    fp.enable(PUBLISH_BEFORE_ACCEPT, "raise", error=PublishAmbiguous("refused"), times=1)
    with pytest.raises(PublishAmbiguous):
        await broker.publish(Q, [env("a"), env("b")])
    assert broker.published(Q) == []
    fp.enable(
        PUBLISH_AFTER_ACCEPT,
        "raise",
        error=PublishAmbiguous("confirm lost"),
        when=lambda ctx: ctx["operation_id"] == "b" and ctx["destination"] == Q,
        times=1,
    )
    with pytest.raises(PublishAmbiguous):
        await broker.publish(Q, [env("a"), env("b"), env("c")])
    assert broker.published(Q) == ["a", "b"]  # "b" is there although the publish raised
    await broker.publish(Q, [env("b"), env("c")])  # retry of the unconfirmed tail
    assert broker.published(Q) == ["a", "b", "b", "c"]
    assert fp.fired == {PUBLISH_BEFORE_ACCEPT: 1, PUBLISH_AFTER_ACCEPT: 1}


async def test_late_group_reads_the_whole_history(clock: FakeClock) -> None:
    for mode in (NACK, VISIBILITY, OFFSET):
        broker = make(clock, mode)
        await broker.publish(Q, [env("a"), env("b")])
        assert broker.depth(Q, "never-subscribed") == 2
        sub = await broker.subscribe(Q, "late")
        got = await recv_n(sub, 2)
        assert [op_of(d) for d in got] == ["a", "b"]
        await broker.publish(Q, [env("c")])
        assert op_of(await recv(sub)) == "c"


async def test_extend_is_refused_with_the_alternative(clock: FakeClock) -> None:
    for mode in (NACK, OFFSET):
        broker = make(clock, mode)
        await broker.publish(Q, [env("a")])
        d = await recv(await broker.subscribe(Q, G))
        with pytest.raises(CapabilityError, match=r"MemoryBroker.*nack\(delay=") as info:
            await d.extend(10)
        assert "VISIBILITY_TIMEOUT" in str(info.value)


async def test_prefetch_bounds_unsettled_deliveries(clock: FakeClock) -> None:
    broker = make(clock, NACK)
    sub = await broker.subscribe(Q, G, prefetch=2)
    await broker.publish(Q, [env("a"), env("b"), env("c")])
    first, _ = await recv_n(sub, 2)
    blocked = asyncio.ensure_future(anext(sub))
    await turns()
    assert not blocked.done(), "a third unsettled delivery exceeds prefetch=2"
    await first.ack()
    async with asyncio.timeout(2.0):
        third = await blocked
    assert op_of(third) == "c"


async def test_broker_close_ends_subscriptions(clock: FakeClock) -> None:
    broker = make(clock, NACK)
    sub = await broker.subscribe(Q, G)
    waiting = asyncio.ensure_future(anext(sub))
    await turns()
    await broker.close()
    async with asyncio.timeout(2.0):
        with pytest.raises(StopAsyncIteration):
            await waiting
    with pytest.raises(BrokerUnavailable):
        await broker.publish(Q, [env("a")])
    with pytest.raises(BrokerUnavailable):
        await broker.subscribe(Q, G)
    await broker.close()


def test_partition_is_a_stable_crc32_of_the_key() -> None:
    assert partition_for(None, 8) == 0
    assert partition_for("order-91827", 8) == zlib.crc32(b"order-91827") % 8
    assert partition_for("é", 3) == zlib.crc32("é".encode()) % 3


# --------------------------------------------------------------------------- NACK (RabbitMQ-like)


@pytest.mark.parametrize("abandon", [True, False])
async def test_nack_close_requeues_at_once_and_the_stale_ack_is_ignored(
    clock: FakeClock, abandon: bool
) -> None:
    broker = make(clock, NACK)
    a = await broker.subscribe(Q, G)
    b = await broker.subscribe(Q, G)
    await broker.publish(Q, [env("a")])
    held = await recv(a)
    await a.close(abandon=abandon)
    again = await recv(b)  # no clock movement needed
    assert (op_of(again), again.attempt, again.redelivered) == ("a", 2, True)
    await held.ack()  # stale: the message now belongs to b
    assert broker.in_flight(Q, G) == 1
    assert broker.depth(Q, G) == 1
    await again.ack()
    assert broker.depth(Q, G) == 0
    assert broker.delivery_count(Q, G, "a") == 2


async def test_nack_delay_waits_on_the_clock_without_polling(clock: FakeClock) -> None:
    broker = make(clock, NACK)
    sub = await broker.subscribe(Q, G)
    await broker.publish(Q, [env("a")])
    d = await recv(sub)
    await d.nack(delay=5)
    pending = asyncio.ensure_future(anext(sub))
    await advance(clock, 4.9)
    assert not pending.done()
    # the waiting consumer is parked on the clock (one sleeper), not spinning on the loop
    assert clock.sleepers == 1
    await advance(clock, 0.1)
    async with asyncio.timeout(2.0):
        again = await pending
    assert (op_of(again), again.attempt, again.redelivered) == ("a", 2, True)


async def test_nack_requeue_keeps_the_original_position(clock: FakeClock) -> None:
    broker = make(clock, NACK)
    sub = await broker.subscribe(Q, G)
    await broker.publish(Q, [env("a"), env("b")])
    d = await recv(sub)
    await d.nack()
    assert op_of(await recv(sub)) == "a"


async def test_nack_reject_dead_letters(clock: FakeClock) -> None:
    broker = make(clock, NACK)
    sub = await broker.subscribe(Q, G)
    await broker.publish(Q, [env("a")])
    d = await recv(sub)
    await d.reject("poison")
    (dead,) = broker.dead_letters(Q, G)
    assert (dead.operation_id, dead.reason, dead.attempt) == ("a", "poison", 1)
    assert broker.depth(Q, G) == 0
    await sub.close(abandon=True)
    await nothing(await broker.subscribe(Q, G))


# --------------------------------------------------------------------------- VISIBILITY (SQS-like)


async def test_visibility_overlap_and_the_late_ack_still_deletes(clock: FakeClock) -> None:
    broker = make(clock, VISIBILITY, visibility_timeout=2.0)
    a = await broker.subscribe(Q, G)
    b = await broker.subscribe(Q, G)
    await broker.publish(Q, [env("a")])
    first = await recv(a)
    assert first.settle_deadline == clock.now() + 2.0
    await nothing(b)
    await advance(clock, 2.0)
    # a is still working on it, and b receives it anyway: the overlap the ledger must absorb
    second = await recv(b)
    assert not first.settled
    assert (op_of(second), second.attempt, second.redelivered) == ("a", 2, True)
    await first.ack()  # from the stale receipt: SQS deletes anyway
    assert broker.depth(Q, G) == 0
    await second.ack()  # harmless
    await advance(clock, 10.0)
    await nothing(a)
    await nothing(b)
    assert broker.delivery_count(Q, G, "a") == 2


async def test_visibility_close_does_not_return_messages_early(clock: FakeClock) -> None:
    broker = make(clock, VISIBILITY, visibility_timeout=2.0)
    a = await broker.subscribe(Q, G)
    await broker.publish(Q, [env("a")])
    await recv(a)
    await a.close()  # a clean close too: SQS has no "return"
    b = await broker.subscribe(Q, G)
    await advance(clock, 1.9)
    await nothing(b)
    assert broker.in_flight(Q, G) == 1
    await advance(clock, 0.1)
    assert (await recv(b)).attempt == 2


async def test_visibility_extend_and_stale_receipts(clock: FakeClock) -> None:
    broker = make(clock, VISIBILITY, visibility_timeout=2.0)
    sub = await broker.subscribe(Q, G)
    await broker.publish(Q, [env("a")])
    first = await recv(sub)
    await first.extend(5.0)
    assert first.settle_deadline == clock.now() + 5.0
    await advance(clock, 4.0)
    await nothing(sub)
    await advance(clock, 1.0)
    second = await recv(sub)
    # the old receipt can no longer move the timer of the current holder
    await first.extend(100.0)
    await first.nack(delay=100.0)
    await advance(clock, 2.0)
    third = await recv(sub)
    assert [d.attempt for d in (first, second, third)] == [1, 2, 3]
    await third.nack(delay=3.0)  # ChangeMessageVisibility from the latest receipt
    await advance(clock, 2.9)
    await nothing(sub)
    await advance(clock, 0.1)
    fourth = await recv(sub)
    await fourth.reject("poison")
    assert [x.attempt for x in broker.dead_letters(Q, G)] == [4]
    assert broker.depth(Q, G) == 0


# --------------------------------------------------------------------------- OFFSET (Kafka-like)


async def test_offset_commits_only_the_highest_contiguous_ack(clock: FakeClock) -> None:
    broker = make(clock, OFFSET)
    sub = await broker.subscribe(Q, G)
    await broker.publish(Q, [env(f"m{i}") for i in range(4)])
    d = await recv_n(sub, 4)
    assert [x.delivery_id for x in d] == [f"{Q}/0@{i}" for i in range(4)]
    await d[0].ack()
    assert broker.committed(Q, G) == {0: 1}
    await d[2].ack()
    await d[3].ack()
    assert broker.committed(Q, G) == {0: 1}  # never past the unfinished offset 1
    assert broker.depth(Q, G) == 3
    await d[1].ack()
    assert broker.committed(Q, G) == {0: 4}
    assert broker.depth(Q, G) == 0


async def test_offset_nack_rewinds_the_partition(clock: FakeClock) -> None:
    broker = make(clock, OFFSET)
    sub = await broker.subscribe(Q, G)
    await broker.publish(Q, [env(f"m{i}") for i in range(4)])
    d0, d1, d2 = await recv_n(sub, 3)
    await d0.ack()
    await d1.nack()
    await d2.ack()  # the copy from before the rewind: ignored, m2 will be read again
    assert broker.in_flight(Q, G) == 0
    again = await recv_n(sub, 3)
    assert [(op_of(x), x.attempt, x.redelivered) for x in again] == [
        ("m1", 2, True),
        ("m2", 2, True),
        ("m3", 1, False),
    ]
    await again[0].ack()
    assert broker.committed(Q, G) == {0: 2}  # m2's stale ack did not count
    for x in again[1:]:
        await x.ack()
    assert broker.committed(Q, G) == {0: 4}


async def test_offset_delayed_nack_pauses_only_that_partition(clock: FakeClock) -> None:
    broker = make(clock, OFFSET, partitions=2)
    k0, k1 = (next(f"k-{i}" for i in range(100) if partition_for(f"k-{i}", 2) == p) for p in (0, 1))
    sub = await broker.subscribe(Q, G)
    await broker.publish(Q, [env("p0", key=k0)])
    d = await recv(sub)
    await d.nack(delay=3.0)
    await broker.publish(Q, [env("p1", key=k1)])
    assert op_of(await recv(sub)) == "p1"  # partition 1 keeps flowing
    await advance(clock, 2.9)
    await nothing(sub)
    await advance(clock, 0.1)
    assert op_of(await recv(sub)) == "p0"


async def test_offset_crash_rereads_everything_uncommitted(clock: FakeClock) -> None:
    broker = make(clock, OFFSET)
    a = await broker.subscribe(Q, G)
    await broker.publish(Q, [env(f"m{i}") for i in range(3)])
    d0, _, d2 = await recv_n(a, 3)
    await d0.ack()
    await d2.ack()  # out of order: consumer-local progress, lost with the consumer
    await a.close(abandon=True)
    b = await broker.subscribe(Q, G)
    got = await recv_n(b, 2)
    assert [(op_of(x), x.attempt) for x in got] == [("m1", 2), ("m2", 2)]
    await nothing(b)


async def test_offset_rebalance_hands_revoked_partitions_to_the_new_consumer(
    clock: FakeClock,
) -> None:
    broker = make(clock, OFFSET, partitions=4)
    a = await broker.subscribe(Q, G)
    keys = [f"key-{i}" for i in range(8)]
    await broker.publish(Q, [env(k, key=k) for k in keys])
    held = {op_of(d): d for d in await recv_n(a, 8)}
    b = await broker.subscribe(Q, G)
    assert broker.assignment(Q, G) == {0: a, 1: b, 2: a, 3: b}
    moved = sorted(k for k in keys if partition_for(k, 4) in (1, 3))
    assert moved  # the keys hash onto both halves
    got = await recv_n(b, len(moved))
    assert sorted(op_of(d) for d in got) == moved
    assert all(d.attempt == 2 and d.redelivered for d in got)
    for d in held.values():  # a's acks: kept for its partitions, ignored for the revoked ones
        await d.ack()
    assert broker.depth(Q, G) == len(moved)
    for d in got:
        await d.ack()
    assert broker.depth(Q, G) == 0
    await b.close()
    assert broker.assignment(Q, G) == {0: a, 1: a, 2: a, 3: a}
    await nothing(a)


async def test_offset_reject_skips_the_record_and_dead_letters_it(clock: FakeClock) -> None:
    broker = make(clock, OFFSET)
    sub = await broker.subscribe(Q, G)
    await broker.publish(Q, [env("bad"), env("good")])
    bad, good = await recv_n(sub, 2)
    await good.ack()
    assert broker.committed(Q, G) == {0: 0}
    await bad.reject("poison")
    assert broker.committed(Q, G) == {0: 2}
    assert [x.operation_id for x in broker.dead_letters(Q, G)] == ["bad"]


# --------------------------------------------------------------------------- properties


@settings(max_examples=80, deadline=None)
@given(st.permutations(range(8)))
def test_offset_commit_is_the_lowest_unsettled_offset(order: list[int]) -> None:
    async def run() -> None:
        broker = make(FakeClock(), OFFSET)
        sub = await broker.subscribe(Q, G)
        await broker.publish(Q, [env(f"m{i}") for i in range(8)])
        held = await recv_n(sub, 8)
        settled: set[int] = set()
        for i in order:
            await (held[i].reject("skip") if i % 3 == 0 else held[i].ack())
            settled.add(i)
            lowest_open = min(set(range(8)) - settled, default=8)
            assert broker.committed(Q, G) == {0: lowest_open}

    asyncio.run(run())


_STEP = st.one_of(
    st.tuples(st.just("publish"), st.integers(0, 3)),
    st.tuples(st.just("take"), st.integers(0, 1)),
    st.tuples(st.sampled_from(["ack", "nack", "nack-later", "reject"]), st.integers(0, 7)),
    st.tuples(st.sampled_from(["crash", "close"]), st.integers(0, 1)),
    st.tuples(st.just("advance"), st.integers(1, 3)),
)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([NACK, VISIBILITY, OFFSET]), st.lists(_STEP, max_size=40))
def test_nothing_is_lost_whatever_the_consumers_do(
    mode: RedeliveryKind, steps: list[tuple[str, int]]
) -> None:
    """At-least-once at the transport: under any mix of settles, crashes, closes and time, every
    published message ends up acked or dead-lettered once consumers keep going."""

    async def run() -> None:
        clock = FakeClock()
        broker = make(clock, mode, visibility_timeout=2.0, partitions=3)
        subs = [await broker.subscribe(Q, G, prefetch=4) for _ in range(2)]
        held: list[Delivery] = []
        acked: set[str] = set()
        n = 0

        async def poll(sub: Subscription) -> Delivery | None:
            task = asyncio.ensure_future(anext(sub))
            await turns(5)
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
            return task.result() if task.done() and not task.cancelled() else None

        for action, arg in steps:
            if action == "publish":
                await broker.publish(Q, [env(f"m{n}", key=f"k{arg}")])
                n += 1
            elif action == "take":
                if (d := await poll(subs[arg])) is not None:
                    held.append(d)
            elif action in ("crash", "close"):
                await subs[arg].close(abandon=action == "crash")
                subs[arg] = await broker.subscribe(Q, G, prefetch=4)
            elif action == "advance":
                await advance(clock, arg)
            elif held:
                d = held.pop(arg % len(held))
                if action == "ack":
                    await d.ack()
                    acked.add(op_of(d))
                elif action == "reject":
                    await d.reject("poison")
                else:
                    await d.nack(delay=1.0 if action == "nack-later" else None)
        # drain: whoever still holds a copy dies, then fresh consumers settle everything they get
        for i, sub in enumerate(subs):
            await sub.close(abandon=True)
            subs[i] = await broker.subscribe(Q, G, prefetch=4)
        for _ in range(50):
            if broker.depth(Q, G) == 0:
                break
            await advance(clock, 3)
            for sub in subs:
                while (d := await poll(sub)) is not None:
                    await d.ack()
                    acked.add(op_of(d))
        assert broker.depth(Q, G) == 0
        dead = {x.operation_id for x in broker.dead_letters(Q, G)}
        assert acked | dead == {f"m{i}" for i in range(n)}

    asyncio.run(run())


async def test_publish_raw_stores_a_plain_clients_message_as_is(clock: FakeClock) -> None:
    broker = make(clock, NACK)
    await broker.publish_raw(Q, b'{"order": "o-1"}', {"x-src": "legacy"}, key="o-1")
    await broker.publish_raw(Q, b"hi", {HEADER_OPERATION_ID: "op-2"}, content_type="text/plain")
    assert broker.published(Q) == [None, "op-2"]
    sub = await broker.subscribe(Q, G)
    first, second = await recv_n(sub, 2)
    assert (first.body, first.headers, first.content_type, first.key) == (
        b'{"order": "o-1"}',
        {"x-src": "legacy"},
        None,
        "o-1",
    )
    got = decode_wire(second.body, second.headers, content_type=second.content_type)
    assert (got.operation_id, got.value) == ("op-2", "hi")
