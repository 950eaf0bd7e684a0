"""KafkaBroker against a real Kafka-protocol broker (Tansu, from the ``kafka_bootstrap`` fixture):
the broker contract, Kafka's own semantics (contiguous commits, rewinds, rebalances, crashes),
and the runtime end to end. The offset tracker and URL handling are tested without a broker.

Every group join costs a rebalance (~2 s on Tansu with a 3 s session timeout), so the cases keep
joins down; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replaysafe import App, Context, Effect, Guarantee, RetryPolicy, Worker
from replaysafe import failpoints as fp
from replaysafe import observe as o
from replaysafe.brokers.base import (
    Broker,
    Delivery,
    GroupState,
    RedeliveryKind,
    SettleGranularity,
    Subscription,
)
from replaysafe.brokers.kafka import KAFKA_CAPABILITIES, KafkaBroker, OffsetTracker
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.envelope import HEADER_OPERATION_ID, Envelope, decode_wire
from replaysafe.errors import (
    BadInput,
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    MissingExtra,
    PublishAmbiguous,
    SimulatedCrash,
)
from replaysafe.failpoints import Failpoints
from replaysafe.ledger.base import OpKey, State
from replaysafe.ledger.sqlite import SQLiteLedger
from replaysafe.testing import EffectProbe
from replaysafe.testing.contracts.broker import BrokerContract

from .conftest import free_port
from .waits import until

#: short timers for Tansu: a join then takes ~2 s instead of ~23 s with Kafka's defaults
FAST: dict[str, Any] = {
    "session_timeout": 3.0,
    "heartbeat_interval": 0.3,
    "poll_interval": 0.05,
    "drain_timeout": 3.0,
    "join_timeout": 30.0,
    "publish_timeout": 10.0,
    "request_timeout": 10.0,
}
WAIT = 30.0  # real seconds for anything that must happen (a slow, shared machine)


def _delete_topics(bootstrap: str, topics: list[str]) -> None:
    if not topics:
        return
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.delete_topics(topics, operation_timeout=10).values():
        with contextlib.suppress(Exception):
            fut.result(15)


# --------------------------------------------------------------------------- the contract


class TestKafkaContract(BrokerContract):
    """Real time throughout: ``timer_margin`` > 2 x ``quiesce`` so that "nothing arrives before
    the timer" (quiesce + sleep + quiesce) still ends before the timer does."""

    receive_timeout = WAIT
    timer_margin = 1.5
    nack_delay = 3.0

    @pytest.fixture(autouse=True)
    def _kafka(self, kafka_bootstrap: str) -> Iterator[None]:
        self.bootstrap = kafka_bootstrap
        self.topics: list[str] = []
        yield
        _delete_topics(kafka_bootstrap, self.topics)

    async def make_broker(self, clock: Clock) -> Broker:
        return KafkaBroker(self.bootstrap, clock=clock, failpoints=Failpoints(), **FAST)

    def make_clock(self) -> Clock:
        return SYSTEM_CLOCK

    async def prepare_source(self, broker: Broker, source: str) -> None:
        assert isinstance(broker, KafkaBroker)
        await broker.create_topic(source, 4)
        self.topics.append(source)

    async def advance(self, clock: Clock, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def quiesce(self, clock: Clock) -> None:
        await asyncio.sleep(0.5)


# --------------------------------------------------------------------------- helpers


class Kit:
    """Brokers and topics of one test; everything is closed and deleted afterwards."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.brokers: list[KafkaBroker] = []
        self.topics: list[str] = []
        self.subs: list[Subscription] = []

    def broker(self, **overrides: Any) -> KafkaBroker:
        b = KafkaBroker(self.bootstrap, failpoints=Failpoints(), **{**FAST, **overrides})
        self.brokers.append(b)
        return b

    async def topic(self, partitions: int = 4) -> str:
        name = f"rs-kafka-{uuid.uuid4().hex[:12]}"
        admin = self.brokers[0] if self.brokers else self.broker()
        await admin.create_topic(name, partitions)
        self.topics.append(name)
        return name

    async def subscribe(
        self, broker: KafkaBroker, topic: str, group: str, prefetch: int = 100
    ) -> Subscription:
        sub = await broker.subscribe(topic, group, prefetch=prefetch)
        self.subs.append(sub)
        return sub

    async def close(self) -> None:
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.close(abandon=True)
        for b in self.brokers:
            with contextlib.suppress(Exception):
                await b.close()
        await asyncio.to_thread(_delete_topics, self.bootstrap, self.topics)


@pytest.fixture
async def kit(kafka_bootstrap: str) -> AsyncIterator[Kit]:
    k = Kit(kafka_bootstrap)
    try:
        yield k
    finally:
        await k.close()


def group() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"


def env(op: str, key: str | None = None, **extra: Any) -> Envelope:
    return Envelope.of(op, {"op": op, **extra}, key=key, published_at=time.time())


def op_of(d: Delivery) -> str:
    return d.headers[HEADER_OPERATION_ID]


def where(d: Delivery) -> tuple[int, int]:
    """(partition, offset) from the delivery id ``topic/partition@offset``."""
    partition, _, offset = d.delivery_id.rpartition("/")[2].partition("@")
    return int(partition), int(offset)


async def recv(sub: Subscription, seconds: float = WAIT) -> Delivery:
    try:
        async with asyncio.timeout(seconds):
            return await anext(sub)
    except TimeoutError:
        pytest.fail(f"no delivery within {seconds} s")


async def recv_n(sub: Subscription, n: int) -> list[Delivery]:
    return [await recv(sub) for _ in range(n)]


async def nothing(sub: Subscription, seconds: float = 1.5) -> None:
    task = asyncio.ensure_future(anext(sub))
    await asyncio.wait({task}, timeout=seconds)
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is None:
        d = task.result()
        pytest.fail(f"unexpected delivery {op_of(d)} (attempt {d.attempt})")


def murmur2(data: bytes) -> int:
    """Kafka's (Java client's) murmur2 key hash."""
    m, r = 0x5BD1E995, 24
    h = (0x9747B28C ^ len(data)) & 0xFFFFFFFF
    n4 = len(data) // 4
    for i in range(n4):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = data[4 * n4 :]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if len(tail) >= 1:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def partition_of(key: str, partitions: int) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def keys_for(partitions: int, prefix: str = "key") -> list[str]:
    """One key per partition, in partition order."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < partitions:
        k = f"{prefix}-{i}"
        found.setdefault(partition_of(k, partitions), k)
        i += 1
    return [found[p] for p in range(partitions)]


