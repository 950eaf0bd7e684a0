"""`replaysafe topology declare|show` (#13 item 8): a plain producer can publish before any worker
ran, and the command names what each handler consumes on each broker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from replaysafe import App, Guarantee, Worker, declare_topology, show_topology
from replaysafe.brokers.kafka import KafkaBroker
from replaysafe.brokers.rabbitmq import RabbitMQBroker
from replaysafe.brokers.sqs import SQSBroker
from replaysafe.ledger import MemoryLedger
from replaysafe.testing import run_until_settled

from .apps.topology_app import make_app
from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ["shop.capture_payment", "shop.send_receipt"]


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replaysafe.cli", "topology", *args],
        env=subprocess_env(**env), cwd=ROOT,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_declare_lets_a_plain_producer_publish_before_any_worker(
    amqp_url: str, tmp_path: Path
) -> None:
    import aio_pika
    from aiormq.exceptions import DeliveryError

    source = f"rs-test-topology-{uuid.uuid4().hex[:8]}"
    env = {"TOPOLOGY_SOURCE": source, "TOPOLOGY_AMQP": amqp_url,
           "TOPOLOGY_LEDGER": str(tmp_path / "ledger.db")}  # fmt: skip
    try:
        conn = await aio_pika.connect(amqp_url)
        try:
            channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
            # the exchange exists (as replaysafe declares it) but no worker ever declared a queue:
            # the broker returns the message as unroutable, nothing is stored
            exchange = await channel.declare_exchange(
                source, aio_pika.ExchangeType.FANOUT, durable=True
            )

            async def publish(order_id: str) -> None:
                # a plain client: no rs-* headers, no message id; the key extractor derives the id
                body = json.dumps({"order_id": order_id}).encode()
                await exchange.publish(aio_pika.Message(body), routing_key="", mandatory=True)

            with pytest.raises(DeliveryError, match="NO_ROUTE"):
                await publish("o-0")

            declared = await asyncio.to_thread(
                cli, "declare", "tests.apps.topology_app:app", env=env
            )
            assert declared.returncode == 0, declared.stderr
            assert "Traceback" not in declared.stderr
            for group in GROUPS:
                assert f"queue              {source}/{group}\n" in declared.stdout, declared.stdout
            assert f"exchange           {source}   <- producers publish here" in declared.stdout

            for order_id in ("o-1", "o-2"):
                await publish(order_id)  # mandatory: raises on NO_ROUTE
        finally:
            await conn.close()

        applied: list[str] = []
        app = make_app(source, amqp_url, tmp_path / "ledger.db", applied)
        try:
            # 2 messages, a copy for each of the 2 groups
            async with asyncio.timeout(30):
                settled = await run_until_settled(Worker(app), copies=4)
        finally:
            await app.broker.close()
            await app.ledger.close()
    finally:  # whatever failed, the exchange and queues go
        cleanup = RabbitMQBroker(amqp_url)
        await cleanup.delete(source, GROUPS)
        await cleanup.close()
    assert sorted(applied) == ["capture:o-1", "capture:o-2", "receipt:o-1", "receipt:o-2"]
    assert settled.applied == 4 and settled.total == 4


def test_show_names_the_rabbitmq_topology_without_a_server(tmp_path: Path) -> None:
    env = {"TOPOLOGY_SOURCE": "orders", "TOPOLOGY_AMQP": "amqp://guest:guest@127.0.0.1:1/",
           "TOPOLOGY_LEDGER": str(tmp_path / "ledger.db")}  # fmt: skip
    shown = cli("show", "tests.apps.topology_app:app", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == [
        {"handler": "capture_payment", "source": "orders", "group": "shop.capture_payment",
         "names": {"exchange": "orders", "queue": "orders/shop.capture_payment",
                   "dead-letter queue": "orders/shop.capture_payment/dead"}},
        {"handler": "send_receipt", "source": "orders", "group": "shop.send_receipt",
         "names": {"exchange": "orders", "queue": "orders/shop.send_receipt",
                   "dead-letter queue": "orders/shop.send_receipt/dead"}},
    ]  # fmt: skip


def test_declare_without_a_server_is_one_line(tmp_path: Path) -> None:
    env = {"TOPOLOGY_SOURCE": "orders", "TOPOLOGY_AMQP": "amqp://guest:guest@127.0.0.1:1/",
           "TOPOLOGY_LEDGER": str(tmp_path / "ledger.db")}  # fmt: skip
    declared = cli("declare", "tests.apps.topology_app:app", env=env)
    assert declared.returncode != 0
    assert "Traceback" not in declared.stderr, declared.stderr
    assert declared.stderr.startswith("Error: "), declared.stderr


def _app(broker: SQSBroker | KafkaBroker, source: str) -> App:
    app = App("shop", broker=broker, ledger=MemoryLedger())

    @app.handler(source, guarantee=Guarantee.AT_LEAST_ONCE)
    async def capture_payment(ctx: object) -> None: ...

    return app


async def test_sqs_queue_url(sqs_endpoint: str) -> None:
    broker = SQSBroker(endpoint_url=sqs_endpoint, region="us-east-1",
                       aws_access_key_id="test", aws_secret_access_key="test")  # fmt: skip
    source = f"rs-test-topology-{uuid.uuid4().hex[:8]}"
    app = _app(broker, source)
    try:
        [before] = await show_topology(app)
        assert dict(before.names) == {"queue": source,
                                      "queue URL": "(the queue does not exist yet)"}  # fmt: skip
        [after] = await declare_topology(app, visibility_timeout=45)
        assert after.publish_to == ("queue", source)
        assert after.names["queue URL"].startswith(sqs_endpoint.rstrip("/"))
        assert after.names["queue URL"].endswith("/" + source)
        # declared again without a timeout: the existing queue is kept (a 30 s CreateQueue
        # would be refused for its 45 s)
        assert await declare_topology(app) == [after]
    finally:
        await broker.drop_source(source)
        await broker.close()


def _partitions(bootstrap: str, topic: str) -> int:
    """The partition count of ``topic``, read with a plain admin client."""
    from confluent_kafka.admin import AdminClient

    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=20)
    return len(meta.topics[topic].partitions)


async def test_kafka_topic_and_group_id(kafka_bootstrap: str) -> None:
    broker = KafkaBroker(kafka_bootstrap)
    source = f"rs-test-topology-{uuid.uuid4().hex[:8]}"
    app = _app(broker, source)
    try:
        await broker.create_topic(source, 3)
        # an existing topic is kept whatever its partition count (a new one would get 1)
        [t] = await declare_topology(app)
        assert dict(t.names) == {"topic": source, "group id": "shop.capture_payment"}
        assert t.group == "shop.capture_payment"
        assert await asyncio.to_thread(_partitions, kafka_bootstrap, source) == 3
    finally:
        await broker.drop_source(source)
        await broker.close()
