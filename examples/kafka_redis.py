"""Kafka + Redis: a keyed effect, the ledger in Redis.

The topology step creates the topic (``replaysafe topology declare examples.kafka_redis:app``);
a new consumer group starts from the earliest offset, so orders published before the first
worker are consumed too. The handler calls a payments API with the operation id as its
idempotency key (a fake one here, the test kit's ``EffectProbe``, which honours keys as real
payments APIs do). The producer retries one order (the SAME operation id) and a second worker
answers that copy from the Redis ledger: three charges for three orders. The ledger is as
durable as Redis is: run Redis with appendonly (see docs/ledger-redis.md), or a Redis restart
forgets what was done.

Run, with Kafka and Redis on the machine (pip install 'replaysafe[kafka,redis]'):
    python examples/kafka_redis.py
Settings from the environment: KAFKA_BOOTSTRAP (default 127.0.0.1:9092), REDIS_URL, EXAMPLE_NAME
(the app's name, the prefix of its topic and of its Redis keys; default "shop").
"""

from __future__ import annotations

import asyncio
import os

from replaysafe import (
    App,
    Context,
    Effect,
    Envelope,
    Guarantee,
    Producer,
    Worker,
    declare_topology,
    operation_id,
)
from replaysafe.brokers.kafka import KafkaBroker
from replaysafe.ledger.redis import RedisLedger
from replaysafe.testing import EffectProbe, run_until_settled

KAFKA_BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
NAME = os.environ.get("EXAMPLE_NAME", "shop")
TOPIC = f"{NAME}.payments"


# --8<-- [start:app]
payments = EffectProbe(honour_keys=True)  # a fake payments API: it honours idempotency keys
app = App(
    NAME,
    broker=KafkaBroker(KAFKA_BOOTSTRAP),
    ledger=RedisLedger(REDIS_URL, prefix=f"{NAME}:"),
)


@app.handler(
    TOPIC,
    guarantee=Guarantee.EFFECTIVELY_ONCE,
    effect=Effect.keyed("payments-api"),
    key=lambda p: ("capture-payment", p["order_id"]),
    name="capture_payment",  # the consumer group id is f"{NAME}.capture_payment"
)
async def capture_payment(ctx: Context) -> str:
    assert ctx.idempotency_key is not None  # keyed effects always get one: the operation id
    order = ctx.payload
    return await payments.apply(
        order["order_id"], order["amount"], idempotency_key=ctx.idempotency_key
    )


# --8<-- [end:app]


async def main() -> None:
    for t in await declare_topology(app):  # creates the topic (1 partition) if it is missing
        print(f"declared: topic {t.names['topic']!r}, consumer group {t.names['group id']!r}")
    orders = [{"order_id": f"order-{i}", "amount": 100 * i} for i in (1, 2, 3)]
    # the Kafka record key orders the operations of one order within its partition
    envelopes = [
        Envelope.of(operation_id("capture-payment", o["order_id"]), o, key=o["order_id"])
        for o in orders
    ]
    producer = Producer(app.broker, Guarantee.EFFECTIVELY_ONCE)
    await producer.publish(TOPIC, envelopes)
    await consume(copies=3)
    await producer.publish(TOPIC, envelopes[1:2])  # a producer retry: the same operation id
    await consume(copies=1)
    for _, order_id, amount in payments.effects:
        print(f"payments-api: charged {order_id} {amount}")
    print(f"payments-api: {len(payments.effects)} charges for {len(orders)} orders")
    await app.broker.close()
    await app.ledger.close()


async def consume(copies: int) -> None:
    """Run a worker until it settled ``copies`` deliveries, then stop it (a service runs
    ``replaysafe run examples.kafka_redis:app`` until SIGTERM instead)."""
    async with asyncio.timeout(90):
        settled = await run_until_settled(Worker(app), copies)
    print(
        f"worker: {settled.applied} applied, {settled.duplicates} answered from the ledger "
        f"({copies} settled)"
    )


if __name__ == "__main__":
    asyncio.run(main())
