"""RabbitMQBroker against the local RabbitMQ: the broker contract (quorum and classic queues), the
RabbitMQ-specific behaviour (channel loss, retry queues, dead-lettering, confirms, reconnects) and
the runtime end to end.

Faults on the wire come from a TCP proxy in this process (pause the server->client direction to
lose confirms, drop every connection to cut the link): the server stays real and shared, nothing
here touches its global state. Every queue and exchange is unique per test and deleted after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from replaysafe import App, Context, Effect, Envelope, Guarantee, RetryPolicy, Worker
from replaysafe import failpoints as fp
from replaysafe import observe as o
from replaysafe.brokers.base import Broker, Delivery, Subscription
from replaysafe.brokers.rabbitmq import (
    ATTEMPTS_HEADER,
    KEY_HEADER,
    QueueType,
    RabbitMQBroker,
    RabbitMQDelivery,
    Topology,
    redact_url,
    retry_band,
)
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.envelope import HEADER_OPERATION_ID, decode_wire
from replaysafe.errors import (
    BadInput,
    BrokerError,
    BrokerUnavailable,
    CapabilityError,
    ConfigurationError,
    MissingExtra,
    PublishAmbiguous,
    SimulatedCrash,
)
from replaysafe.failpoints import Failpoints
from replaysafe.ledger import OpKey, SQLiteLedger, State
from replaysafe.testing import EffectProbe
from replaysafe.testing.contracts.broker import BrokerCase, BrokerContract
from replaysafe.testing.netcut import CutRelay

from .conftest import free_port
from .runtime_harness import once_for
from .waits import until

RECEIVE = 15.0  # real seconds to wait for a delivery that must come (a slow, shared machine)


# --------------------------------------------------------------------------- the contract


class _RabbitContract(BrokerContract):
    """Real server, real time: short timers, sleeps for advance/quiesce."""

    queue_type: QueueType = "quorum"
    receive_timeout = RECEIVE
    # the delayed-nack case sleeps (delay - margin) between two quiesces: 2 * quiesce must stay
    # well inside the margin on a loaded machine, or the copy's return lands inside the window
    timer_margin = 1.0
    nack_delay = 3.0
    quiet = 0.25

    @pytest.fixture(autouse=True)
    def _server(self, amqp_url: str) -> None:
        self.url = amqp_url

    async def make_broker(self, clock: Clock) -> Broker:
        return RabbitMQBroker(
            self.url, clock=clock, failpoints=Failpoints(), queue_type=self.queue_type
        )

    def make_clock(self) -> Clock:
        return SYSTEM_CLOCK

    async def prepare_source(self, broker: Broker, source: str) -> None:
        assert isinstance(broker, RabbitMQBroker)
        await broker.declare(source)

    async def advance(self, clock: Clock, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def quiesce(self, clock: Clock) -> None:
        await asyncio.sleep(self.quiet)

    @contextlib.asynccontextmanager
    async def case(self) -> AsyncIterator[BrokerCase]:
        declared: dict[str, frozenset[str]] = {}
        try:
            async with super().case() as c:
                try:
                    yield c
                finally:
                    assert isinstance(c.broker, RabbitMQBroker)
                    declared = dict(c.broker.declared)
        finally:
            await _delete_topology(self.url, declared)


class TestRabbitMQQuorumContract(_RabbitContract):
    queue_type = "quorum"


class TestRabbitMQClassicContract(_RabbitContract):
    queue_type = "classic"


async def _delete_topology(url: str, declared: dict[str, frozenset[str]]) -> None:
    if not declared:
        return
    cleaner = RabbitMQBroker(url, failpoints=Failpoints())
    try:
        for source, groups in declared.items():
            await cleaner.delete(source, groups)
    finally:
        await cleaner.close()


# --------------------------------------------------------------------------- helpers


class Rabbit:
    """Brokers and names for one test; deletes everything they declared afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.source = f"rs-test-{uuid.uuid4().hex[:10]}"
        self.group = "g-" + uuid.uuid4().hex[:8]
        self.brokers: list[RabbitMQBroker] = []

    def broker(self, url: str | None = None, **kw: Any) -> RabbitMQBroker:
        kw.setdefault("failpoints", Failpoints())
        b = RabbitMQBroker(url or self.url, **kw)
        self.brokers.append(b)
        return b

    @property
    def topology(self) -> Topology:
        return Topology.of(self.source, self.group)

    async def cleanup(self) -> None:
        declared: dict[str, set[str]] = {}
        for b in self.brokers:
            with contextlib.suppress(Exception):
                await b.close()
            for s, gs in b.declared.items():
                declared.setdefault(s, set()).update(gs)
        declared.setdefault(self.source, set()).add(self.group)
        await _delete_topology(self.url, {s: frozenset(g) for s, g in declared.items()})


@pytest.fixture
async def rabbit(amqp_url: str) -> AsyncIterator[Rabbit]:
    r = Rabbit(amqp_url)
    try:
        yield r
    finally:
        await r.cleanup()