# --------------------------------------------------------------------------- no broker needed

TP = ("orders", 0)


@pytest.mark.parametrize(
    ("data", "java"),
    [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_helper_matches_kafkas_reference_vectors(data: bytes, java: int) -> None:
    # Kafka's UtilsTest.testMurmur2 (signed Java ints): the helper the partition tests trust
    assert murmur2(data) == java & 0xFFFFFFFF


def test_tracker_commits_the_highest_contiguous_offset() -> None:
    t = OffsetTracker()
    t.assign(TP)
    assert t.position(TP) is None and t.to_commit() == []
    tokens = {off: t.track(TP, off) for off in range(4)}
    assert all(tok is not None for tok in tokens.values())

    def done(off: int) -> bool:
        tok = tokens[off]
        assert tok is not None
        return t.done(TP, off, tok)

    assert done(0) and t.position(TP) == 1
    assert done(2) and done(3)
    assert t.position(TP) == 1  # never past the unfinished offset 1
    assert done(1)
    assert t.position(TP) == 4
    [(tp, pos, gen)] = t.to_commit()
    assert (tp, pos) == (TP, 4)
    t.committed(tp, pos, gen)
    assert t.to_commit() == []
    assert not done(1), "settling twice must not count twice"


def test_tracker_committed_only_moves_forward() -> None:
    """Commit answers can arrive out of order (an asynchronous commit's answer after a later
    synchronous commit at revoke or close): a late, lower answer must not move it back."""
    t = OffsetTracker()
    t.assign(TP)
    tok = {off: t.track(TP, off) for off in range(4)}
    for off in range(4):
        assert t.done(TP, off, tok[off])  # type: ignore[arg-type]
    [(_, pos, gen)] = t.to_commit()
    assert pos == 4
    t.committed(TP, 4, gen)
    t.committed(TP, 2, gen)  # the late answer to an earlier commit
    assert t.to_commit() == [], "position 4 is committed; nothing to send again"


def test_tracker_rewind_drops_later_in_flight_offsets() -> None:
    t = OffsetTracker()
    t.assign(TP)
    tok = {off: t.track(TP, off) for off in range(6)}
    assert t.done(TP, 0, tok[0])  # type: ignore[arg-type]
    assert t.rewind(TP, 2, tok[2])  # type: ignore[arg-type]
    # 3..5 were in flight: their copies are stale now, acking them moves nothing
    for off in (3, 4, 5):
        assert not t.valid(TP, off, tok[off])  # type: ignore[arg-type]
        assert not t.done(TP, off, tok[off])  # type: ignore[arg-type]
    assert t.position(TP) == 1
    assert t.done(TP, 1, tok[1])  # type: ignore[arg-type]
    assert t.position(TP) == 2  # the rewind target: never past it
    assert t.track(TP, 6) is None, "records fetched before the seek back must be dropped"
    t.unfreeze(TP)
    assert t.track(TP, 1) is None, "an offset below the rewind target is a stale duplicate"
    again = {off: t.track(TP, off) for off in range(2, 6)}
    for off in range(2, 6):
        assert t.done(TP, off, again[off])  # type: ignore[arg-type]
    assert t.position(TP) == 6


def test_tracker_gaps_revoke_and_generations() -> None:
    t = OffsetTracker()
    t.assign(TP)
    # compaction and transaction markers leave gaps: the tracked sequence is what counts
    tok = {off: t.track(TP, off) for off in (0, 1, 5, 9)}
    for off in (9, 5, 1):
        assert t.done(TP, off, tok[off])  # type: ignore[arg-type]
    assert t.position(TP) == 0
    assert t.done(TP, 0, tok[0])  # type: ignore[arg-type]
    assert t.position(TP) == 10
    [(_, pos, gen)] = t.to_commit()
    t.revoke(TP)
    assert t.to_commit() == [] and t.track(TP, 10) is None
    t.assign(TP)  # a new generation: the old tokens are stale
    t.committed(TP, pos, gen)  # a commit of the old generation lands late: ignored
    new = t.track(TP, 10)
    assert new is not None and not t.done(TP, 9, tok[9])  # type: ignore[arg-type]
    # fetched and not handed out yet: tracked as unfinished, so no commit passes it
    assert t.position(TP) == 10 and t.valid(TP, 10, new)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 3), min_size=1, max_size=12),
    st.randoms(use_true_random=False),
)
def test_tracker_position_is_the_lowest_unfinished_offset(gaps: list[int], rnd: Any) -> None:
    t = OffsetTracker()
    t.assign(TP)
    offsets = list(itertools_accumulate(gaps))
    tokens = {off: t.track(TP, off) for off in offsets}
    order = offsets[:]
    rnd.shuffle(order)
    finished: set[int] = set()
    for off in order:
        assert t.done(TP, off, tokens[off])  # type: ignore[arg-type]
        finished.add(off)
        open_ = [x for x in offsets if x not in finished]
        assert t.position(TP) == (min(open_) if open_ else offsets[-1] + 1)


