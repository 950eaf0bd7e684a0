"""Issue 13 item 3: a plain client's message (no content type, no rs-* headers) that was
quarantined is redriven through the CLI and applied once, on every broker.

Plain aio-pika, aiobotocore (SQS) and confluent-kafka producers send no content type. The runtime
decodes such a body as JSON (the wire format's default) and fingerprints its canonical form; the
redrive used to fingerprint the raw bytes instead, so every such entry was refused as "the stored
copy differs from the original". The body below is valid JSON that is *not* canonical (spacing),
which is what plain producers send.

Each case: a real worker (in this process) quarantines the message as ``non_retryable_error``
(the mailer is down), the mailer is fixed, ``replaysafe quarantine redrive MODULE:APP ID`` runs
(a subprocess for the real brokers; click's CliRunner for the memory broker, which lives in this
process), a new worker applies it, exactly once. Real time, every wait bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from replaysafe import App, QuarantineReason, Worker
from replaysafe.brokers import MemoryBroker
from replaysafe.brokers.base import Broker, RedeliveryKind
from replaysafe.cli import main
from replaysafe.failpoints import Failpoints
from replaysafe.ledger import MemoryLedger, State
from replaysafe.ledger.base import OpKey, QuarantineEntry

from .apps.plain_redrive_app import build
from .broker_fixtures import rabbit_source, sqs_queue
from .conftest import subprocess_env
from .waits import until

ROOT = Path(__file__).resolve().parent.parent
#: real seconds anything that must happen may take (a slow, shared machine; Kafka group joins)
WAIT = 60.0
#: valid JSON, not canonical (spacing, key order): the runtime fingerprints its canonical form
BODY = b'{"id": 7,   "email": "ann@example.com"}'
OP = "welcome:7"


@dataclass
class Setup:
    broker: Broker
    source: str
    group: str
    #: the broker's URL for the CLI subprocess (None: the memory broker, redriven in process)
    url: str | None
    send: Callable[[bytes], Awaitable[None]]


async def _memory(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    broker = MemoryBroker(failpoints=Failpoints())
    broker.declare("signups", mode=RedeliveryKind.NACK)

    async def send(body: bytes) -> None:
        await broker.publish_raw("signups", body, {})

    yield Setup(broker, "signups", "g", None, send)


async def _rabbitmq(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    import aio_pika

    url: str = request.getfixturevalue("amqp_url")
    group = f"g-{uuid.uuid4().hex[:8]}"
    async with rabbit_source(url, "rs-redrive", [group]) as (broker, source):

        async def send(body: bytes) -> None:
            conn = await aio_pika.connect(url)
            try:
                channel = await conn.channel()
                exchange = await channel.get_exchange(source)
                message = aio_pika.Message(body)  # a plain client: no content type, no headers
                assert message.content_type is None
                await exchange.publish(message, routing_key="")
            finally:
                await conn.close()

        yield Setup(broker, source, group, url, send)


async def _sqs(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    endpoint: str = request.getfixturevalue("sqs_endpoint")
    async with sqs_queue(endpoint, "rs-redrive", visibility_timeout=30) as (broker, queue):

        async def send(body: bytes) -> None:
            client, _ = await broker._clients()
            url = (await broker._queue(queue)).url
            # a plain SendMessage: no message attributes at all
            await client.send_message(QueueUrl=url, MessageBody=body.decode())

        host = endpoint.removeprefix("http://")
        yield Setup(broker, queue, "g", f"sqs+http://testing:testing@{host}/us-east-1", send)


async def _kafka(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient

    from replaysafe.brokers.kafka import KafkaBroker

    bootstrap: str = request.getfixturevalue("kafka_bootstrap")
    broker = KafkaBroker(
        bootstrap, failpoints=Failpoints(), session_timeout=3.0, heartbeat_interval=0.3,
        poll_interval=0.05, drain_timeout=3.0, join_timeout=30.0,
    )  # fmt: skip
    topic = f"rs-redrive-{uuid.uuid4().hex[:10]}"
    await broker.create_topic(topic, 1)

    async def send(body: bytes) -> None:
        plain = Producer({"bootstrap.servers": bootstrap})
        plain.produce(topic, value=body)  # a plain record: no headers, no content type
        assert await asyncio.to_thread(plain.flush, 10) == 0

    try:
        yield Setup(broker, topic, f"g-{uuid.uuid4().hex[:8]}", f"kafka://{bootstrap}", send)
    finally:
        with contextlib.suppress(Exception):
            await broker.close()
        admin = AdminClient({"bootstrap.servers": bootstrap})
        for fut in admin.delete_topics([topic], operation_timeout=10).values():
            with contextlib.suppress(Exception):
                await asyncio.to_thread(fut.result, 15)


SETUPS = {"memory": _memory, "rabbitmq": _rabbitmq, "sqs": _sqs, "kafka": _kafka}


@contextlib.asynccontextmanager
async def running(app: App) -> AsyncIterator[None]:
    worker = Worker(app)
    task = asyncio.create_task(worker.run(drain_timeout=10))
    try:
        yield
        assert not task.done(), "the worker stopped on its own"
    finally:
        worker.stop()
        async with asyncio.timeout(WAIT):
            await task  # raises if the worker crashed


def _effects(directory: Path) -> list[str]:
    path = directory / "effects.txt"
    return path.read_text().split() if path.exists() else []


async def _redrive_cli(s: Setup, app: App, entry_id: str, directory: Path) -> tuple[int, str]:
    """``replaysafe quarantine redrive MODULE:APP ID``: a subprocess with its own broker
    connection and the same SQLite ledger file; for the memory broker, CliRunner on a module
    holding this process's app (on a thread: the command runs its own event loop)."""
    if s.url is None:
        module = types.ModuleType(f"rs_plain_redrive_{uuid.uuid4().hex[:8]}")
        module.app = app  # type: ignore[attr-defined]
        sys.modules[module.__name__] = module
        try:
            target = f"{module.__name__}:app"
            res = await asyncio.to_thread(
                CliRunner().invoke, main, ["quarantine", "redrive", target, entry_id]
            )
        finally:
            del sys.modules[module.__name__]
        return res.exit_code, res.output
    env = subprocess_env(REDRIVE_BROKER=s.url, REDRIVE_SOURCE=s.source, REDRIVE_GROUP=s.group,
                         REDRIVE_DIR=str(directory))  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "replaysafe.cli", "quarantine", "redrive",
        "tests.apps.plain_redrive_app:app", entry_id,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(WAIT):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("replaysafe quarantine redrive did not finish")
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.parametrize("kind", list(SETUPS))
async def test_a_plain_message_without_content_type_is_redriven_through_the_cli(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    async with contextlib.asynccontextmanager(SETUPS[kind])(request) as s:
        (tmp_path / "broken").touch()
        ledger = MemoryLedger() if s.url is None else None
        app = build(s.broker, s.source, s.group, tmp_path, ledger=ledger)
        await s.send(BODY)

        async def quarantined() -> list[QuarantineEntry]:
            return await app.ledger.quarantined()

        async with running(app):
            [entry] = await until(quarantined, seconds=WAIT, what="the plain message quarantined")
        assert entry.reason is QuarantineReason.NON_RETRYABLE_ERROR
        assert (entry.operation_id, entry.message) == (OP, BODY)
        assert _effects(tmp_path) == []

        (tmp_path / "broken").unlink()  # the mailer is fixed
        code, out = await _redrive_cli(s, app, entry.id, tmp_path)
        assert code == 0 and f"redriven {entry.id}" in out, out

        async def completed() -> bool:
            rec = await app.ledger.get(OpKey("welcome", OP))
            return rec is not None and rec.state is State.COMPLETED

        async with running(app):
            await until(completed, seconds=WAIT, what="the redriven copy applied")
        assert _effects(tmp_path) == [OP]  # applied, once
        again = await app.ledger.quarantine_entry(entry.id)
        assert again is not None and again.redrives == 1 and again.seen == 1
        assert len(await app.ledger.quarantined()) == 1  # nothing new set aside
        await app.ledger.close()
