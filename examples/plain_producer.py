"""A plain producer: aio-pika alone (no replaysafe, no rs-* headers) publishing to the topology
replaysafe declared, consumed effectively-once.

Where a plain producer publishes: on RabbitMQ, to the fanout exchange named after the handler's
source (any routing key); replaysafe binds one queue per consumer group to it
(``replaysafe topology show examples.plain_producer:app`` names them). That topology must exist
before the first publish: with no queue bound, RabbitMQ returns the message as unroutable
(NO_ROUTE, raised here thanks to ``mandatory=True``) and stores nothing; this program declares
it first, as ``replaysafe topology declare examples.plain_producer:app`` does.
The messages carry no operation id: the handler's key extractor derives it from the payload, so
when the producer retries one order, a second worker finds that operation done in the ledger and
the order ships once.

Run, with RabbitMQ on 5672 (pip install 'replaysafe[rabbitmq]'):
    python examples/plain_producer.py
Settings from the environment: RABBITMQ_URL, LEDGER_PATH (a SQLite file), EXAMPLE_NAME (the app's
name and the prefix of its exchange; default "shop").
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from datetime import UTC, datetime

import aio_pika

from replaysafe import App, Context, Effect, Guarantee, Worker, declare_topology
from replaysafe.brokers.rabbitmq import RabbitMQBroker
from replaysafe.ledger import SQLiteLedger
from replaysafe.testing import run_until_settled

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
NAME = os.environ.get("EXAMPLE_NAME", "shop")
LEDGER_PATH = os.environ.get("LEDGER_PATH", os.path.join(tempfile.gettempdir(), f"{NAME}.db"))
SOURCE = f"{NAME}.orders"

shipments: dict[str, str] = {}  # a fake warehouse API: idempotency key -> order id
app = App(NAME, broker=RabbitMQBroker(RABBITMQ_URL), ledger=SQLiteLedger(LEDGER_PATH))


@app.handler(
    SOURCE,
    guarantee=Guarantee.EFFECTIVELY_ONCE,
    effect=Effect.keyed("warehouse"),
    key=lambda p: ("ship-order", p["order_id"]),  # the operation id, from the payload
    name="ship_order",  # the group is f"{NAME}.ship_order": its queue is "<source>/<group>"
)
async def ship_order(ctx: Context) -> None:
    assert ctx.idempotency_key is not None
    if ctx.idempotency_key not in shipments:  # the warehouse honours the key
        shipments[ctx.idempotency_key] = ctx.payload["order_id"]
        print(f"warehouse: shipped {ctx.payload['order_id']} (key {ctx.idempotency_key})")


# --8<-- [start:publish]
async def publish_plain(orders: list[str]) -> None:
    """The producer: plain aio-pika, as any AMQP client in any language would publish."""
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        # confirms: publish() returns once RabbitMQ has the message; returns raise (NO_ROUTE)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(SOURCE)  # fails if nobody declared it
        for order_id in orders:
            message = aio_pika.Message(
                json.dumps({"order_id": order_id}).encode(),
                content_type="application/json",
                timestamp=datetime.now(UTC),  # the publish time the replay horizon checks
            )
            await exchange.publish(message, routing_key="", mandatory=True)
    print(f"producer: published {orders} to exchange {SOURCE!r}")


# --8<-- [end:publish]


async def main() -> None:
    for t in await declare_topology(app):
        print(f"declared: exchange {t.source!r} -> queue {t.names['queue']!r}")
    await publish_plain(["order-1", "order-2", "order-3"])
    await consume(copies=3)
    await publish_plain(["order-2"])  # the producer retries order-2: the same operation
    await consume(copies=1)
    print(f"warehouse: {len(shipments)} shipments for 3 orders")
    await app.broker.close()
    await app.ledger.close()


async def consume(copies: int) -> None:
    """Run a worker until it settled ``copies`` deliveries, then stop it (a service runs
    ``replaysafe run examples.plain_producer:app`` until SIGTERM instead)."""
    async with asyncio.timeout(60):
        settled = await run_until_settled(Worker(app), copies)
    print(
        f"worker: {settled.applied} applied, {settled.duplicates} answered from the ledger "
        f"({copies} settled)"
    )


if __name__ == "__main__":
    asyncio.run(main())