def itertools_accumulate(gaps: list[int]) -> Iterator[int]:
    total = -1
    for g in gaps:
        total += g
        yield total


def test_capabilities_keep_kafkas_semantics_visible() -> None:
    caps = KAFKA_CAPABILITIES
    assert caps.redelivery is RedeliveryKind.OFFSET_REWIND
    assert caps.settle_granularity is SettleGranularity.CUMULATIVE_OFFSET
    assert caps.extend_visibility is False
    assert caps.ordered_within_key is True
    assert caps.delivery_count is False
    assert caps.independent_groups is True


def test_from_url_parses_hosts_credentials_and_options_and_redacts() -> None:
    b = KafkaBroker.from_url(
        "kafka://alice:s3cr%40t@h1:9092,h2:9093/?client.id=billing&sasl.mechanism=SCRAM-SHA-256",
        **FAST,
    )
    assert b.bootstrap == "h1:9092,h2:9093"
    conf = b._common
    assert conf["security.protocol"] == "SASL_PLAINTEXT"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-256"
    assert (conf["sasl.username"], conf["sasl.password"]) == ("alice", "s3cr@t")
    assert conf["client.id"] == "billing"
    assert "s3cr" not in repr(b) and "alice:***@h1:9092" in repr(b)
    assert KafkaBroker.from_url("kafka+ssl://h:9093")._common["security.protocol"] == "SSL"
    tls_sasl = KafkaBroker.from_url("kafka+ssl://u:p@h:9093")._common
    assert tls_sasl["security.protocol"] == "SASL_SSL"
    with pytest.raises(ConfigurationError) as info:
        KafkaBroker.from_url("amqp://bob:hunter2@h:5672")
    assert "hunter2" not in str(info.value) and "bob:***@" in str(info.value)
    with pytest.raises(ConfigurationError):
        KafkaBroker.from_url("kafka://")


def test_configuration_is_validated_at_construction() -> None:
    with pytest.raises(ConfigurationError, match=r"enable\.auto\.commit"):
        KafkaBroker("h:9092", consumer_config={"enable.auto.commit": True})
    with pytest.raises(ConfigurationError, match="heartbeat_interval"):
        KafkaBroker("h:9092", session_timeout=3, heartbeat_interval=3)
    with pytest.raises(ConfigurationError, match="auto_offset_reset"):
        KafkaBroker("h:9092", auto_offset_reset="smallest")
    with pytest.raises(ConfigurationError):
        KafkaBroker("")


def test_a_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)
    with pytest.raises(MissingExtra) as info:
        KafkaBroker("h:9092")
    assert info.value.extra == "kafka" and "replaysafe[kafka]" in str(info.value)


async def test_bad_librdkafka_configuration_is_a_configuration_error() -> None:
    broker = KafkaBroker(
        "127.0.0.1:9", failpoints=Failpoints(), consumer_config={"no.such.property": 1}
    )
    try:
        with pytest.raises(ConfigurationError, match=r"no\.such\.property"):
            await broker.subscribe("orders", "g")
    finally:
        await broker.close()
    broker = KafkaBroker("127.0.0.1:9", producer_config={"acks": "1"})  # idempotence needs all
    try:
        with pytest.raises(ConfigurationError, match="acks"):
            await broker.publish("orders", [env("op-1")])
    finally:
        await broker.close()