def env(op: str, n: int = 0, **kw: Any) -> Envelope:
    return Envelope.of(op, {"op": op, "n": n}, published_at=time.time(), **kw)


def op_of(d: Delivery) -> str:
    return d.headers[HEADER_OPERATION_ID]


async def recv(sub: Subscription, seconds: float = RECEIVE) -> Delivery:
    try:
        async with asyncio.timeout(seconds):
            return await anext(sub)
    except TimeoutError:
        pytest.fail(f"no delivery within {seconds}s")


async def nothing(sub: Subscription, seconds: float) -> None:
    """Assert ``sub`` yields nothing for ``seconds`` of real time."""
    task = asyncio.ensure_future(anext(sub))
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        await asyncio.wait({task})
        return
    if task.exception() is None:
        d = task.result()
        pytest.fail(f"unexpected delivery of {op_of(d)!r} (attempt {d.attempt})")


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[CutRelay]:
    p = CutRelay.for_url(amqp_url)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


async def raw_get(url: str, queue: str) -> Any:
    """One message from ``queue`` through a plain aio-pika client (acked), or None."""
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        q = await ch.get_queue(queue, ensure=False)
        msg = await q.get(fail=False, timeout=5)
        if msg is not None:
            await msg.ack()
        return msg
    finally:
        await conn.close()


# --------------------------------------------------------------------------- configuration


def test_names_are_escaped_composites_and_refuse_reserved_ones() -> None:
    assert Topology.of("a/b", "c").queue != Topology.of("a", "b/c").queue
    t = Topology.of("orders", "billing")
    assert (t.exchange, t.queue, t.dead_letter_queue) == (
        "orders",
        "orders/billing",
        "orders/billing/dead",
    )
    assert t.retry_queue(4) == "orders/billing/retry/4s"
    assert Topology.of("50%/x", "g").queue == "50%25%2Fx/g"
    with pytest.raises(ConfigurationError, match="amq"):
        Topology.of("amq.direct", "g")
    with pytest.raises(ConfigurationError, match="255"):
        Topology.of("o" * 250, "g")
    with pytest.raises(ConfigurationError):
        Topology.of("orders", "")


def test_retry_bands_never_shorten_and_at_most_double() -> None:
    assert retry_band(0.001) == 1
    assert retry_band(1.0) == 1
    assert retry_band(1.01) == 2
    assert retry_band(2.0) == 2
    assert retry_band(3.0) == 4
    for _ in range(200):
        d = random.uniform(1.0, 86_400.0)
        band = retry_band(d)
        assert d <= band < 2 * d
    assert retry_band(10**9) == retry_band(86_400.0)  # clamped


def test_url_password_is_redacted_and_config_is_validated(amqp_url: str) -> None:
    b = RabbitMQBroker("amqp://app:s3cret@rabbit.example:5672/vh")
    assert "s3cret" not in repr(b) and "***" in repr(b)
    assert redact_url("amqps://u:p@[::1]:5671/") == "amqps://u:***@[::1]:5671/"
    assert redact_url("amqp://127.0.0.1/") == "amqp://127.0.0.1/"
    with pytest.raises(ConfigurationError, match="amqp://") as info:
        RabbitMQBroker("http://u:s3cret@host/")
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigurationError):
        RabbitMQBroker(amqp_url, queue_type="stream")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        RabbitMQBroker(amqp_url, queue_type="classic", delivery_limit=5)
    with pytest.raises(ConfigurationError):
        RabbitMQBroker(amqp_url, confirm_timeout=0)
    b2 = RabbitMQBroker.from_url(amqp_url, queue_type="classic")
    assert isinstance(b2, RabbitMQBroker)
    assert b2.capabilities("x").delivery_count is False
    caps = RabbitMQBroker(amqp_url).capabilities("x")
    assert (caps.delivery_count, caps.delayed_nack, caps.extend_visibility) == (True, True, False)
    assert caps.independent_groups is True


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "aio_pika", None)
    with pytest.raises(MissingExtra, match=r"replaysafe\[rabbitmq\]"):
        RabbitMQBroker()


async def test_unreachable_server_and_bad_password_are_mapped_and_redacted(
    amqp_url: str,
) -> None:
    nobody = RabbitMQBroker(
        f"amqp://guest:s3cret@127.0.0.1:{free_port()}/", connect_timeout=3, failpoints=Failpoints()
    )
    with pytest.raises(BrokerUnavailable) as info:
        await nobody.publish("x", [env("op")])
    assert "s3cret" not in str(info.value) and "***" in str(info.value)
    await nobody.close()
    parts = urlsplit(amqp_url)
    wrong = urlunsplit(
        (parts.scheme, f"guest:wr0ng-pass@{parts.hostname}:{parts.port or 5672}", "/", "", "")
    )
    bad = RabbitMQBroker(wrong, connect_timeout=5, failpoints=Failpoints())
    with pytest.raises(ConfigurationError, match="credentials") as auth:
        await bad.connect()
    assert "wr0ng-pass" not in str(auth.value)
    await bad.close()


