"""NATSBroker against the real NATS server (JetStream) on 127.0.0.1:4222.

The broker contract, then JetStream's own semantics: redelivery after ``ack_wait``, ``extend`` by
repeated ``in_progress``, ``nak(delay)``, ``max_deliver`` to the dead-letter subject (also after a
crash on the last attempt), the double ack, ``Nats-Msg-Id`` dedup, a publish no stream captures,
and the URL/config grammar. The ``nats_url`` fixture (conftest) fails in CI without the server.
Each test uses its own stream prefix and deletes its streams.

Time is real: ``ack_wait`` is 2 s and every wait is bounded. No assertion is about speed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from replaysafe.brokers import broker_from_url
from replaysafe.brokers.base import Broker, Delivery, Subscription
from replaysafe.brokers.nats import NATSBroker, NATSConfig
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.envelope import Envelope, decode_wire
from replaysafe.errors import BrokerUnavailable, ConfigurationError
from replaysafe.failpoints import Failpoints
from replaysafe.testing.contracts.broker import BrokerContract

from .conftest import free_port

ACK_WAIT = 2.0
RECEIVE_TIMEOUT = 15.0


async def drop_streams(url: str, prefix: str) -> None:
    """Delete every stream whose name starts with ``prefix`` (this test's)."""
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name.startswith(prefix):
                await js.delete_stream(info.config.name)
    finally:
        await nc.close()


def make_broker(url: str, prefix: str, **opts: Any) -> NATSBroker:
    settings: dict[str, Any] = {
        "stream_prefix": prefix,
        "ack_wait": ACK_WAIT,
        "fetch_wait": 0.5,
        "storage": "memory",
        "failpoints": Failpoints(),
        **opts,
    }
    return NATSBroker.from_url(url, **settings)


@pytest.fixture
async def prefix(nats_url: str) -> AsyncIterator[str]:
    name = f"rs-t{uuid.uuid4().hex[:8]}-"
    yield name
    await drop_streams(nats_url, name)


# --------------------------------------------------------------------------- the contract


class TestNATSContract(BrokerContract):
    receive_timeout = RECEIVE_TIMEOUT
    # twice quiesce() must fit inside the margin: expect_nothing() quiesces around its advance
    timer_margin = 1.0
    nack_delay = 2.0

    @pytest.fixture(autouse=True)
    async def _nats(self, nats_url: str, prefix: str) -> None:
        self.url = nats_url
        self.prefix = prefix

    def make_clock(self) -> Clock:
        return SYSTEM_CLOCK

    async def make_broker(self, clock: Clock) -> Broker:
        return make_broker(self.url, self.prefix, clock=clock)

    async def prepare_source(self, broker: Broker, source: str) -> None:
        await broker.prepare_source(source)

    async def advance(self, clock: Clock, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def quiesce(self, clock: Clock) -> None:
        await asyncio.sleep(0.25)


# --------------------------------------------------------------------------- JetStream semantics


class World:
    def __init__(self, broker: NATSBroker, source: str) -> None:
        self.broker = broker
        self.source = source
        self.subs: list[Subscription] = []

    async def subscribe(self, group: str = "g", source: str | None = None) -> Subscription:
        sub = await self.broker.subscribe(source or self.source, group)
        self.subs.append(sub)
        return sub


@pytest.fixture
async def world(nats_url: str, prefix: str) -> AsyncIterator[World]:
    broker = make_broker(nats_url, prefix, max_deliver=2)
    source = f"rs.test.{uuid.uuid4().hex[:8]}"
    await broker.prepare_source(source)
    w = World(broker, source)
    try:
        yield w
    finally:
        for sub in w.subs:
            await sub.close()
        await broker.close()


async def receive(sub: Subscription) -> Delivery:
    async with asyncio.timeout(RECEIVE_TIMEOUT):
        return await anext(sub)


async def nothing(sub: Subscription, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            d = await anext(sub)
    except TimeoutError:
        return
    pytest.fail(f"unexpected delivery {d!r}")


def envelope(n: str, **headers: str) -> Envelope:
    return Envelope.of(f"nats-test:{n}:{uuid.uuid4().hex[:6]}", {"n": n}, headers=headers)


async def test_redelivery_after_ack_wait(world: World) -> None:
    sub = await world.subscribe()
    await world.broker.publish(world.source, [envelope("timer")])
    first = await receive(sub)
    assert first.settle_deadline == pytest.approx(first.received_at + ACK_WAIT)
    await nothing(sub, ACK_WAIT - 0.7)
    again = await receive(sub)
    assert again.attempt == 2 and again.redelivered
    assert decode_wire(again.body, again.headers).operation_id == (
        decode_wire(first.body, first.headers).operation_id
    )
    await again.ack()


async def test_extend_keeps_a_message_hidden_past_ack_wait(world: World) -> None:
    sub = await world.subscribe()
    await world.broker.publish(world.source, [envelope("extend")])
    d = await receive(sub)
    await d.extend(3 * ACK_WAIT)
    assert d.settle_deadline >= SYSTEM_CLOCK.now() + 3 * ACK_WAIT - 0.2
    # in_progress restarts the timer at ack_wait only: the keep-alive repeats it
    await nothing(sub, 2 * ACK_WAIT + 0.5)
    await d.ack()
    await nothing(sub, ACK_WAIT + 0.5)


async def test_a_short_extend_still_hides_for_a_whole_ack_wait(world: World) -> None:
    sub = await world.subscribe()
    await world.broker.publish(world.source, [envelope("short-extend")])
    d = await receive(sub)
    before = SYSTEM_CLOCK.now()
    await d.extend(0.1)
    assert d.settle_deadline >= before + ACK_WAIT - 0.05
    await d.ack()


async def test_nak_delay_is_waited_by_the_server(world: World) -> None:
    sub = await world.subscribe()
    await world.broker.publish(world.source, [envelope("delay")])
    d = await receive(sub)
    sent = SYSTEM_CLOCK.now()
    await d.nack(delay=1.5)
    again = await receive(sub)
    assert SYSTEM_CLOCK.now() - sent >= 1.3
    assert again.attempt == 2
    await again.ack()


async def test_max_deliver_moves_the_message_to_the_dead_letter_subject(world: World) -> None:
    sub = await world.subscribe()
    sent = envelope("poison", **{"x-tenant": "acme"})
    await world.broker.publish(world.source, [sent])
    for attempt in (1, 2):
        d = await receive(sub)
        assert d.attempt == attempt
        await d.nack()  # the second is the last attempt: dead-lettered, not redelivered
    await nothing(sub, ACK_WAIT + 0.5)
    dead = await world.subscribe("inspect", source=f"{world.source}.dlq")
    copy = await receive(dead)
    got = decode_wire(copy.body, copy.headers, content_type=copy.content_type)
    assert copy.body == sent.payload
    assert got.operation_id == sent.operation_id
    assert got.fingerprint == sent.fingerprint
    assert copy.headers["x-tenant"] == "acme"
    assert "max_deliver" in copy.headers["rs-reject-reason"]
    assert copy.headers["rs-dead-letter-from"] == world.source
    await copy.ack()


async def test_a_crash_on_the_last_attempt_is_dead_lettered_by_the_spare_delivery(
    nats_url: str, prefix: str
) -> None:
    broker = make_broker(nats_url, prefix, max_deliver=1)
    source = f"rs.test.{uuid.uuid4().hex[:8]}"
    try:
        await broker.prepare_source(source)
        sub = await broker.subscribe(source, "g")
        await broker.publish(source, [envelope("crash-last")])
        first = await receive(sub)
        assert first.attempt == 1
        await sub.close(abandon=True)
        sub = await broker.subscribe(source, "g")
        await nothing(sub, 2 * ACK_WAIT + 1.0)  # the spare delivery never reaches a handler
        await sub.close()
        dead = await broker.subscribe(f"{source}.dlq", "inspect")
        copy = await receive(dead)
        assert "never settled" in copy.headers["rs-reject-reason"]
        await copy.ack()
        await dead.close()
    finally:
        await broker.close()


async def test_reject_publishes_a_copy_and_terminates(world: World) -> None:
    sub = await world.subscribe()
    await world.broker.publish(world.source, [envelope("reject")])
    d = await receive(sub)
    await d.reject("bad\nthing")
    await nothing(sub, ACK_WAIT + 0.5)
    dead = await world.subscribe("inspect", source=f"{world.source}.dlq")
    copy = await receive(dead)
    assert copy.headers["rs-reject-reason"] == "bad thing"
    await copy.ack()


async def test_ack_confirmed_after_ack_wait_is_not_confirmed(world: World) -> None:
    sub = await world.subscribe()
    await world.broker.publish(world.source, [envelope("late-ack")])
    d = await receive(sub)
    await asyncio.sleep(d.settle_deadline - SYSTEM_CLOCK.now() + 0.3)
    with pytest.raises(BrokerUnavailable, match="after its ack_wait"):
        await d.ack_confirmed()


async def test_publish_dedup_by_msg_id_within_the_window(world: World) -> None:
    sub = await world.subscribe()
    sent = envelope("dup")
    await world.broker.publish(world.source, [sent])
    await world.broker.publish(world.source, [sent])  # a producer retry
    d = await receive(sub)
    await d.ack()
    await nothing(sub, 1.0)
    state = await world.broker.group_state(world.source, "g")
    assert state.exists and state.messages == 0


async def test_a_reused_operation_id_with_another_payload_is_not_dropped(world: World) -> None:
    """Nats-Msg-Id carries the fingerprint too: the stream drops retries of the same envelope,
    never a different payload under the same id (the ledger must see, and quarantine, that)."""
    sub = await world.subscribe()
    first = Envelope.of("nats-test:reused", {"n": 1})
    second = Envelope.of("nats-test:reused", {"n": 2})
    await world.broker.publish(world.source, [first, second, first])
    got = [await receive(sub) for _ in range(2)]
    assert sorted(d.body for d in got) == sorted([first.payload, second.payload])
    for d in got:
        await d.ack()
    await nothing(sub, 1.0)
    assert world.broker.duplicates_dropped == 1


async def test_publish_without_a_stream_says_what_to_do(nats_url: str, prefix: str) -> None:
    broker = make_broker(nats_url, prefix)
    try:
        with pytest.raises(ConfigurationError, match="prepare_source"):
            await broker.publish(f"rs.nowhere.{uuid.uuid4().hex[:8]}", [envelope("lost")])
        with pytest.raises(ConfigurationError, match="plain subject"):
            await broker.publish("orders.*", [envelope("wild")])
    finally:
        await broker.close()


async def test_an_unreachable_server_is_unavailable() -> None:
    broker = NATSBroker.from_url(f"nats://127.0.0.1:{free_port()}?connect_timeout=0.5")
    try:
        with pytest.raises(BrokerUnavailable, match="unreachable"):
            await broker.check()
    finally:
        await broker.close()


async def test_group_state_and_declared_names(world: World) -> None:
    missing = await world.broker.group_state(world.source, "nobody")
    assert missing.exists is False
    names = await world.broker.declared_names(world.source, "app.handler")
    assert names["subject"] == world.source
    assert names["dead-letter subject"] == f"{world.source}.dlq"
    assert "." not in names["consumer"] and "." not in names["stream"]
    facts = await world.broker.describe(world.source)
    assert facts.delivery_limit == 2 and facts.visibility_timeout == ACK_WAIT


# --------------------------------------------------------------------------- URL and config


def test_from_url_equals_the_keyword_form() -> None:
    url = (
        "nats://app:s3cret@10.0.0.1:4222,10.0.0.2?ack_wait=5&max_deliver=3&stream_prefix=x-"
        "&replicas=3&storage=memory&duplicate_window=60"
    )
    assert NATSConfig.from_url(url) == NATSConfig(
        servers=("nats://10.0.0.1:4222", "nats://10.0.0.2:4222"),
        user="app",
        password="s3cret",
        ack_wait=5.0,
        max_deliver=3,
        stream_prefix="x-",
        replicas=3,
        storage="memory",
        duplicate_window=60.0,
    )
    assert NATSConfig.from_url(url, ack_wait=9).ack_wait == 9  # keywords win
    tls = NATSConfig.from_url("nats+tls://nats.example.com")
    assert tls.servers == ("tls://nats.example.com:4222",) and tls.tls
    broker = NATSBroker.from_url(url)
    assert "s3cret" not in repr(broker) and "s3cret" not in repr(broker.config)
    assert isinstance(broker_from_url("nats+tls://h:4223"), NATSBroker)


def test_the_config_is_frozen() -> None:
    config = NATSConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ack_wait = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"ack_wait": 0}, "ack_wait must be"),
        ({"ack_wait": 1.0, "fetch_wait": 1.0}, "lower fetch_wait"),
        ({"max_deliver": 0}, "max_deliver=0 must be >= 1"),
        ({"replicas": 9}, "replicas=9 must be 1 to 5"),
        ({"storage": "ssd"}, "'file' or 'memory'"),
        ({"stream_prefix": "a b"}, "without spaces"),
        ({"dead_letter_suffix": ""}, "must not be empty"),
        ({"servers": ("http://h:1",)}, "nats://host:port"),
        ({"servers": ("nats://u:pw@h:1",)}, "pass user= and password="),
    ],
)
def test_bad_settings_are_refused_with_what_to_do(settings: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        NATSConfig(**settings)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("nats://h:4222?ack_wait=soon", "not a valid float"),
        ("nats://h:4222?colour=red", "unknown parameter 'colour'"),
        ("nats://h:4222/orders", "names servers only"),
        ("nats://h:port", "is not host:port"),
        ("amqp://h:4222", "must start with nats://"),
        ("nats://:secret@h:4222?max_deliver=0", "max_deliver"),
    ],
)
def test_bad_urls_are_refused_with_what_to_do(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says) as info:
        NATSConfig.from_url(url)
    assert "secret" not in str(info.value)


def test_config_and_another_option_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="pass one or the other"):
        NATSBroker(config=NATSConfig(), ack_wait=3.0)