async def test_unreachable_brokers_publish_ambiguous_and_refuse_subscribe() -> None:
    # nothing listens there: librdkafka cannot tell whether a request went out, so the publish
    # outcome is reported as unknown, never as success or as a definitive refusal
    broker = KafkaBroker(
        f"127.0.0.1:{free_port()}",
        failpoints=Failpoints(),
        **{**FAST, "publish_timeout": 1.0, "request_timeout": 1.0},
    )
    try:
        with pytest.raises(PublishAmbiguous, match="SAME envelopes"):
            await broker.publish("orders", [env("op-1")])
        with pytest.raises(BrokerUnavailable, match="cannot reach"):
            await broker.subscribe("orders", "g")
    finally:
        await broker.close()


# --------------------------------------------------------------------------- against Tansu


async def test_a_refused_record_is_a_broker_error_not_an_ambiguous_one(kit: Kit) -> None:
    broker = kit.broker(producer_config={"message.max.bytes": 2000})
    topic = await kit.topic(1)
    big = Envelope.of("op-big", {"blob": "x" * 5000})
    with pytest.raises(BrokerError) as info:
        await broker.publish(topic, [big])
    assert not isinstance(info.value, PublishAmbiguous)
    assert "op-big" in str(info.value)


async def test_describe_reads_the_topics_retention_for_explain(kit: Kit) -> None:
    broker = kit.broker()
    topic = f"rs-kafka-{uuid.uuid4().hex[:12]}"
    await broker.create_topic(topic, 2, config={"retention.ms": "3600000"})
    kit.topics.append(topic)
    await broker.create_topic(topic, 2)  # again, same partitions: a no-op
    with pytest.raises(ConfigurationError, match="already exists with 2 partitions"):
        await broker.create_topic(topic, 3)
    facts = await broker.describe(topic)
    assert (facts.broker, facts.retention, facts.auto_commit) == ("kafka", 3600.0, False)
    assert any("rewinds the partition" in n for n in facts.notes)


async def test_subscribing_to_a_missing_topic_is_a_configuration_error(kit: Kit) -> None:
    broker = kit.broker()
    with pytest.raises(ConfigurationError, match="create it first"):
        await broker.subscribe(f"rs-missing-{uuid.uuid4().hex[:8]}", group())
    assert not broker._subs


async def test_a_plain_clients_record_arrives_raw_and_never_raises(kit: Kit) -> None:
    from confluent_kafka import Producer

    broker = kit.broker()
    topic = await kit.topic(1)
    g = group()
    sub = await kit.subscribe(broker, topic, g)
    plain = Producer({"bootstrap.servers": kit.bootstrap})
    plain.produce(
        topic,
        value=b'{"order": "o-1"}',
        key=b"cust-\xff",
        headers=[("x-src", b"legacy"), ("x-null", None), ("x-bad", b"\xff\xfe"), ("x-src", b"2")],
    )
    plain.produce(topic, value=None, key=b"tombstone")
    assert plain.flush(10) == 0
    first, second = await recv_n(sub, 2)
    assert first.body == b'{"order": "o-1"}'
    assert first.headers["x-null"] == "" and first.headers["x-src"] == "2"
    assert first.headers["x-bad"].encode("utf-8", "surrogateescape") == b"\xff\xfe"
    assert first.key is not None and first.key.encode("utf-8", "surrogateescape") == b"cust-\xff"
    assert first.content_type is None and HEADER_OPERATION_ID not in first.headers
    assert first.broker_timestamp is not None and abs(first.broker_timestamp - time.time()) < 300
    assert (first.attempt, first.redelivered, first.settle_deadline) == (1, False, None)
    # the runtime's decoder refuses it (no operation id, no key extractor): a quarantine
    # decision, made outside the adapter
    with pytest.raises(BadInput):
        decode_wire(first.body, first.headers, content_type=first.content_type)
    assert second.body == b"" and second.key == "tombstone"
    await first.ack()
    await second.reject("tombstone")  # skipped: it counts as done for the commit
    await until(
        lambda: _committed_is(broker, topic, g, {0: 2}), seconds=WAIT, what="commit of ack + reject"
    )


async def test_keys_map_to_murmur2_partitions_and_keep_their_order(kit: Kit) -> None:
    broker = kit.broker()
    topic = await kit.topic(4)
    sub = await kit.subscribe(broker, topic, group())
    keys = [f"customer-{i}" for i in range(6)]
    sent = [env(f"{k}/{i}", key=k) for i in range(8) for k in keys]
    for chunk in (sent[:10], sent[10:30], sent[30:]):
        await broker.publish(topic, chunk)
    got = await recv_n(sub, len(sent))
    for d in got:
        # the Java client's partitioner: one key, one partition, across languages
        assert where(d)[0] == partition_of(d.key or "", 4), d.delivery_id
        await d.ack()
    for k in keys:
        want = [e.operation_id for e in sent if e.key == k]
        assert [op_of(d) for d in got if d.key == k] == want, f"{k} out of order"