async def test_describe_states_the_facts_explain_needs(amqp_url: str) -> None:
    b = RabbitMQBroker(amqp_url, failpoints=Failpoints())
    try:
        facts = await b.describe("payments")
        assert facts.broker == "rabbitmq"
        assert facts.dead_letter is not None and facts.dead_letter.startswith("payments/")
        assert facts.retention is None and facts.visibility_timeout is None
        assert facts.broker_timestamps is False  # the publisher stamps AMQP timestamps
        assert b.server_version is not None
        if b.server_version < (4,):
            assert facts.delivery_limit is None  # 3.x quorum queues have no default limit
        else:
            assert facts.delivery_limit == 20
    finally:
        await b.close()
    limited = RabbitMQBroker(amqp_url, failpoints=Failpoints(), delivery_limit=7)
    try:
        assert (await limited.describe("payments")).delivery_limit == 7
    finally:
        await limited.close()


async def test_redeclare_with_another_queue_type_is_a_configuration_error(rabbit: Rabbit) -> None:
    classic = rabbit.broker(queue_type="classic")
    await classic.declare(rabbit.source, [rabbit.group])
    await classic.declare(rabbit.source, [rabbit.group])  # idempotent
    quorum = rabbit.broker()
    with pytest.raises(ConfigurationError, match=r"x-queue-type|other settings"):
        await quorum.declare(rabbit.source, [rabbit.group])
    # the refusal closed only a short-lived channel: the broker still works
    other = "g2-" + uuid.uuid4().hex[:6]
    await quorum.declare(rabbit.source, [other])
    await quorum.delete(rabbit.source, [other])


# --------------------------------------------------------------------------- publish


async def test_unroutable_publish_raises_and_stores_nothing(rabbit: Rabbit) -> None:
    b = rabbit.broker()
    with pytest.raises(BrokerError, match="unroutable") as info:
        await b.publish(rabbit.source, [env("lost")])
    assert not isinstance(info.value, PublishAmbiguous)  # nothing was stored: not ambiguous
    assert "declare" in str(info.value)
    # declared up front, a message published before the first subscribe is kept
    await b.declare(rabbit.source, [rabbit.group])
    await b.publish(rabbit.source, [env("kept")])
    sub = await b.subscribe(rabbit.source, rabbit.group)
    d = await recv(sub)
    assert op_of(d) == "kept"
    await d.ack()
    await nothing(sub, 0.5)


async def test_wire_format_and_a_batch_with_duplicate_copies(rabbit: Rabbit) -> None:
    b = rabbit.broker()
    sub = await b.subscribe(rabbit.source, rabbit.group, prefetch=50)
    sent = [env(f"op-{i % 7}", i % 7, key=f"k{i % 3}") for i in range(20)]  # duplicates
    await b.publish(rabbit.source, sent)
    got = [await recv(sub) for _ in sent]
    assert sorted(op_of(d) for d in got) == sorted(e.operation_id for e in sent)
    d = got[0]
    assert isinstance(d, RabbitMQDelivery)
    assert d.message.message_id == op_of(d)  # AMQP message_id carries the operation id
    assert d.content_type == "application/json"
    assert d.key is not None and d.key.startswith("k")
    assert KEY_HEADER not in d.headers and "x-delivery-count" not in d.headers
    assert d.broker_timestamp is not None and abs(d.broker_timestamp - time.time()) < 120
    for x in got:
        decoded = decode_wire(x.body, x.headers, content_type=x.content_type, key=x.key)
        assert decoded.value == {"op": decoded.operation_id, "n": int(decoded.operation_id[3:])}
        await x.ack()


async def test_plain_client_message_arrives_as_a_delivery(rabbit: Rabbit) -> None:
    import aio_pika

    b = rabbit.broker()
    sub = await b.subscribe(rabbit.source, rabbit.group)
    conn = await aio_pika.connect(rabbit.url)
    try:
        ch = await conn.channel()
        ex = await ch.get_exchange(rabbit.source)
        headers: Any = {
            "n": 7,
            "flag": True,
            "raw": bytearray(b"\xff\xfe"),
            "x-replaysafe-attempts": "junk",
        }
        await ex.publish(aio_pika.Message(b"not json{", headers=headers), routing_key="")
    finally:
        await conn.close()
    d = await recv(sub)  # never raises in the adapter: the runtime quarantines it
    assert d.body == b"not json{"
    assert d.headers == {"n": "7", "flag": "true", "raw": "\ufffd\ufffd"}
    assert d.attempt == 1 and d.redelivered is False and d.key is None
    with pytest.raises(BadInput):
        decode_wire(d.body, d.headers, content_type=d.content_type)
    await d.ack()


async def test_confirm_that_never_comes_is_ambiguous_and_the_message_may_exist(
    rabbit: Rabbit, proxy: CutRelay
) -> None:
    direct = rabbit.broker()
    await direct.declare(rabbit.source, [rabbit.group])
    via = rabbit.broker(proxy.url(rabbit.url), confirm_timeout=1.0)
    await via.publish(rabbit.source, [env("warm-up")])
    proxy.hold_replies()  # the server accepts, its confirm never reaches us
    with pytest.raises(PublishAmbiguous, match="confirm"):
        await via.publish(rabbit.source, [env("maybe")])
    proxy.release()
    sub = await direct.subscribe(rabbit.source, rabbit.group)
    seen = {op_of(d) for d in [await recv(sub), await recv(sub)]}
    # "ambiguous" was the honest answer: the broker had stored it
    assert seen == {"warm-up", "maybe"}


