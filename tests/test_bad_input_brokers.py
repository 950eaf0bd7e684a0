"""DESIGN §5 bad input through the real runtime on RabbitMQ and on SQS (moto).

Every case of ``tests/bad_inputs.py::_cases`` that the broker can carry is published *raw*,
straight through the broker's own client (aio-pika, aiobotocore) in the documented wire format,
between good messages published by the adapter. One real worker (App + SQLite ledger) consumes
the mixed batch. Each bad message must be quarantined with its reason on the first attempt, each
good one applied once, the worker must keep running, and the queue must be empty afterwards (the
originals were completed after their quarantine).

Cases a broker cannot carry are left out for that broker only, each with its reason
(:data:`SQS_CANNOT_CARRY`); the few that need a broker-specific spelling to be sent at all say so
in :func:`sqs_cases`. Real time, bounded waits; no assertion is about speed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from replaysafe import App, Context, Effect, Envelope, Guarantee, Limits, QuarantineReason, Worker
from replaysafe import observe as o
from replaysafe.brokers.base import Broker
from replaysafe.envelope import HEADER_OPERATION_ID
from replaysafe.ledger import SQLiteLedger
from replaysafe.ledger.base import MAX_QUARANTINE_COPY
from replaysafe.testing import EffectProbe

from .bad_inputs import _cases
from .broker_fixtures import rabbit_source, sqs_queue

#: real seconds the whole mixed batch may take to settle (generous: a shared, slow machine)
SETTLE = 60.0

Raw = tuple[bytes, dict[str, str], QuarantineReason]

# SQS cannot carry these at all: real SQS refuses the SendMessage (so does replaysafe's own
# SQSBroker.publish, before sending: tests/test_broker_sqs.py
# ::test_headers_beyond_the_ten_attribute_limit_are_refused_before_sending). moto is laxer than
# SQS here, which is exactly why they are not sent through it: the runtime would be tested on a
# message no SQS consumer can ever receive.
SQS_CANNOT_CARRY = {
    "header flood": "SQS allows at most 10 message attributes; 101 cannot be sent",
    "empty operation id": "SQS refuses empty message attribute values",
}

#: the handler's payload cap on SQS: SQS itself refuses bodies over 1 MiB, the default cap, so the
#: oversize case is sent over a lower cap (the check is the same code either way)
SQS_PAYLOAD_CAP = 256 * 1024


def rabbitmq_cases(now: float) -> dict[str, Raw]:
    """Every case: AMQP carries arbitrary bytes, 100+ headers, NUL in a header string, 1 MiB."""
    return {
        name: (body, headers, reason) for name, ((body, headers), reason) in _cases(now).items()
    }


def sqs_cases(now: float) -> dict[str, Raw]:
    """The cases SQS can carry, some spelled the way SQS needs (see the comments)."""
    out: dict[str, Raw] = {}
    for name, ((body, headers), reason) in _cases(now).items():
        if name in SQS_CANNOT_CARRY:
            continue
        headers = dict(headers)
        if name == "control character in operation id":
            # SQS attribute values may not hold NUL; TAB is a control character SQS does carry
            headers[HEADER_OPERATION_ID] = headers[HEADER_OPERATION_ID].replace("\x00", "\t")
        if name == "oversize payload":
            body = b'"' + b"a" * (SQS_PAYLOAD_CAP + 1024) + b'"'  # over the cap, under SQS's
        out[name] = (body, headers, reason)
    return out


def good(i: int, now: float) -> Envelope:
    return Envelope.of(f"charge:good-{i}", {"order": f"good-{i}", "amount": 10}, published_at=now)


class Run:
    """One worker of a keyed charge on ``source``, with a SQLite ledger in ``tmp_path``."""

    def __init__(
        self, broker: Broker, source: str, group: str, tmp_path: Path, limits: Limits
    ) -> None:
        self.ledger = SQLiteLedger(tmp_path / "ledger.db")
        self.app = App("bad-input", broker=broker, ledger=self.ledger)
        self.probe = EffectProbe(honour_keys=True)

        @self.app.handler(source, guarantee=Guarantee.EFFECTIVELY_ONCE, group=group,
                          effect=Effect.keyed("payments"), lease=10, limits=limits)  # fmt: skip
        async def charge(ctx: Context) -> str:
            p = ctx.payload
            return await self.probe.apply(p["order"], p["amount"], ctx.idempotency_key)

        self.worker = Worker(self.app)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.worker.run(drain_timeout=10))

    async def until_settled(
        self, goods: int, bad: int, broker_empty: Callable[[], Awaitable[bool]]
    ) -> None:
        """Until every good one is applied, every bad one quarantined and the broker holds
        nothing (three polls in a row: a settle in progress must have reached the broker)."""
        quiet = 0
        async with asyncio.timeout(SETTLE):
            while quiet < 3:
                await asyncio.sleep(0.3)
                assert self.task is not None and not self.task.done(), "the worker stopped"
                done = (
                    len(self.probe.per_subject()) >= goods
                    and len(await self.ledger.quarantined(limit=1000)) >= bad
                    and await broker_empty()
                )
                quiet = quiet + 1 if done else 0

    async def stop(self) -> None:
        self.worker.stop()
        if self.task is not None:
            async with asyncio.timeout(30):
                await self.task  # raises if the worker crashed

    async def check(self, cases: dict[str, Raw], goods: int) -> None:
        assert self.probe.per_subject() == {f"good-{i}": 1 for i in range(goods)}
        entries = await self.ledger.quarantined(limit=1000)
        got = Counter(e.reason for e in entries)
        assert got == Counter(reason for _, _, reason in cases.values())
        for e in entries:
            assert e.attempts == 1, e  # decided on the first attempt, never retried
            assert e.message is not None and len(e.message) <= MAX_QUARANTINE_COPY  # bounded
        stats = self.worker.stats
        assert stats.total(o.DELIVERIES, outcome=o.FAILED) == 0  # no pipeline error on the way
        assert stats.total(o.RETRIES) == 0
        assert stats.total(o.QUARANTINED) == len(cases)
        await self.ledger.close()


# --------------------------------------------------------------------------- RabbitMQ


@pytest.fixture
async def rabbit(amqp_url: str) -> AsyncIterator[tuple[Any, str, str]]:
    group = f"g-{uuid.uuid4().hex[:8]}"
    async with rabbit_source(amqp_url, "rs-bad", [group]) as (broker, source):
        yield broker, source, group


async def publish_raw_amqp(url: str, exchange: str, cases: dict[str, Raw]) -> None:
    """A plain aio-pika producer: body as is, ``content-type`` as the AMQP property, every other
    header in the AMQP headers table (where RabbitMQBroker puts rs-* headers)."""
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        ex = await channel.get_exchange(exchange)
        for body, headers, _ in cases.values():
            headers = dict(headers)
            ctype = headers.pop("content-type", None)
            message = aio_pika.Message(body, headers=dict(headers), content_type=ctype)
            await ex.publish(message, routing_key="")
    finally:
        await conn.close()


async def test_mixed_batch_of_bad_input_on_rabbitmq(
    rabbit: tuple[Any, str, str], amqp_url: str, tmp_path: Path
) -> None:
    broker, source, group = rabbit
    now = time.time()
    cases = rabbitmq_cases(now)
    run = Run(broker, source, group, tmp_path, Limits())
    goods = len(cases)
    await broker.publish(source, [good(i, now) for i in range(goods // 2)])
    await publish_raw_amqp(amqp_url, source, cases)
    await broker.publish(source, [good(i, now) for i in range(goods // 2, goods)])

    async def empty() -> bool:
        depths = await broker.queue_depths(source, group)
        return bool(sum(depths.values()) == 0 and broker.in_flight() == 0)

    run.start()
    try:
        await run.until_settled(goods, len(cases), empty)
    finally:
        await run.stop()
    await run.check(cases, goods)
    # after a graceful close nothing came back: every original was completed (acked)
    assert sum((await broker.queue_depths(source, group)).values()) == 0


# --------------------------------------------------------------------------- SQS


@pytest.fixture
async def sqs(sqs_endpoint: str) -> AsyncIterator[tuple[Any, str]]:
    # a long visibility: a message seen twice would be a retry, and nothing here may retry
    async with sqs_queue(sqs_endpoint, "rs-bad", visibility_timeout=60, delete_window=0.02) as q:
        yield q


async def publish_raw_sqs(broker: Any, queue: str, cases: dict[str, Raw]) -> None:
    """A plain aiobotocore producer in the documented SQS wire format: headers as String message
    attributes; a body that is not valid SQS text travels base64-encoded with the attribute
    ``rs-body-encoding: base64`` (exactly what SQSBroker.publish does)."""
    from replaysafe.brokers.sqs.wire import HEADER_BODY_ENCODING, _body_text

    client, _ = await broker._clients()
    url = (await broker._queue(queue)).url
    for body, headers, _ in cases.values():
        text, encoded = _body_text(body)
        attributes = {k: {"DataType": "String", "StringValue": v} for k, v in headers.items()}
        if encoded:
            attributes[HEADER_BODY_ENCODING] = {"DataType": "String", "StringValue": "base64"}
        await client.send_message(QueueUrl=url, MessageBody=text, MessageAttributes=attributes)


async def test_mixed_batch_of_bad_input_on_sqs(sqs: tuple[Any, str], tmp_path: Path) -> None:
    broker, queue = sqs
    now = time.time()
    cases = sqs_cases(now)
    assert not set(SQS_CANNOT_CARRY) & set(cases)
    run = Run(broker, queue, "g", tmp_path, Limits(max_payload_bytes=SQS_PAYLOAD_CAP))
    goods = len(cases)
    await broker.publish(queue, [good(i, now) for i in range(goods // 2)])
    await publish_raw_sqs(broker, queue, cases)
    await broker.publish(queue, [good(i, now) for i in range(goods // 2, goods)])

    async def empty() -> bool:
        depth = await broker.approximate_depth(queue)
        return bool(depth["visible"] + depth["in_flight"] + depth["delayed"] == 0)

    run.start()
    try:
        await run.until_settled(goods, len(cases), empty)
    finally:
        await run.stop()
    await run.check(cases, goods)
    depth = await broker.approximate_depth(queue)
    assert depth["visible"] + depth["in_flight"] + depth["delayed"] == 0  # every original deleted


def test_every_case_runs_somewhere_and_every_left_out_case_has_a_reason() -> None:
    names = set(_cases(0.0))
    assert set(rabbitmq_cases(0.0)) == names  # RabbitMQ carries all of them
    assert set(sqs_cases(0.0)) | set(SQS_CANNOT_CARRY) == names
    assert all(SQS_CANNOT_CARRY.values())
