"""SQSBroker against a real SQS implementation (the moto server of the ``sqs_endpoint`` fixture).

The broker contract on a standard and a FIFO queue, SQS's own semantics (the visibility overlap
and ``extend``, batch deletes with partial failure, ``ApproximateReceiveCount``, redrive to a DLQ,
FIFO dedup), API calls per message, publish faults (refused entries, a lost response through a
fault proxy, an unreachable endpoint), and the runtime end to end with a SQLite ledger.

Time is real: visibility timeouts are 2 s and every wait is bounded. No assertion is about speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from replaysafe import App, Context, Effect, Envelope, Guarantee, Worker
from replaysafe import failpoints as fp
from replaysafe.brokers.base import Broker, Delivery, Subscription
from replaysafe.brokers.sqs import HEADER_REJECT_REASON, SQSBroker, SQSDelivery, redact_url
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.envelope import BYTES, decode_wire, fingerprint_bytes
from replaysafe.errors import (
    BrokerUnavailable,
    ConfigurationError,
    MissingExtra,
    PublishAmbiguous,
    SimulatedCrash,
)
from replaysafe.explain import explain
from replaysafe.failpoints import Failpoints
from replaysafe.ledger import SQLiteLedger
from replaysafe.testing import EffectProbe
from replaysafe.testing.contracts.broker import BrokerContract

from .runtime_harness import once_for

REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
#: real seconds to wait for a delivery that must come (the machine is shared and slow)
RECEIVE_TIMEOUT = 20.0


def make_broker(endpoint: str, **opts: Any) -> SQSBroker:
    options: dict[str, Any] = {
        "region": REGION,
        "endpoint_url": endpoint,
        "wait_time": 1,
        "delete_window": 0.02,
        "failpoints": Failpoints(),
        **CREDENTIALS,
    }
    return SQSBroker(**{**options, **opts})


async def drop_queues(endpoint: str, names: list[str]) -> None:
    admin = make_broker(endpoint)
    try:
        for name in names:
            with contextlib.suppress(Exception):
                await admin.delete_queue(name)
    finally:
        await admin.close()


# --------------------------------------------------------------------------- the contract


class _SQSContract(BrokerContract):
    receive_timeout = RECEIVE_TIMEOUT
    # twice quiesce() must fit inside the margin: expect_nothing() quiesces around its advance
    timer_margin = 1.0
    nack_delay = 2.0
    fifo = False
    #: the queue's visibility timeout (seconds): short, the cases move time relative to it
    visibility = 2
    # The order case consumes a 12-message receive batch one message at a time; on this shared
    # machine that has taken longer than 4 s. Its timer must outlive the batch: on expiry moto
    # (5.2) breaks FIFO order (it skips the earliest of several expired in-flight messages of a
    # group while a later one still counts as pending; real SQS keeps the order).
    visibility_for: ClassVar[dict[str, int]] = {"test_order_within_key": 15}

    @pytest.fixture(autouse=True)
    async def _moto(self, sqs_endpoint: str, request: pytest.FixtureRequest) -> AsyncIterator[None]:
        self.endpoint = sqs_endpoint
        self.case_name = request.node.name
        self.created: list[str] = []
        yield
        await drop_queues(sqs_endpoint, self.created)

    def make_clock(self) -> Clock:
        return SYSTEM_CLOCK

    async def make_broker(self, clock: Clock) -> Broker:
        return make_broker(self.endpoint, clock=clock)

    def source_name(self) -> str:
        name = super().source_name()
        return f"{name}.fifo" if self.fifo else name

    async def prepare_source(self, broker: Broker, source: str) -> None:
        assert isinstance(broker, SQSBroker)
        visibility = self.visibility_for.get(self.case_name, self.visibility)
        await broker.create_queue(source, visibility_timeout=visibility)
        self.created.append(source)

    async def advance(self, clock: Clock, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def quiesce(self, clock: Clock) -> None:
        await asyncio.sleep(0.25)


class TestSQSStandardContract(_SQSContract):
    fifo = False


class TestSQSFifoContract(_SQSContract):
    fifo = True


# --------------------------------------------------------------------------- helpers


class SQSEnv:
    """Brokers and queues for one test; everything is closed and deleted afterwards."""

    def __init__(self, endpoint: str, tmp: Path) -> None:
        self.endpoint = endpoint
        self.tmp = tmp
        self.brokers: list[SQSBroker] = []
        self.queues: list[str] = []
        self.admin = self.broker()

    def broker(self, **opts: Any) -> SQSBroker:
        b = make_broker(self.endpoint, **opts)
        self.brokers.append(b)
        return b

    async def queue(self, *, fifo: bool = False, visibility: int = 2, **opts: Any) -> str:
        name = f"rs-test-{uuid.uuid4().hex[:12]}" + (".fifo" if fifo else "")
        self.queues.append(name)
        if "dlq" in opts:
            opts["dlq"] = f"{name.removesuffix('.fifo')}-dlq" + (".fifo" if fifo else "")
            self.queues.append(opts["dlq"])
        await self.admin.create_queue(name, visibility_timeout=visibility, **opts)
        return name

    async def cleanup(self) -> None:
        for b in self.brokers:
            with contextlib.suppress(Exception):
                await b.close()
        await drop_queues(self.endpoint, self.queues)


@pytest.fixture
async def sqs(sqs_endpoint: str, tmp_path: Path) -> AsyncIterator[SQSEnv]:
    env = SQSEnv(sqs_endpoint, tmp_path)
    try:
        yield env
    finally:
        await env.cleanup()


def envelope(n: int | str, *, key: str | None = None, **headers: str) -> Envelope:
    return Envelope.of(
        f"sqs-test:{n}",
        {"n": n},
        key=key,
        headers=headers or None,
        published_at=SYSTEM_CLOCK.now(),
    )


def op_of(d: Delivery) -> str:
    return decode_wire(d.body, d.headers, content_type=d.content_type).operation_id


async def recv(sub: Subscription, within: float = RECEIVE_TIMEOUT) -> Delivery:
    try:
        async with asyncio.timeout(within):
            return await anext(sub)
    except TimeoutError:
        pytest.fail(f"no delivery within {within} s")


async def nothing(sub: Subscription, seconds: float) -> None:
    """Assert that ``sub`` yields nothing for ``seconds`` of real time."""
    task = asyncio.ensure_future(anext(sub))
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        await asyncio.wait({task})
        return
    d = task.result()
    pytest.fail(f"unexpected delivery {op_of(d)!r} attempt {d.attempt}")


# --------------------------------------------------------------------------- visibility


async def test_visibility_overlap_redelivers_to_another_consumer_while_the_first_holds_it(
    sqs: SQSEnv,
) -> None:
    broker = sqs.broker()
    q = await sqs.queue(visibility=2)
    a = await broker.subscribe(q, "billing", prefetch=1)
    b = await broker.subscribe(q, "billing", prefetch=1)
    await broker.publish(q, [envelope("held")])
    first = await recv(a)
    assert first.settle_deadline is not None
    assert first.settle_deadline == pytest.approx(first.received_at + 2, abs=1e-6)
    # a is still "working" (never settles in time): SQS hands the message to b anyway
    second = await recv(b)
    assert not first.settled
    assert (op_of(second), second.attempt, second.redelivered) == (op_of(first), 2, True)
    # the late ack of the stale receipt: moto deletes; real SQS may keep the message (the
    # ledger answers that copy). The current holder's ack deletes in both.
    await first.ack()
    await second.ack()
    await nothing(a, 3.5)


async def test_extend_keeps_the_message_from_other_consumers(sqs: SQSEnv) -> None:
    broker = sqs.broker()
    q = await sqs.queue(visibility=2)
    a = await broker.subscribe(q, "billing", prefetch=1)
    b = await broker.subscribe(q, "billing", prefetch=1)
    await broker.publish(q, [envelope("extended")])
    held = await recv(a)
    before = broker.api_calls["change_visibility"]

    async def heartbeat() -> None:
        while True:
            await held.extend(5)  # generous: a loaded machine may stall the loop for a while
            await asyncio.sleep(0.5)

    beat = asyncio.ensure_future(heartbeat())
    try:
        await nothing(b, 5.0)  # 2.5 visibility timeouts
    finally:
        beat.cancel()
        await asyncio.wait({beat})
    assert broker.api_calls["change_visibility"] > before
    assert held.settle_deadline > held.received_at + 2
    await held.ack()
    await nothing(b, 4.0)


async def test_approximate_receive_count_increments_on_every_receive(sqs: SQSEnv) -> None:
    broker = sqs.broker()
    q = await sqs.queue(visibility=2)
    sub = await broker.subscribe(q, "g")
    await broker.publish(q, [envelope("counted")])
    seen = []
    for _ in range(3):
        d = await recv(sub)
        seen.append((d.attempt, d.redelivered))
        await d.nack()
    last = await recv(sub)
    seen.append((last.attempt, last.redelivered))
    await last.ack()
    assert seen == [(1, False), (2, True), (3, True), (4, True)]
    assert last.broker_timestamp is not None
    assert abs(last.broker_timestamp - SYSTEM_CLOCK.now()) < 60


async def test_next_batch_hands_out_one_receive_batch_bounded_by_max_items(sqs: SQSEnv) -> None:
    broker = sqs.broker()
    q = await sqs.queue(visibility=30)
    await broker.publish(q, [envelope(i) for i in range(5)])
    sub = await broker.subscribe(q, "g", prefetch=10)
    async with asyncio.timeout(RECEIVE_TIMEOUT):
        first = await sub.next_batch(3)
        rest = await sub.next_batch(10)
    assert len(first) == 3  # the whole receive arrived at once; max_items bounds the batch
    assert sorted(op_of(d) for d in first + rest) == sorted(f"sqs-test:{i}" for i in range(5))
    await asyncio.gather(*(d.ack() for d in first + rest))


async def test_describe_reports_retention_and_redrive_for_explain(sqs: SQSEnv) -> None:
    broker = sqs.broker()
    q = await sqs.queue(visibility=7, dlq=True, max_receive_count=3, retention=3600)
    dlq = sqs.queues[-1]
    facts = await broker.describe(q)
    assert (facts.broker, facts.retention, facts.dead_letter) == ("sqs", 3600, dlq)
    assert facts.dead_letter_retention == 345_600  # the DLQ keeps SQS's default (4 days)
    assert facts.redrive_window == 3600 + 345_600
    assert (facts.delivery_limit, facts.visibility_timeout) == (3, 7)
    plain = await broker.describe(await sqs.queue())
    assert (plain.dead_letter, plain.delivery_limit, plain.redrive_window) == (None, None, None)
    # explain reads these facts: a 1-hour horizon is shorter than the DLQ keeps a message
    ledger = SQLiteLedger(sqs.tmp / "explain.db")
    app = App("explain", broker=broker, ledger=ledger, horizon=3600)

    async def handle(ctx: Context) -> None:
        return None

    app.handler(q, guarantee=Guarantee.EFFECTIVELY_ONCE, effect=Effect.keyed("x"))(handle)
    report = await explain(app)
    await ledger.close()
    assert "RS107" in {f.id for f in report.errors}


async def test_a_buffered_message_whose_visibility_expired_is_not_handed_out(
    sqs: SQSEnv,
) -> None:
    broker = sqs.broker()
    q = await sqs.queue(visibility=2)
    sub = await broker.subscribe(q, "g", prefetch=10)
    await broker.publish(q, [envelope("a"), envelope("b"), envelope("c")])
    first = await recv(sub)  # the other two wait in the buffer
    await asyncio.sleep(3.5)  # nobody consumes: every copy's visibility expires
    later = [await recv(sub) for _ in range(3)]
    # only copies received again after the expiry, never the stale buffered ones (attempt 1)
    assert sorted(op_of(d) for d in later) == ["sqs-test:a", "sqs-test:b", "sqs-test:c"]
    assert all(d.attempt >= 2 for d in later), [(op_of(d), d.attempt) for d in later]
    assert first.attempt == 1
    for d in later:
        await d.ack()


async def test_graceful_close_hands_messages_back_at_once_and_a_crash_does_not(
    sqs: SQSEnv,
) -> None:
    broker = sqs.broker()
    q = await sqs.queue(visibility=30)
    a = await broker.subscribe(q, "g", prefetch=4)
    await broker.publish(q, [envelope("one"), envelope("two")])
    held = await recv(a)  # handed out and unsettled; "two" is buffered or unsettled too
    await a.close()
    assert held.settled
    await held.ack()  # settled by the close: does nothing
    b = await broker.subscribe(q, "g", prefetch=4)
    back = [await recv(b, 10.0), await recv(b, 10.0)]  # well before the 30 s timer
    assert sorted(op_of(d) for d in back) == ["sqs-test:one", "sqs-test:two"]
    assert all(d.attempt >= 2 for d in back)
    # a crash returns nothing early
    await b.close(abandon=True)
    c = await broker.subscribe(q, "g")
    await nothing(c, 3.0)


# --------------------------------------------------------------------------- deletes


async def test_batch_delete_partial_failure_deletes_the_others_and_does_not_raise(
    sqs: SQSEnv,
) -> None:
    broker = sqs.broker()
    q = await sqs.queue(visibility=5)  # nothing may expire before the acks
    sub = await broker.subscribe(q, "g", prefetch=10)
    await broker.publish(q, [envelope(i) for i in range(3)])
    ds = [await recv(sub) for _ in range(3)]
    broken = ds[1]
    assert isinstance(broken, SQSDelivery)
    broken.receipt_handle = "not-a-valid-receipt-handle"
    before = broker.api_calls["delete"]
    await asyncio.gather(*(d.ack() for d in ds))  # one DeleteMessageBatch, one entry refused
    assert broker.api_calls["delete"] - before == 1
    assert broker.delete_failures == 1
    assert all(d.settled for d in ds)
    again = await recv(sub)  # only the refused one comes back
    assert (op_of(again), again.attempt) == (op_of(broken), 2)
    await again.ack()
    await nothing(sub, 3.0)


async def test_api_calls_per_message_at_steady_state(sqs: SQSEnv) -> None:
    """Batch receive + batch delete: consume and complete 200 messages in about 0.2 calls each
    (one ReceiveMessage and one DeleteMessageBatch per 10)."""
    broker = sqs.broker()
    q = await sqs.queue(visibility=30)
    n = 200
    await broker.publish(q, [envelope(i) for i in range(n)])
    assert broker.api_calls["send"] == n // 10
    before = broker.api_calls
    sub = await broker.subscribe(q, "g", prefetch=20)
    acks: list[asyncio.Task[None]] = []
    seen: set[str] = set()
    async with asyncio.timeout(60):
        while len(seen) < n:
            d = await anext(sub)
            seen.add(op_of(d))
            # as the runtime does: every delivery settles in its own task
            acks.append(asyncio.ensure_future(d.ack()))
        await asyncio.gather(*acks)
    after = broker.api_calls
    used = {k: after[k] - before[k] for k in ("receive", "delete", "change_visibility")}
    per_message = sum(used.values()) / n
    print(f"\nSQS API calls per message (consume + complete): {per_message:.3f} {used}")
    assert len(seen) == n
    assert per_message <= 0.25, used


# --------------------------------------------------------------------------- dead letters


async def test_redrive_moves_a_message_to_the_dlq_after_max_receive_count(sqs: SQSEnv) -> None:
    broker = sqs.broker()
    q = await sqs.queue(visibility=2, dlq=True, max_receive_count=2)
    dlq = sqs.queues[-1]
    sub = await broker.subscribe(q, "g")
    await broker.publish(q, [envelope("poison")])
    for attempt in (1, 2):
        d = await recv(sub)
        assert d.attempt == attempt
        await d.nack()
    await nothing(sub, 3.0)  # the third receive moved it to the DLQ instead
    dead = await recv(await broker.subscribe(dlq, "ops"))
    assert op_of(dead) == "sqs-test:poison"
    await dead.ack()


async def test_reject_copies_to_the_dlq_with_the_reason_then_deletes(sqs: SQSEnv) -> None:
    broker = sqs.broker()
    q = await sqs.queue(visibility=2, dlq=True, max_receive_count=5)
    dlq = sqs.queues[-1]
    sub = await broker.subscribe(q, "g")
    await broker.publish(q, [envelope("rejected", key="k-1", **{"x-tenant": "acme"})])
    d = await recv(sub)
    await d.reject("poison: amount is negative")
    dead = await recv(await broker.subscribe(dlq, "ops"))
    assert op_of(dead) == "sqs-test:rejected"
    assert dead.headers[HEADER_REJECT_REASON] == "poison: amount is negative"
    assert dead.headers["x-tenant"] == "acme"
    assert dead.key == "k-1"
    await nothing(sub, 3.5)  # the original is gone


async def test_fifo_reject_copies_to_a_fifo_dlq(sqs: SQSEnv) -> None:
    broker = sqs.broker()
    q = await sqs.queue(fifo=True, visibility=2, dlq=True)
    dlq = sqs.queues[-1]
    sub = await broker.subscribe(q, "g")
    await broker.publish(q, [envelope("fifo-rejected", key="customer-9")])
    d = await recv(sub)
    await d.reject("poison")
    dead = await recv(await broker.subscribe(dlq, "ops"))
    assert (op_of(dead), dead.key) == ("sqs-test:fifo-rejected", "customer-9")
    await nothing(sub, 3.5)


# --------------------------------------------------------------------------- FIFO


async def test_fifo_dedup_drops_a_republished_operation_within_the_window(sqs: SQSEnv) -> None:
    broker = sqs.broker()
    q = await sqs.queue(fifo=True, visibility=2)
    assert broker.capabilities(q).native_dedup_window == 300
    assert broker.capabilities(q).ordered_within_key
    await broker.publish(q, [envelope("a", key="k")])
    await broker.publish(q, [envelope("a", key="k")])  # the producer's retry: same operation
    await broker.publish(q, [envelope("b", key="k")])
    # same operation id, different payload: SQS drops it too, silently (no conflict is seen)
    await broker.publish(q, [Envelope.of("sqs-test:a", {"n": "other"}, key="k")])
    sub = await broker.subscribe(q, "g")
    got = [await recv(sub), await recv(sub)]
    assert [op_of(d) for d in got] == ["sqs-test:a", "sqs-test:b"]
    assert decode_wire(got[0].body, got[0].headers).value == {"n": "a"}
    for d in got:
        await d.ack()
    await nothing(sub, 2.0)


async def test_fifo_keys_round_trip_also_when_not_a_valid_group_id(sqs: SQSEnv) -> None:
    broker = sqs.broker()
    q = await sqs.queue(fifo=True, visibility=2)
    keys = ["customer-7", "naïve key with spaces", None]
    await broker.publish(q, [envelope(i, key=k) for i, k in enumerate(keys)])
    sub = await broker.subscribe(q, "g")
    got = {op_of(d): d for d in [await recv(sub) for _ in keys]}
    assert [got[f"sqs-test:{i}"].key for i in range(len(keys))] == keys
    assert all("rs-key" not in d.headers for d in got.values())


# --------------------------------------------------------------------------- wire format


async def test_headers_beyond_the_ten_attribute_limit_are_refused_before_sending(
    sqs: SQSEnv,
) -> None:
    broker = sqs.broker()
    q = await sqs.queue()
    six = {f"x-h{i}": str(i) for i in range(6)}
    await broker.publish(q, [envelope("ten", **six)])  # 6 + 4 replaysafe attributes = 10
    with pytest.raises(ConfigurationError, match="over SQS's limit of 10") as info:
        # the key needs rs-key on a standard queue: 11; nothing of the batch may be sent
        await broker.publish(q, [envelope("ok"), envelope("eleven", key="k", **six)])
    assert "sqs-test:eleven" in str(info.value)
    with pytest.raises(ConfigurationError, match="attribute name"):
        await broker.publish(q, [envelope("bad-name", **{"x trace": "1"})])
    with pytest.raises(ConfigurationError, match="empty"):
        await broker.publish(q, [envelope("empty", **{"x-empty": ""})])
    sub = await broker.subscribe(q, "g")
    d = await recv(sub)
    assert op_of(d) == "sqs-test:ten"
    assert {k: d.headers[k] for k in six} == six
    await d.ack()
    await nothing(sub, 1.5)


async def test_binary_payloads_and_plain_client_messages_arrive_as_deliveries(
    sqs: SQSEnv,
) -> None:
    broker = sqs.broker()
    q = await sqs.queue()
    raw = bytes(range(256))
    binary = Envelope("sqs-test:binary", raw, raw, fingerprint_bytes(raw), BYTES)
    await broker.publish(q, [binary])
    # a plain client: no rs-* attributes at all, and one with a broken encoding marker
    url = (await broker._queue(q)).url
    client, _ = await broker._clients()
    await client.send_message(QueueUrl=url, MessageBody='{"order": "o-1"}')
    await client.send_message(
        QueueUrl=url,
        MessageBody="%%% not base64",
        MessageAttributes={"rs-body-encoding": {"DataType": "String", "StringValue": "base64"}},
    )
    sub = await broker.subscribe(q, "g")
    got = [await recv(sub) for _ in range(3)]
    by_body = {d.body: d for d in got}
    d_bin = by_body[raw]
    env = decode_wire(d_bin.body, d_bin.headers, content_type=d_bin.content_type)
    assert (env.operation_id, env.value, env.content_type) == ("sqs-test:binary", raw, BYTES)
    assert "rs-body-encoding" not in d_bin.headers
    plain = by_body[b'{"order": "o-1"}']
    assert (plain.headers, plain.content_type, plain.key) == ({}, None, None)
    assert plain.broker_timestamp is not None and plain.attempt == 1
    broken = by_body[b"%%% not base64"]  # left for the runtime to quarantine
    assert broken.headers == {"rs-body-encoding": "base64"}
    for d in got:
        await d.ack()


# --------------------------------------------------------------------------- publish faults


async def test_publish_before_accept_failpoint_sends_nothing(sqs: SQSEnv) -> None:
    fps = Failpoints()
    broker = sqs.broker(failpoints=fps)
    q = await sqs.queue()
    fps.enable(fp.PUBLISH_BEFORE_ACCEPT, "raise", error=BrokerUnavailable("injected"), times=1)
    with pytest.raises(BrokerUnavailable, match="injected"):
        await broker.publish(q, [envelope("never")])
    assert fps.fired[fp.PUBLISH_BEFORE_ACCEPT] == 1
    assert broker.api_calls["send"] == 0
    await nothing(await broker.subscribe(q, "g"), 1.5)


async def test_refused_entries_are_listed_and_not_ambiguous(
    sqs: SQSEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = sqs.broker()
    q = await sqs.queue(visibility=30)  # nothing is acked: no copy may come back during the test
    _, send_client = await broker._clients()
    real = send_client.send_message_batch

    async def one_refused(**params: Any) -> Any:
        """Forward all but the second entry; answer that one as refused by the server."""
        entries = params["Entries"]
        refused = entries[1]
        response = await real(**{**params, "Entries": [e for e in entries if e is not refused]})
        response.setdefault("Failed", []).append(
            {"Id": refused["Id"], "SenderFault": False, "Code": "InternalError", "Message": "x"}
        )
        return response

    monkeypatch.setattr(send_client, "send_message_batch", one_refused)
    batch = [envelope(i) for i in range(13)]  # two chunks: 10 + 3
    with pytest.raises(BrokerUnavailable) as info:
        await broker.publish(q, batch)
    assert not isinstance(info.value, PublishAmbiguous)
    message = str(info.value)
    assert "'sqs-test:1'" in message and "NOT accepted" in message
    assert "9 of 13 envelopes were accepted, 3 not attempted" in message
    sub = await broker.subscribe(q, "g", prefetch=10)
    got = sorted([op_of(await recv(sub)) for _ in range(9)])
    assert got == sorted(f"sqs-test:{i}" for i in range(10) if i != 1)
    await nothing(sub, 1.5)


class FaultProxy:
    """A TCP proxy in front of moto that can lose the response of the next SendMessageBatch
    (the server processes the request; the client sees the connection drop)."""

    def __init__(self, upstream: str) -> None:
        host_port = upstream.split("//", 1)[1]
        self.host, port = host_port.split(":")
        self.port = int(port)
        self.drop_send_responses = 0
        self.dropped = 0
        #: seconds to hold each ReceiveMessage response (a slow network on the way back)
        self.delay_receive_responses = 0.0
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self.server is not None
        if not self.server.is_serving():
            return
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        drop = asyncio.Event()
        receiving = False

        async def upstream() -> None:
            nonlocal receiving
            while data := await reader.read(65536):
                if self.drop_send_responses and b"SendMessageBatch" in data:
                    self.drop_send_responses -= 1
                    drop.set()
                if b"AmazonSQS." in data:
                    receiving = b"AmazonSQS.ReceiveMessage" in data
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if drop.is_set():
                    self.dropped += 1
                    writer.transport.abort()  # the response is lost on the way back
                    return
                if receiving and self.delay_receive_responses:
                    await asyncio.sleep(self.delay_receive_responses)
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            up_writer.close()
            writer.transport.abort()
            self.writers.discard(writer)


async def test_a_lost_send_response_is_ambiguous_and_the_retry_makes_a_second_copy(
    sqs: SQSEnv,
) -> None:
    proxy = FaultProxy(sqs.endpoint)
    through = await proxy.start()
    try:
        publisher = sqs.broker(endpoint_url=through)
        q = await sqs.queue(visibility=30)  # nothing is acked: no copy may come back meanwhile
        sent = envelope("ambiguous")
        await publisher.publish(q, [envelope("warm-up")])
        proxy.drop_send_responses = 1
        with pytest.raises(PublishAmbiguous, match="sqs-test:ambiguous"):
            await publisher.publish(q, [sent])
        assert proxy.dropped == 1
        await publisher.publish(q, [sent])  # the producer's retry, same envelope
        sub = await sqs.broker().subscribe(q, "g")
        got = sorted([op_of(await recv(sub)) for _ in range(3)])
        # SQS had accepted the "failed" publish: a standard queue now holds two copies
        assert got == ["sqs-test:ambiguous", "sqs-test:ambiguous", "sqs-test:warm-up"]
        # an endpoint that cannot be reached at all: nothing was sent, so not ambiguous
        await proxy.stop()
        await asyncio.sleep(0.2)
        with pytest.raises(BrokerUnavailable) as info:
            await publisher.publish(q, [envelope("unreachable")])
        assert not isinstance(info.value, PublishAmbiguous), info.value
    finally:
        await proxy.stop()


# --------------------------------------------------------------------------- configuration


async def test_a_cancelled_receive_does_not_lose_the_message(sqs: SQSEnv) -> None:
    proxy = FaultProxy(sqs.endpoint)
    proxy.delay_receive_responses = 1.0  # the message is on its way back when we cancel
    through = await proxy.start()
    try:
        consumer = sqs.broker(endpoint_url=through)
        q = await sqs.queue(visibility=30)  # a lost message would stay hidden for 30 s
        sub = await consumer.subscribe(q, "g")
        waiting = asyncio.ensure_future(anext(sub))
        await asyncio.sleep(0.3)  # the long poll is in flight
        await sqs.admin.publish(q, [envelope("cancelled")])
        await asyncio.sleep(0.3)  # SQS has handed it out; the response is held by the proxy
        assert not waiting.done()
        waiting.cancel()
        await asyncio.wait({waiting})
        got = await recv(sub, 10.0)
        assert (op_of(got), got.attempt) == ("sqs-test:cancelled", 1)
        await got.ack()
    finally:
        await proxy.stop()


async def test_from_url_works_and_redacts_the_secret(sqs: SQSEnv) -> None:
    port = sqs.endpoint.rsplit(":", 1)[1]
    url = f"sqs+http://AKIDTEST:s3cr3t-value@127.0.0.1:{port}?region={REGION}&wait_time=1"
    broker = SQSBroker.from_url(url, failpoints=Failpoints())
    sqs.brokers.append(broker)
    assert "s3cr3t" not in repr(broker)
    assert redact_url(url).startswith("sqs+http://AKIDTEST:***@127.0.0.1")
    q = await sqs.queue()
    await broker.publish(q, [envelope("from-url")])
    assert op_of(await recv(await broker.subscribe(q, "g"))) == "sqs-test:from-url"
    with pytest.raises(ConfigurationError) as info:
        SQSBroker.from_url(url + "&bogus=1")
    assert "s3cr3t" not in str(info.value) and "bogus" in str(info.value)
    unreachable = SQSBroker.from_url(
        "sqs+http://AKIDTEST:s3cr3t-value@127.0.0.1:9?region=us-east-1", max_retries=1
    )
    with pytest.raises(BrokerUnavailable) as down:
        await unreachable.publish("rs-nowhere", [envelope("x")])
    assert "s3cr3t" not in str(down.value)
    await unreachable.close()


async def test_a_missing_queue_is_a_configuration_error(sqs: SQSEnv) -> None:
    broker = sqs.broker()
    with pytest.raises(ConfigurationError, match="does not exist"):
        await broker.subscribe(f"rs-missing-{uuid.uuid4().hex[:8]}", "g")
    with pytest.raises(ConfigurationError, match="not a valid SQS queue name"):
        await broker.publish("bad name!", [envelope("x")])


async def test_deleting_the_queue_under_a_consumer_surfaces_as_a_configuration_error(
    sqs: SQSEnv,
) -> None:
    broker = sqs.broker()
    q = await sqs.queue()
    sub = await broker.subscribe(q, "g")
    await nothing(sub, 0.5)  # the poller is running
    await sqs.admin.delete_queue(q)
    with pytest.raises(ConfigurationError, match="does not exist"):
        async with asyncio.timeout(RECEIVE_TIMEOUT):
            await anext(sub)


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiobotocore.session", None)
    with pytest.raises(MissingExtra) as info:
        SQSBroker(region=REGION)
    assert info.value.extra == "sqs"
    assert "replaysafe[sqs]" in str(info.value)


def test_capabilities_follow_the_queue_type() -> None:
    broker = SQSBroker(region=REGION)
    std, fifo = broker.capabilities("orders"), broker.capabilities("orders.fifo")
    assert not std.independent_groups and not fifo.independent_groups
    assert std.extend_visibility and std.delayed_nack and std.delivery_count
    assert (std.ordered_within_key, std.native_dedup_window) == (False, None)
    assert (fifo.ordered_within_key, fifo.native_dedup_window) == (True, 300)


# --------------------------------------------------------------------------- end to end


def order(i: int) -> Envelope:
    return Envelope.of(f"charge:order-{i}", {"order": f"order-{i}", "amount": 100 + i})


async def run_pipeline(
    sqs: SQSEnv, tmp_path: Path, guarantee: Guarantee
) -> tuple[EffectProbe, Failpoints, int]:
    """50 operations (10 of them published twice) through two supervised workers on SQS with a
    SQLite ledger; the worker handling order-20 is killed after the effect, before the ledger.
    Returns when every operation was applied and the queue is empty."""
    fps = Failpoints()
    broker = sqs.broker(failpoints=fps)
    q = await sqs.queue(visibility=2)
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    app = App("e2e", broker=broker, ledger=ledger, failpoints=fps)
    probe = EffectProbe(honour_keys=True)

    async def charge(ctx: Context) -> str:
        return await probe.apply(ctx.payload["order"], ctx.payload["amount"], ctx.idempotency_key)

    effect = Effect.keyed("payments") if guarantee is Guarantee.EFFECTIVELY_ONCE else None
    app.handler(q, guarantee=guarantee, effect=effect, lease=2.0, concurrency=8, name="charge")(
        charge
    )
    fps.enable(fp.AFTER_EFFECT_BEFORE_LEDGER, "kill", when=once_for("charge:order-20"))
    now = SYSTEM_CLOCK.now()
    ops = [order(i).with_published_at(now) for i in range(50)]
    await broker.publish(q, ops)
    await broker.publish(q, ops[:10])  # duplicate transport copies of ten operations
    stop = asyncio.Event()
    crashes = 0

    async def supervise(n: int) -> None:
        nonlocal crashes
        generation = 0
        while not stop.is_set():
            worker = Worker(app, owner=f"w{n}.{generation}")
            stopper = asyncio.ensure_future(stop.wait())
            stopper.add_done_callback(lambda _, w=worker: w.stop())
            try:
                await worker.run(drain_timeout=5)
            except SimulatedCrash:
                crashes += 1
                generation += 1  # a new Worker replaces the dead one
            finally:
                stopper.cancel()

    pool = [asyncio.ensure_future(supervise(n)) for n in range(2)]
    try:
        async with asyncio.timeout(90):
            while True:
                await asyncio.sleep(0.5)
                if len(probe.per_subject()) < 50:
                    continue
                depth = await broker.approximate_depth(q)
                if depth["visible"] + depth["in_flight"] + depth["delayed"] == 0:
                    break
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*pool, return_exceptions=True)
        await ledger.close()
    assert not probe.missing(f"order-{i}" for i in range(50))
    return probe, fps, crashes


async def test_effectively_once_on_sqs_applies_every_operation_once(
    sqs: SQSEnv, tmp_path: Path
) -> None:
    probe, fps, crashes = await run_pipeline(sqs, tmp_path, Guarantee.EFFECTIVELY_ONCE)
    assert fps.fired[fp.AFTER_EFFECT_BEFORE_LEDGER] == 1 and crashes == 1
    assert probe.per_subject() == {f"order-{i}": 1 for i in range(50)}
    # the killed attempt was re-run with the same idempotency key and answered by the downstream
    assert probe.replays_answered >= 1


async def test_at_least_once_on_sqs_shows_the_duplicates(sqs: SQSEnv, tmp_path: Path) -> None:
    probe, fps, crashes = await run_pipeline(sqs, tmp_path, Guarantee.AT_LEAST_ONCE)
    assert fps.fired[fp.AFTER_EFFECT_BEFORE_LEDGER] == 1 and crashes == 1
    applied = probe.per_subject()
    assert applied["order-20"] >= 2  # effect done, never completed: redelivered and re-applied
    assert all(applied[f"order-{i}"] >= 2 for i in range(10))  # both copies applied
    assert probe.duplicates() >= 11