async def test_connection_lost_after_send_is_ambiguous_and_the_publisher_reconnects(
    rabbit: Rabbit, proxy: CutRelay
) -> None:
    via = rabbit.broker(proxy.url(rabbit.url), confirm_timeout=20.0, reconnect_interval=0.2)
    await via.declare(rabbit.source, [rabbit.group])
    await via.publish(rabbit.source, [env("before")])
    proxy.hold_replies()
    pending = asyncio.ensure_future(via.publish(rabbit.source, [env("cut")]))
    await asyncio.sleep(0.5)
    assert not pending.done()
    proxy.cut()
    proxy.release()
    with pytest.raises(PublishAmbiguous):
        async with asyncio.timeout(RECEIVE):
            await pending
    # the robust connection comes back on its own; the next publish goes through
    async with asyncio.timeout(RECEIVE):
        while True:
            try:
                await via.publish(rabbit.source, [env("after")])
                break
            except (BrokerUnavailable, PublishAmbiguous):
                await asyncio.sleep(0.2)
    assert proxy.connections >= 2  # the first connection and the reconnect
    sub = await rabbit.broker().subscribe(rabbit.source, rabbit.group)
    seen = set()
    async with asyncio.timeout(RECEIVE):
        while "after" not in seen:
            d = await anext(sub)
            seen.add(op_of(d))
            await d.ack()
    assert {"before", "after"} <= seen


# --------------------------------------------------------------------------- consume


async def test_channel_closed_after_the_effect_and_before_the_ack_redelivers(
    rabbit: Rabbit,
) -> None:
    b = rabbit.broker()
    sub = await b.subscribe(rabbit.source, rabbit.group)
    await b.publish(rabbit.source, [env("effect-done")])
    d = await recv(sub)
    assert isinstance(d, RabbitMQDelivery) and d.attempt == 1
    # the effect happened; now the server closes the channel (an ack of an unknown delivery
    # tag is a channel error in AMQP: RabbitMQ answers with 406 and closes the channel)
    channel = d.message.channel
    await channel.basic_ack(delivery_tag=10_000)
    await until(lambda: channel.is_closed, seconds=RECEIVE, what="server closed the channel")
    await d.ack()  # on a dead channel: logged, not raised
    assert d.settled
    again = await recv(sub)  # the subscription's channel reopened and consumes again
    assert op_of(again) == "effect-done"
    assert again.redelivered is True
    assert again.attempt == 2
    await again.ack()
    await nothing(sub, 1.0)


async def test_consumer_survives_connection_loss(rabbit: Rabbit, proxy: CutRelay) -> None:
    b = rabbit.broker(proxy.url(rabbit.url), reconnect_interval=0.2)
    sub = await b.subscribe(rabbit.source, rabbit.group, prefetch=4)
    await b.publish(rabbit.source, [env("held"), env("buffered")])
    held = await recv(sub)
    proxy.cut()
    await held.ack()  # the connection is gone: logged, not raised
    got = {}
    async with asyncio.timeout(RECEIVE * 2):
        while len(got) < 2:
            d = await anext(sub)
            got[op_of(d)] = d
    assert set(got) == {"held", "buffered"}
    assert got[op_of(held)].redelivered is True
    for d in got.values():
        await d.ack()
    await nothing(sub, 1.0)


async def test_a_settle_racing_a_close_never_kills_the_shared_connection(
    rabbit: Rabbit, proxy: CutRelay
) -> None:
    # A frame on a channel RabbitMQ has closed is a *connection* error (504 "expected
    # 'channel.open'"): one late ack from a dying worker would take down every subscription on
    # the connection. Holding the server's replies keeps the close in progress for as long as
    # the test needs.
    b = rabbit.broker(proxy.url(rabbit.url), connect_timeout=5.0)
    a = await b.subscribe(rabbit.source, rabbit.group)
    other = "g2-" + uuid.uuid4().hex[:8]
    survivor = await b.subscribe(rabbit.source, other)  # same consuming connection
    await b.publish(rabbit.source, [env("x")])
    late, held = await recv(a), await recv(survivor)
    proxy.hold_replies()
    closing = asyncio.ensure_future(a.close(abandon=True))
    await asyncio.sleep(0.5)  # channel.close is on the wire, its close-ok held back
    await late.ack()  # settled after the close began: must not reach the wire
    proxy.release()
    async with asyncio.timeout(RECEIVE):
        await closing
    await held.ack()
    await b.publish(rabbit.source, [env("y")])
    fresh = await recv(survivor)
    assert (op_of(fresh), fresh.attempt) == ("y", 1)
    await fresh.ack()
    await nothing(survivor, 1.0)  # "x" was not requeued to it: the connection survived


