"""RabbitMQ + PostgreSQL: a transactional effect, the business row and the ledger row in one commit.

Three steps a deployment has too: migrate the ledger schema (``replaysafe ledger migrate --dsn
DSN`` does the same), declare the topology so that nothing published before the first worker is
lost (``replaysafe topology declare examples.rabbitmq_postgres:app``), then publish and consume.
The handler inserts the payment row through ``ctx.tx``: the ledger records the operation in that
same transaction, so a replayed copy finds it done and can never insert the row twice. The
producer retries one order (the SAME operation id) and a second worker answers that copy from
the ledger. The payments table then holds one row per order, however often this runs.

Run, with RabbitMQ on 5672 and PostgreSQL on 5432 (pip install 'replaysafe[rabbitmq,postgres]'):
    python examples/rabbitmq_postgres.py
Settings from the environment: RABBITMQ_URL, POSTGRES_DSN, EXAMPLE_NAME (the app's name, its
PostgreSQL schema and the prefix of its queue; default "shop").
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
from replaysafe.brokers.rabbitmq import RabbitMQBroker
from replaysafe.ledger.postgres import PostgresLedger
from replaysafe.testing import run_until_settled

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_DSN = os.environ.get("POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
NAME = os.environ.get("EXAMPLE_NAME", "shop")
SOURCE = f"{NAME}.payments"

# PostgresLedger validates NAME as a schema name (lower-case letters, digits, underscores), so
# the f-strings below compose a checked identifier; values always travel as parameters
ledger = PostgresLedger(POSTGRES_DSN, schema=NAME)
app = App(NAME, broker=RabbitMQBroker(RABBITMQ_URL), ledger=ledger)


# --8<-- [start:handler]
@app.handler(
    SOURCE,
    guarantee=Guarantee.EFFECTIVELY_ONCE,
    effect=Effect.transactional(),  # the effect is a write in the ledger's own database
    key=lambda p: ("capture-payment", p["order_id"]),
    name="capture_payment",  # the group, and so the queue, is f"{NAME}.capture_payment"
)
async def capture_payment(ctx: Context) -> None:
    assert ctx.tx is not None  # transactional handlers get the ledger's open transaction
    await ctx.tx.execute(
        f"INSERT INTO {NAME}.payments (order_id, amount) VALUES (%s, %s)",
        (ctx.payload["order_id"], ctx.payload["amount"]),
    )


# --8<-- [end:handler]


async def main() -> None:
    # --8<-- [start:setup]
    report = await ledger.migrate()  # idempotent: creates or upgrades the ledger schema
    print("ledger:", report.describe().splitlines()[0])
    async with ledger.transaction() as tx:  # the business table lives beside the ledger
        await tx.execute(
            f"CREATE TABLE IF NOT EXISTS {NAME}.payments (id bigserial PRIMARY KEY, "
            "order_id text NOT NULL, amount integer NOT NULL)"
        )
    for t in await declare_topology(app):  # exchange + one queue per group, before publishing
        print(f"declared: exchange {t.source!r} -> queue {t.names['queue']!r}")
    # --8<-- [end:setup]

    orders = [{"order_id": f"order-{i}", "amount": 100 * i} for i in (1, 2, 3)]
    envelopes = [Envelope.of(operation_id("capture-payment", o["order_id"]), o) for o in orders]
    producer = Producer(app.broker, Guarantee.EFFECTIVELY_ONCE)
    await producer.publish(SOURCE, envelopes)
    await consume(copies=3)
    await producer.publish(SOURCE, envelopes[1:2])  # a producer retry: the same operation id
    await consume(copies=1)

    async with ledger.transaction() as tx:
        rows = await tx.fetchall(
            f"SELECT order_id, count(*) FROM {NAME}.payments GROUP BY order_id ORDER BY order_id"
        )
    for order_id, n in rows:
        print(f"payments table: {order_id} has {n} row(s)")
    print(f"payments table: {sum(n for _, n in rows)} rows for {len(rows)} orders")
    await app.broker.close()
    await ledger.close()


async def consume(copies: int) -> None:
    """Run a worker until it settled ``copies`` deliveries, then stop it (a service runs
    ``replaysafe run examples.rabbitmq_postgres:app`` until SIGTERM instead)."""
    async with asyncio.timeout(60):
        settled = await run_until_settled(Worker(app), copies)
    print(
        f"worker: {settled.applied} applied, {settled.duplicates} answered from the ledger "
        f"({copies} settled)"
    )


if __name__ == "__main__":
    asyncio.run(main())