async def test_nack_rewinds_its_partition_only_and_later_acks_are_dropped(kit: Kit) -> None:
    broker = kit.broker()
    topic = await kit.topic(2)
    ka, kb = keys_for(2)
    g = group()
    sub = await kit.subscribe(broker, topic, g)
    await broker.publish(topic, [env(f"a{i}", key=ka) for i in range(6)] + [env("b0", key=kb)])
    got = {op_of(d): d for d in await recv_n(sub, 7)}
    for name in ("a0", "a1", "b0"):
        await got[name].ack()
    await got["a2"].nack(delay=4.0)
    for name in ("a3", "a4", "a5"):
        await got[name].ack()  # copies from before the rewind: stale, they must not commit
    await broker.publish(topic, [env("b1", key=kb)])
    flowing = await recv(sub)
    assert op_of(flowing) == "b1", "the other partition keeps flowing while one is paused"
    await flowing.ack()
    pa, pb = partition_of(ka, 2), partition_of(kb, 2)
    await until(
        lambda: _committed_is(broker, topic, g, {pa: 2, pb: 2}),
        seconds=WAIT,
        what="commit of the contiguous acks",
    )
    again = await recv_n(sub, 4)
    assert [(op_of(d), d.attempt, d.redelivered) for d in again] == [
        (f"a{i}", 2, True) for i in range(2, 6)
    ]
    assert [where(d)[1] for d in again] == [2, 3, 4, 5]
    for d in again:
        await d.ack()
    await until(
        lambda: _committed_is(broker, topic, g, {pa: 6, pb: 2}), seconds=WAIT, what="final commit"
    )
    await nothing(sub)


async def _committed_is(broker: KafkaBroker, topic: str, g: str, want: dict[int, int]) -> bool:
    got = await broker.committed(topic, g)
    return all(got.get(p) == off for p, off in want.items())


@pytest.mark.parametrize(
    ("how", "commit_interval", "lost_acks"),
    [
        ("crash", 0.0, False),  # commits follow the acks: only uncommitted records come back
        ("crash", 60.0, True),  # a crash before the batched commit loses every ack
        ("close", 60.0, False),  # a graceful close commits what is done
    ],
)
async def test_a_new_consumer_gets_exactly_the_uncommitted_records(
    kit: Kit, how: str, commit_interval: float, lost_acks: bool
) -> None:
    broker = kit.broker(commit_interval=commit_interval)
    topic = await kit.topic(3)
    keys = keys_for(3)
    g = group()
    a = await kit.subscribe(broker, topic, g)
    await broker.publish(topic, [env(f"{p}-{i}", key=keys[p]) for i in range(6) for p in range(3)])
    got = await recv_n(a, 18)
    by_part: dict[int, list[Delivery]] = defaultdict(list)
    for d in got:
        by_part[where(d)[0]].append(d)
    # partition 0: all acked; 1: offset 3 unfinished, 4 and 5 acked out of order; 2: none acked
    skip = {0: set(), 1: {3}, 2: set(range(6))}
    for p, ds in by_part.items():
        for d in ds:
            if where(d)[1] not in skip[p]:
                await d.ack()
    await a.close(abandon=how == "crash")
    if lost_acks:
        expected = {op_of(d) for d in got}
    else:
        expected = {op_of(d) for d in got if where(d)[1] >= min(skip[where(d)[0]], default=6)}
    b = await kit.subscribe(broker, topic, g)
    again = await recv_n(b, len(expected))
    assert {op_of(d) for d in again} == expected
    # attempts as far as this broker object knows: each was handed out once before
    assert all(d.attempt == 2 and d.redelivered for d in again)
    await nothing(b)