async def test_delayed_nack_goes_through_the_retry_queue_and_waits(rabbit: Rabbit) -> None:
    b = rabbit.broker()
    sub = await b.subscribe(rabbit.source, rabbit.group)
    await b.publish(rabbit.source, [env("later")])
    first = await recv(sub)
    delay = 1.5
    t0 = time.monotonic()
    await first.nack(delay=delay)
    topo = rabbit.topology
    depths = await b.queue_depths(rabbit.source, rabbit.group)
    assert depths[topo.retry_queue(2)] == 1, depths  # parked in the 2 s band
    assert depths[topo.queue] == 0
    await nothing(sub, delay - 0.4)
    again = await recv(sub)
    waited = time.monotonic() - t0
    assert waited >= delay - 0.05, f"came back after {waited:.2f}s, asked for {delay}s"
    assert op_of(again) == "later"
    assert isinstance(again, RabbitMQDelivery)
    assert again.redelivered is True and again.attempt == 2
    assert again.amqp_headers[ATTEMPTS_HEADER] == 1
    death = again.amqp_headers["x-death"][0]
    assert (death["queue"], death["reason"]) == (topo.retry_queue(2), "expired")
    assert again.broker_timestamp == first.broker_timestamp  # the first publish time is kept
    await again.ack()
    await nothing(sub, 0.5)
    print(f"\ndelayed nack: asked {delay}s, came back after {waited:.3f}s")


async def test_a_short_delay_is_not_stuck_behind_a_long_one(rabbit: Rabbit) -> None:
    # RabbitMQ expires messages only at the head of a queue: one retry queue for every delay
    # would hold the short retry until the long one expired. The bands keep them apart.
    b = rabbit.broker()
    sub = await b.subscribe(rabbit.source, rabbit.group)
    await b.publish(rabbit.source, [env("long"), env("short")])
    first, second = await recv(sub), await recv(sub)
    by_op = {op_of(first): first, op_of(second): second}
    await by_op["long"].nack(delay=60.0)
    await by_op["short"].nack(delay=0.5)
    # behind the long one it would wait 60 s; the bound is generous for a loaded machine
    back = await recv(sub, seconds=30.0)
    assert op_of(back) == "short"
    await back.ack()
    depths = await b.queue_depths(rabbit.source, rabbit.group)
    assert depths[rabbit.topology.retry_queue(64)] == 1  # the long one still waits in its band


async def test_delayed_nack_without_a_usable_retry_queue_holds_then_requeues(
    rabbit: Rabbit,
) -> None:
    import aio_pika

    b = rabbit.broker()
    sub = await b.subscribe(rabbit.source, rabbit.group)
    # an operator's queue squats the retry queue's name with other settings: the copy cannot
    # be published there, and the original must neither be lost nor spin
    conn = await aio_pika.connect(rabbit.url)
    try:
        ch = await conn.channel()
        await ch.declare_queue(rabbit.topology.retry_queue(1), durable=True)
    finally:
        await conn.close()
    await b.publish(rabbit.source, [env("held-back")])
    first = await recv(sub)
    t0 = time.monotonic()
    await first.nack(delay=1.0)
    assert first.settled
    await nothing(sub, 0.7)
    again = await recv(sub)
    assert time.monotonic() - t0 >= 0.95
    assert op_of(again) == "held-back" and again.redelivered is True and again.attempt == 2
    await again.ack()
    await nothing(sub, 0.5)


async def test_reject_lands_in_the_dead_letter_queue(rabbit: Rabbit) -> None:
    b = rabbit.broker()
    sub = await b.subscribe(rabbit.source, rabbit.group)
    await b.publish(rabbit.source, [env("poison", headers={"x-tenant": "acme"})])
    d = await recv(sub)
    await d.reject("poison pill")
    await nothing(sub, 0.5)
    dead = await raw_get(rabbit.url, rabbit.topology.dead_letter_queue)
    assert dead is not None, "the rejected message is not in the dead-letter queue"
    assert dead.headers[HEADER_OPERATION_ID] == "poison"
    assert dead.headers["x-tenant"] == "acme"
    assert dead.headers["x-death"][0]["reason"] == "rejected"
    assert dead.body == d.body


async def test_past_the_delivery_limit_the_message_is_dead_lettered_not_dropped(
    rabbit: Rabbit,
) -> None:
    b = rabbit.broker(delivery_limit=2)
    sub = await b.subscribe(rabbit.source, rabbit.group)
    await b.publish(rabbit.source, [env("churn")])
    attempts = []
    for _ in range(3):
        d = await recv(sub)
        attempts.append(d.attempt)
        await d.nack()
    assert attempts == [1, 2, 3]
    await nothing(sub, 0.5)  # the broker gave up on it...
    dead = await raw_get(rabbit.url, rabbit.topology.dead_letter_queue)
    assert dead is not None, "past the delivery limit the message was dropped"  # ...not lost
    assert dead.headers[HEADER_OPERATION_ID] == "churn"
    assert dead.headers["x-death"][0]["reason"] == "delivery_limit"


async def test_delivery_count_counts_every_return_on_a_quorum_queue(rabbit: Rabbit) -> None:
    b = rabbit.broker()
    sub = await b.subscribe(rabbit.source, rabbit.group)
    await b.publish(rabbit.source, [env("counted")])
    attempts = []
    for _ in range(3):
        d = await recv(sub)
        attempts.append(d.attempt)
        await d.nack()
    d = await recv(sub)
    attempts.append(d.attempt)
    await sub.close(abandon=True)  # a crash returns it too, and counts
    sub = await b.subscribe(rabbit.source, rabbit.group)
    d = await recv(sub)
    attempts.append(d.attempt)
    await d.nack(delay=0.2)  # the retry hop: a new AMQP message, the count carries over
    d = await recv(sub)
    attempts.append(d.attempt)
    await d.ack()
    assert attempts == [1, 2, 3, 4, 5, 6]


async def test_classic_queue_attempt_is_a_lower_bound(rabbit: Rabbit) -> None:
    b = rabbit.broker(queue_type="classic")
    assert b.capabilities(rabbit.source).delivery_count is False
    sub = await b.subscribe(rabbit.source, rabbit.group)
    await b.publish(rabbit.source, [env("bounded")])
    seen = []
    for _ in range(3):
        d = await recv(sub)
        seen.append((d.attempt, d.redelivered))
        await d.nack()
    await (await recv(sub)).ack()
    # classic queues only say "redelivered": every later attempt reads as (at least) 2
    assert seen == [(1, False), (2, True), (2, True)]


async def test_cancelled_receive_loses_nothing_and_graceful_close_returns_the_rest(
    rabbit: Rabbit,
) -> None:
    b = rabbit.broker()
    a = await b.subscribe(rabbit.source, rabbit.group, prefetch=8)
    waiting = asyncio.ensure_future(anext(a))
    await asyncio.sleep(0.3)
    waiting.cancel()
    await asyncio.wait({waiting})
    await b.publish(rabbit.source, [env(f"m{i}") for i in range(4)])
    first = await recv(a)  # the cancelled call took nothing
    await until(lambda: a._buffer.qsize() == 3, seconds=RECEIVE, what="3 buffered")  # type: ignore[attr-defined]
    batch = await a.next_batch(2)
    assert len(batch) == 2
    await first.ack()
    await a.close()  # 1 buffered, 2 handed out and unsettled: all go back
    other = await b.subscribe(rabbit.source, rabbit.group)
    rest = sorted([op_of(await recv(other)) for _ in range(3)])
    assert rest == sorted({"m0", "m1", "m2", "m3"} - {op_of(first)})
    with pytest.raises(StopAsyncIteration):
        await anext(a)


async def test_extend_names_the_broker_and_the_alternative(rabbit: Rabbit) -> None:
    b = rabbit.broker()
    sub = await b.subscribe(rabbit.source, rabbit.group)
    await b.publish(rabbit.source, [env("x")])
    d = await recv(sub)
    with pytest.raises(CapabilityError, match=r"RabbitMQBroker.*nack\(delay="):
        await d.extend(5)
    await d.ack()


# --------------------------------------------------------------------------- end to end


class Supervised:
    """Workers of one app, restarted after a simulated crash (as a process supervisor would)."""

    def __init__(self, app: App, workers: int) -> None:
        self.app = app
        self.crashes = 0
        self.all: list[Any] = []
        self._done = asyncio.Event()
        self._pool = [asyncio.ensure_future(self._supervise(n)) for n in range(workers)]

    async def _supervise(self, n: int) -> None:
        generation = 0
        while not self._done.is_set():
            w = Worker(self.app, owner=f"w{n}.{generation}")
            self.all.append(w)
            stopper = asyncio.ensure_future(self._stop_on_done(w))
            try:
                await w.run(drain_timeout=10)
            except SimulatedCrash:
                self.crashes += 1
                generation += 1
            finally:
                stopper.cancel()

    async def _stop_on_done(self, w: Any) -> None:
        await self._done.wait()
        w.stop()

    def total(self, name: str, **labels: str) -> int:
        return sum(w.stats.total(name, **labels) for w in self.all)

    async def stop(self) -> None:
        self._done.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*self._pool)