async def test_a_joining_consumer_mid_batch_loses_nothing_and_duplicates_only_uncommitted(
    kit: Kit,
) -> None:
    broker = kit.broker(drain_timeout=4.0)
    topic = await kit.topic(4)
    keys = keys_for(4)
    g = group()
    a = await kit.subscribe(broker, topic, g)
    first = [env(f"first-{p}-{i}", key=keys[p]) for i in range(8) for p in range(4)]
    await broker.publish(topic, first)
    got = await recv_n(a, len(first))
    by_part: dict[int, list[Delivery]] = defaultdict(list)
    for d in got:
        by_part[where(d)[0]].append(d)
    late, never = by_part[1][2], by_part[2][2]
    for d in got:
        if d is not late and d is not never:
            await d.ack()
    await until(
        lambda: _committed_is(broker, topic, g, {0: 8, 1: 2, 2: 2, 3: 8}),
        seconds=WAIT,
        what="commits before B",
    )

    async def settle_late() -> None:
        await asyncio.sleep(1.0)  # while A's revoke drains (drain_timeout=4 s)
        await late.ack()

    releaser = asyncio.ensure_future(settle_late())
    b = await kit.subscribe(broker, topic, g)  # the rebalance: A drains, commits, re-joins
    await releaser
    second = [env(f"second-{p}-{i}", key=keys[p]) for i in range(3) for p in range(4)]
    await broker.publish(topic, second)
    # "never" was still out when the drain ended: its partition resumes from it
    uncommitted = {op_of(d) for d in by_part[2][2:]}
    want = uncommitted | {e.operation_id for e in second}
    seen: list[Delivery] = []
    pumps = [asyncio.ensure_future(_pump(s, seen)) for s in (a, b)]
    try:
        await until(
            lambda: want <= {op_of(d) for d in seen}, seconds=WAIT, what="every record after B"
        )
        await asyncio.sleep(1.5)  # anything else that was going to come
    finally:
        for t in pumps:
            t.cancel()
        await asyncio.wait(pumps)
    await never.ack()  # from before the rebalance: stale, ignored
    from_first = {op_of(d) for d in seen if op_of(d).startswith("first-")}
    assert from_first == uncommitted, "only records after the unfinished one come again"
    assert {op_of(d) for d in seen} == want
    assert all(d.redelivered for d in seen if op_of(d) in uncommitted)
    await until(
        lambda: _committed_is(broker, topic, g, {p: 11 for p in range(4)}),
        seconds=WAIT,
        what="everything committed after the rebalance",
    )


async def test_a_saturated_consumer_still_lets_the_group_rebalance(kit: Kit) -> None:
    broker = kit.broker(drain_timeout=1.0)
    topic = await kit.topic(2)
    keys = keys_for(2)
    g = group()
    a = await kit.subscribe(broker, topic, g, prefetch=2)
    await broker.publish(
        topic, [env(f"s-{p}-{i}", key=keys[p]) for i in range(4) for p in range(2)]
    )
    held = await recv_n(a, 2)  # A's handlers hold every slot and do not finish
    await asyncio.sleep(2.0)  # saturated past the keepalive threshold, buffer full
    # without the keepalive A would never call consume again, never rejoin, and B would wait
    # for the group forever
    b = await kit.subscribe(broker, topic, g)
    got = await recv_n(b, 4)
    parts = {where(d)[0] for d in got}
    assert len(parts) == 1, "B owns one of the two partitions"
    # nothing was committed (A's drain ended with its records unsettled): all of it comes again
    assert sorted(where(d)[1] for d in got) == [0, 1, 2, 3]
    for d in held:
        await d.ack()  # stale by now: must not commit anything for B's partition
    for d in got:
        await d.ack()
    (p,) = parts
    await until(lambda: _committed_is(broker, topic, g, {p: 4}), seconds=WAIT, what="B's commit")


async def _pump(sub: Subscription, seen: list[Delivery]) -> None:
    async for d in sub:
        seen.append(d)
        await d.ack()


async def test_committed_and_lag_report_the_groups_progress(kit: Kit) -> None:
    broker = kit.broker()
    topic = await kit.topic(1)
    g = group()
    assert await broker.committed(topic, g) == {0: None}
    sub = await kit.subscribe(broker, topic, g)
    # one multi-record batch: Tansu reports the high watermark of such a batch as its base
    # offset + 1, and lag() must still count the records behind it (it reads the end)
    await broker.publish(topic, [env(f"l{i}", key="k") for i in range(5)])
    first, second, *_ = await recv_n(sub, 5)
    await first.ack()
    await second.ack()
    await until(lambda: _committed_is(broker, topic, g, {0: 2}), seconds=WAIT, what="commit")
    assert await broker.lag(topic, g) == {0: 3}