async def _end_to_end(
    rabbit: Rabbit, tmp_path: Path, guarantee: Guarantee
) -> tuple[EffectProbe, Supervised, list[str], str]:
    failpoints = Failpoints()
    broker = rabbit.broker(failpoints=failpoints)
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    app = App("e2e", broker=broker, ledger=ledger, failpoints=failpoints)
    probe = EffectProbe(honour_keys=True)
    effect = Effect.keyed("payments") if guarantee is Guarantee.EFFECTIVELY_ONCE else None

    @app.handler(
        rabbit.source,
        guarantee=guarantee,
        effect=effect,
        group=rabbit.group,
        lease=3.0,
        concurrency=8,
        retry=RetryPolicy(max_attempts=10, base_delay=0.1, max_delay=0.5),
    )
    async def charge(ctx: Context) -> str:
        return await probe.apply(ctx.payload["order"], ctx.payload["amount"], ctx.idempotency_key)

    ops = [f"charge:order-{i}" for i in range(50)]
    copies = [*ops, *ops[::5]]  # 50 operations + 10 duplicate transport copies
    random.Random(7).shuffle(copies)
    victim = ops[17]
    await broker.declare(rabbit.source, [rabbit.group])
    now = time.time()
    await broker.publish(
        rabbit.source,
        [
            Envelope.of(op, {"order": op.split(":")[1], "amount": 100}, published_at=now)
            for op in copies
        ],
    )
    failpoints.enable(fp.AFTER_EFFECT_BEFORE_LEDGER, "kill", when=once_for(victim))
    subjects = [op.split(":")[1] for op in ops]
    sup = Supervised(app, workers=2)
    try:
        quiet_polls = 0

        async def finished() -> bool:
            # done = nothing ready in any of the group's queues (retry bands included) and
            # nothing held by a consumer, three polls in a row (a settle in progress counts as
            # held until RabbitMQ has it). Counting outcomes is not enough: a worker killed
            # mid-ack may have acked a copy without counting it.
            nonlocal quiet_polls
            if probe.missing(subjects):
                return False
            depths = await broker.queue_depths(rabbit.source, rabbit.group)
            quiet = sum(depths.values()) == 0 and broker.in_flight() == 0
            quiet_polls = quiet_polls + 1 if quiet else 0
            return quiet_polls >= 3

        try:
            await until(finished, seconds=90, what="every copy settled")
        except BaseException:
            print(f"\nstuck: in_flight={broker.in_flight()} crashes={sup.crashes} ", end="")
            print(f"effects={len(probe.effects)} stats={[dict(w.stats.counters) for w in sup.all]}")
            raise
        await sup.stop()
        if guarantee is Guarantee.EFFECTIVELY_ONCE:
            for op in ops:
                rec = await ledger.get(OpKey("charge", op))
                assert rec is not None and rec.state is State.COMPLETED, op
    finally:
        with contextlib.suppress(Exception):
            await sup.stop()
        await ledger.close()
    assert failpoints.fired[fp.AFTER_EFFECT_BEFORE_LEDGER] == 1  # the fault hit its window
    assert sup.crashes == 1
    return probe, sup, ops, victim


async def test_end_to_end_effectively_once_survives_a_crash_after_the_effect(
    rabbit: Rabbit, tmp_path: Path
) -> None:
    probe, sup, ops, _ = await _end_to_end(rabbit, tmp_path, Guarantee.EFFECTIVELY_ONCE)
    subjects = [op.split(":")[1] for op in ops]
    # every operation applied exactly once at the named boundary ("payments")
    assert probe.per_subject() == {s: 1 for s in subjects}
    # the crashed one was re-run with the same idempotency key and answered by the downstream
    assert probe.replays_answered >= 1
    # the duplicate copies (and redeliveries after the crash) were answered by the ledger
    assert sup.total(o.DUPLICATE_HITS, cause="completed") >= 10
    print(
        f"\nEO e2e: effects={len(probe.effects)} replays_answered={probe.replays_answered} "
        f"duplicate_hits={sup.total(o.DUPLICATE_HITS)} overlaps_prevented="
        f"{sup.total(o.OVERLAPS_PREVENTED)} crashes={sup.crashes}"
    )


async def test_end_to_end_at_least_once_shows_the_duplicate(rabbit: Rabbit, tmp_path: Path) -> None:
    probe, sup, ops, victim = await _end_to_end(rabbit, tmp_path, Guarantee.AT_LEAST_ONCE)
    assert sup.total(o.DUPLICATE_HITS) == 0  # no ledger on this path: nothing answers a copy
    per = probe.per_subject()
    subjects = [op.split(":")[1] for op in ops]
    assert probe.missing(subjects) == set()  # never loses
    # the crash after the effect re-ran it: a second effect; so did every duplicate copy
    assert per[victim.split(":")[1]] >= 2
    for op in ops[::5]:
        assert per[op.split(":")[1]] >= 2, op
    assert probe.duplicates() >= 11  # the crashed one and the 10 copied ones
    print(f"\nALO e2e: effects={len(probe.effects)} duplicated subjects={probe.duplicates()}")


# --------------------------------------------------------------------------- coalesced acks