async def test_lag_reads_the_end_of_every_partition_in_one_pass(
    kit: Kit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lag()`` on a topic of several partitions, each holding multi-record batches (whose end
    Tansu's watermark undercounts): exact per partition, and every partition's end is read in one
    assignment. One per partition cost a last empty poll each: ~0.9 s a partition on Tansu here,
    so ``replaysafe run``'s start-up check (7 s for all handlers) refused an 8-partition topic."""
    broker = kit.broker()
    topic = await kit.topic(4)
    keys = keys_for(4)
    for i in range(3):  # three batches of two records per partition
        await broker.publish(topic, [env(f"p{k}-{i}-{j}", key=k) for k in keys for j in range(2)])
    g = group()
    sub = await kit.subscribe(broker, topic, g)
    got = await recv_n(sub, 24)
    first = next(d for d in got if where(d) == (partition_of(keys[0], 4), 0))
    await first.ack()
    p0 = partition_of(keys[0], 4)
    await until(lambda: _committed_is(broker, topic, g, {p0: 1}), seconds=WAIT, what="commit")
    assigned: list[int] = []
    real = broker._ck

    class Consumer:
        def __init__(self, conf: dict[str, Any]) -> None:
            self._c = real.Consumer(conf)

        def assign(self, partitions: list[Any]) -> None:
            assigned.append(len(partitions))
            self._c.assign(partitions)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._c, name)

    class Driver:
        def __getattr__(self, name: str) -> Any:
            return Consumer if name == "Consumer" else getattr(real, name)

    monkeypatch.setattr(broker, "_ck", Driver())
    assert await broker.lag(topic, g) == {p: 5 if p == p0 else 6 for p in range(4)}
    assert assigned == [4]
    await sub.close(abandon=True)


async def test_group_state_and_stray_groups_read_lag_and_members(
    kit: Kit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``replaysafe run``'s start-up check and ``explain`` read (#13 items 5, 6): a group's
    lag and members, ``exists`` False until it committed or joined; the groups named with the
    app's prefix that committed on the topic. Each group's offsets are fetched once (``lag``
    used to fetch them again)."""
    broker = kit.broker()
    fetched: list[str] = []
    real = broker.committed

    async def committed(topic: str, group: str) -> dict[int, int | None]:
        fetched.append(group)
        return await real(topic, group)

    monkeypatch.setattr(broker, "committed", committed)
    topic = await kit.topic(1)
    prefix = f"{group()}."
    g = prefix + "capture"
    name = broker.group_name(topic, g)
    await broker.publish(topic, [env(f"s{i}", key="k") for i in range(3)])
    assert await broker.group_state(topic, g) == GroupState(topic, g, name, 3, 0, False)
    sub = await kit.subscribe(broker, topic, g)
    first, *_ = await recv_n(sub, 3)
    await first.ack_confirmed()
    await sub.close()
    state = GroupState(topic, g, name, 2, 0, True)
    fetched.clear()
    assert await broker.group_state(topic, g) == state
    assert await broker.stray_groups(topic, prefix) == [state]
    assert fetched == [g, g]
    assert await broker.stray_groups(topic, f"{group()}.") == []


async def test_ack_confirmed_returns_once_the_commit_covers_the_record(kit: Kit) -> None:
    """At-most-once runs its effect after the completion: on Kafka that is the commit, which
    ``ack()`` only requests. ``ack_confirmed()`` waits for it, so a kill right after it cannot
    bring the record back (a plain ack can: 21 duplicates under at-most-once in a chaos run)."""
    broker = kit.broker()
    topic = await kit.topic(1)
    g = group()
    sub = await kit.subscribe(broker, topic, g)
    await broker.publish(topic, [env(f"c{i}", key="k") for i in range(3)])
    a, b, c = await recv_n(sub, 3)
    await a.ack_confirmed()
    assert await broker.committed(topic, g) == {0: 1}  # no waiting: it is there already
    await b.ack_confirmed()
    assert await broker.committed(topic, g) == {0: 2}
    await sub.close(abandon=True)
    with pytest.raises(BrokerUnavailable, match="not confirmed"):
        await c.ack_confirmed()


async def test_a_seek_refused_for_the_partitions_state_is_retried_not_fatal(
    kit: Kit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a SIGSTOP outlives the session, librdkafka drops the partitions before the revoke
    callback runs, and the seek of a due rewind fails with _STATE: the subscription must keep the
    rewind pending (nothing past it committed) rather than fail the whole consumer."""
    from confluent_kafka import KafkaError, KafkaException

    broker = kit.broker()
    topic = await kit.topic(1)
    g = group()
    sub = await kit.subscribe(broker, topic, g)
    await broker.publish(topic, [env(f"s{i}", key="k") for i in range(3)])
    first, *rest = await recv_n(sub, 3)
    refusals = 0
    real = type(sub)._seek_resume  # type: ignore[attr-defined]

    def flaky(self: Any, tp: Any, offset: int, paused: bool) -> None:
        nonlocal refusals
        if refusals < 3:
            refusals += 1
            raise KafkaException(KafkaError(KafkaError._STATE, "Erroneous state"))
        real(self, tp, offset, paused)

    monkeypatch.setattr(type(sub), "_seek_resume", flaky)
    await first.nack(delay=0.0)
    again = await recv_n(sub, 3)
    assert refusals == 3
    assert [(op_of(d), d.attempt) for d in again] == [("s0", 2), ("s1", 2), ("s2", 2)]
    for d in again:
        await d.ack()
    await until(
        lambda: _committed_is(broker, topic, g, {0: 3}), seconds=WAIT, what="commit after the seek"
    )
    del rest


async def test_next_batch_hands_out_what_is_buffered_within_prefetch(kit: Kit) -> None:
    broker = kit.broker()
    topic = await kit.topic(1)
    sub = await kit.subscribe(broker, topic, group(), prefetch=5)
    await broker.publish(topic, [env(f"n{i}", key="k") for i in range(8)])
    await asyncio.sleep(1.0)  # let the fetcher buffer them
    batch = await sub.next_batch(10)
    assert 1 < len(batch) <= 5
    waiting = asyncio.ensure_future(sub.next_batch(10))
    await asyncio.sleep(0.5)
    assert not waiting.done() or len(batch) < 5, "prefetch=5 unsettled must block"
    for d in batch:
        await d.ack()
    more = await asyncio.wait_for(waiting, WAIT)
    assert [op_of(d) for d in batch + more] == [f"n{i}" for i in range(len(batch) + len(more))]


# --------------------------------------------------------------------------- end to end

EO, ALO = Guarantee.EFFECTIVELY_ONCE, Guarantee.AT_LEAST_ONCE


async def _run_app(
    kit: Kit, tmp_path: Path, guarantee: Guarantee, probe: EffectProbe
) -> dict[str, Any]:
    """50 operations (plus 10 duplicate copies) through the real runtime; the worker is killed
    once right after the effect of one operation and a new worker takes over."""
    broker = kit.broker()
    topic = await kit.topic(4)
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    failpoints = Failpoints()
    app = App(f"e2e-{uuid.uuid4().hex[:6]}", broker=broker, ledger=ledger, failpoints=failpoints)

    async def charge(ctx: Context) -> str:
        payload = ctx.payload
        return await probe.apply(payload["order"], payload["amount"], ctx.idempotency_key)

    app.handler(
        topic,
        guarantee=guarantee,
        effect=Effect.keyed("payments") if guarantee is EO else None,
        lease=2.0,
        retry=RetryPolicy(max_attempts=20, base_delay=0.05, max_delay=0.3),
        concurrency=8,
        name="charge",
    )(charge)
    now = time.time()
    ops = [
        Envelope.of(
            f"charge:order-{i}",
            {"order": f"order-{i}", "amount": 100 + i},
            key=f"customer-{i % 7}",
            published_at=now,
        )
        for i in range(50)
    ]
    victim = ops[17].operation_id
    failpoints.enable(
        fp.AFTER_EFFECT_BEFORE_LEDGER,
        "kill",
        when=lambda ctx: ctx.get("operation_id") == victim,
        times=1,
    )
    await broker.publish(topic, ops[:30])
    await broker.publish(topic, ops[::5] + ops[30:])  # 10 duplicate transport copies
    workers: list[Any] = []
    crashes = 0
    done = asyncio.Event()

    async def supervise() -> None:
        nonlocal crashes
        while not done.is_set():
            w = Worker(app, owner=f"w{len(workers)}")
            workers.append(w)
            stopper = asyncio.ensure_future(_stop_when(done, w))
            try:
                await w.run(drain_timeout=5)
            except SimulatedCrash:
                crashes += 1
            finally:
                stopper.cancel()

    supervisor = asyncio.ensure_future(supervise())
    subjects = {f"order-{i}" for i in range(50)}
    group_name = app.handlers["charge"].group
    records = Counter(partition_of(e.key or "", 4) for e in ops[:30] + ops[::5] + ops[30:])
    try:
        await until(lambda: not probe.missing(subjects), seconds=90, what="every operation applied")
        await until(
            lambda: _committed_is(broker, topic, group_name, dict(records)),
            seconds=60,
            what="every record committed",
        )
    finally:
        done.set()
        await asyncio.wait_for(supervisor, WAIT)
    result = {
        "fired": failpoints.fired[fp.AFTER_EFFECT_BEFORE_LEDGER],
        "crashes": crashes,
        "generations": len(workers),
        "duplicate_hits": sum(w.stats.total(o.DUPLICATE_HITS) for w in workers),
        "victim": victim,
        "states": [(await ledger.get(OpKey("charge", e.operation_id))) for e in ops]
        if guarantee is EO
        else [],
    }
    await ledger.close()
    return result


async def _stop_when(done: asyncio.Event, w: Any) -> None:
    await done.wait()
    w.stop()


async def test_effectively_once_on_kafka_applies_each_operation_once(
    kit: Kit, tmp_path: Path
) -> None:
    probe = EffectProbe(honour_keys=True)
    r = await _run_app(kit, tmp_path, EO, probe)
    assert r["fired"] == 1 and r["crashes"] == 1, "the crash never hit its window"
    assert r["generations"] >= 2
    assert probe.per_subject() == Counter({f"order-{i}": 1 for i in range(50)})
    # the re-run after the crash carried the same idempotency key: answered, not re-applied
    assert probe.replays_answered >= 1
    assert r["duplicate_hits"] >= 10  # the duplicate copies, answered from the ledger
    assert all(rec is not None and rec.state is State.COMPLETED for rec in r["states"])


async def test_at_least_once_on_kafka_duplicates_but_never_loses(kit: Kit, tmp_path: Path) -> None:
    probe = EffectProbe(honour_keys=False)
    r = await _run_app(kit, tmp_path, ALO, probe)
    assert r["fired"] == 1 and r["crashes"] == 1, "the crash never hit its window"
    seen = probe.per_subject()
    assert not probe.missing({f"order-{i}" for i in range(50)})
    assert seen["order-17"] >= 2, "the effect before the crash is applied again"
    # the 10 duplicate transport copies are applied twice as well: nothing deduplicates them
    assert all(seen[f"order-{i}"] >= 2 for i in range(0, 50, 5))