def _spy_acks(d: Delivery, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Record every basic.ack frame sent on ``d``'s channel: (delivery tag, multiple)."""
    assert isinstance(d, RabbitMQDelivery)
    channel = d.message.channel
    frames: list[tuple[int, bool]] = []
    real_ack = channel.basic_ack

    async def spy(delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        frames.append((delivery_tag, multiple))
        await real_ack(delivery_tag=delivery_tag, multiple=multiple, wait=wait)

    monkeypatch.setattr(channel, "basic_ack", spy)
    return frames


def _by_tag(ds: list[Delivery]) -> list[RabbitMQDelivery]:
    out = [d for d in ds if isinstance(d, RabbitMQDelivery)]
    assert len(out) == len(ds)
    return sorted(out, key=lambda d: d.message.delivery_tag or 0)


async def test_the_acks_of_one_tick_go_out_as_one_multiple_ack(
    rabbit: Rabbit, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = rabbit.broker()
    sub = await b.subscribe(rabbit.source, rabbit.group, prefetch=16)
    await b.publish(rabbit.source, [env(f"m{i}") for i in range(6)])
    ds = _by_tag([await recv(sub) for _ in range(6)])
    frames = _spy_acks(ds[0], monkeypatch)
    await asyncio.gather(*(d.ack() for d in ds))
    assert frames == [(ds[-1].message.delivery_tag, True)]
    assert b.in_flight() == 0
    await nothing(sub, 1.0)
    assert (await b.queue_depths(rabbit.source, rabbit.group))[rabbit.topology.queue] == 0


async def test_coalesced_acks_never_swallow_a_requeue_or_a_reject(
    rabbit: Rabbit, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = rabbit.broker()
    sub = await b.subscribe(rabbit.source, rabbit.group, prefetch=16)
    await b.publish(rabbit.source, [env(f"m{i}") for i in range(6)])
    ds = _by_tag([await recv(sub) for _ in range(6)])
    frames = _spy_acks(ds[0], monkeypatch)
    requeued, rejected = ds[2], ds[4]
    # the others are acked (and flushed) while these two are still being handled
    await asyncio.gather(*(d.ack() for d in ds if d not in (requeued, rejected)))
    # the run below the first unsettled tag went out as one multiple ack, the rest alone
    assert frames[0] == (ds[1].message.delivery_tag, True), frames
    assert len(frames) == 3, frames
    await requeued.nack()
    await rejected.reject("bad input")
    # a multiple ack that had covered them would have acked them (and made these settles
    # unknown delivery tags): the requeued copy must come back, the rejected one be dead-lettered
    again = await recv(sub)  # only the requeued one comes back, on a channel still open
    assert (op_of(again), again.redelivered) == (op_of(requeued), True)
    await again.ack()
    await nothing(sub, 1.0)
    depths = await b.queue_depths(rabbit.source, rabbit.group)
    assert depths[rabbit.topology.queue] == 0
    assert depths[rabbit.topology.dead_letter_queue] == 1  # the reject, not acked away
    assert b.in_flight() == 0


async def test_an_ack_not_yet_written_when_the_subscription_is_abandoned_is_never_sent(
    rabbit: Rabbit,
) -> None:
    b = rabbit.broker()
    sub = await b.subscribe(rabbit.source, rabbit.group)
    await b.publish(rabbit.source, [env("unflushed")])
    d = await recv(sub)
    ack = asyncio.ensure_future(d.ack())
    await asyncio.sleep(0)  # the ack is in the book; its flush is still a loop tick away
    assert not ack.done()
    await sub.close(abandon=True)  # as a crash: the channel goes first
    async with asyncio.timeout(RECEIVE):
        await ack  # the waiter is released, not left hanging
    other = await b.subscribe(rabbit.source, rabbit.group)
    again = await recv(other)  # never acked: RabbitMQ gives it back
    assert (op_of(again), again.redelivered) == ("unflushed", True)
    await again.ack()
    await nothing(other, 1.0)


async def test_a_batch_cancelled_while_it_lingers_for_a_burst_takes_nothing(
    rabbit: Rabbit,
) -> None:
    b = rabbit.broker()
    sub = await b.subscribe(rabbit.source, rabbit.group, prefetch=8)
    await b.publish(rabbit.source, [env(f"m{i}") for i in range(3)])
    await until(lambda: sub._buffer.qsize() == 3, seconds=RECEIVE, what="3 buffered")  # type: ignore[attr-defined]
    fetch = asyncio.ensure_future(sub.next_batch(10))
    await asyncio.sleep(0)  # inside next_batch, lingering for more of the burst
    assert not fetch.done()
    fetch.cancel()
    await asyncio.wait({fetch})
    assert fetch.cancelled()
    batch = await sub.next_batch(10)  # nothing was taken by the cancelled call
    assert sorted(op_of(d) for d in batch) == ["m0", "m1", "m2"]
    for d in batch:
        await d.ack()
    assert b.in_flight() == 0


async def test_queue_depths_leaves_no_channel_open(rabbit: Rabbit) -> None:
    """Each missing retry band answers the passive declare with a 404 that closes the channel;
    aio-pika's robust channel then reopens itself unless closed by us. That leaked ~18 channels
    per call, and the chaos harness (which polls the depth every 0.2 s) reached RabbitMQ's
    channel_max after about 110 calls."""
    b = rabbit.broker()
    await b.declare(rabbit.source, [rabbit.group])
    for _ in range(5):
        await b.queue_depths(rabbit.source, rabbit.group)
    await asyncio.sleep(1.0)  # a robust channel reopens in the background
    conn = await b._connection("publish")
    channels = conn._RobustConnection__channels  # type: ignore[attr-defined]
    assert [c for c in channels if not c.is_closed] == []
