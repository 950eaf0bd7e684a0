"""The embedded default: an in-memory broker and a SQLite ledger, in one process.

A producer publishes three capture-payment operations; a worker consumes them effectively-once.
The effect is keyed: the fake payments API below honours idempotency keys, as real ones do. Then
the producer retries one of them (as after an ambiguous publish: with the SAME operation id) and
a second worker (a restart, another process) answers that copy from the ledger without running
the handler: three charges for three orders. Each worker stops by itself once its copies are
settled. Run it again: the ledger (a file) remembers every operation, so nothing is charged.

Run:  python examples/embedded.py   (needs only replaysafe; LEDGER_PATH moves the ledger file)
"""

from __future__ import annotations

import asyncio
import os
import tempfile

from replaysafe import App, Context, Effect, Envelope, Guarantee, Producer, Worker, operation_id
from replaysafe.brokers import MemoryBroker
from replaysafe.ledger import SQLiteLedger
from replaysafe.testing import run_until_settled

LEDGER_PATH = os.environ.get("LEDGER_PATH", os.path.join(tempfile.gettempdir(), "shop-ledger.db"))


class FakePayments:
    """A payments API that honours idempotency keys: a known key returns the first charge."""

    def __init__(self) -> None:
        self.charges: dict[str, str] = {}  # idempotency key -> order id

    async def charge(self, order_id: str, amount: int, *, idempotency_key: str) -> str:
        if idempotency_key not in self.charges:
            self.charges[idempotency_key] = order_id
            print(f"payments-api: charged {order_id} {amount} (key {idempotency_key})")
        return f"charge:{idempotency_key}"


payments = FakePayments()
app = App("shop", broker=MemoryBroker(), ledger=SQLiteLedger(LEDGER_PATH))


@app.handler(
    "payments",  # the source: queue / topic
    guarantee=Guarantee.EFFECTIVELY_ONCE,  # required, no default
    effect=Effect.keyed("payments-api"),  # where replay stops hurting
    key=lambda p: ("capture-payment", p["order_id"]),  # operation id for plain producers
    name="capture_payment",  # fixes the group "shop.capture_payment" (see the README)
    lease=30,
)
async def capture_payment(ctx: Context) -> str:
    assert ctx.idempotency_key is not None  # keyed effects always get one: the operation id
    order = ctx.payload
    return await payments.charge(
        order["order_id"], order["amount"], idempotency_key=ctx.idempotency_key
    )


async def main() -> None:
    orders = [{"order_id": f"order-{i}", "amount": 100 * i} for i in (1, 2, 3)]
    envelopes = [Envelope.of(operation_id("capture-payment", o["order_id"]), o) for o in orders]
    producer = Producer(app.broker, Guarantee.EFFECTIVELY_ONCE)
    await producer.publish("payments", envelopes)
    await consume(copies=3)
    # the producer retries order-2 (say its first publish timed out): the SAME operation id
    await producer.publish("payments", envelopes[1:2])
    await consume(copies=1)
    print(f"payments-api: {len(payments.charges)} charges for {len(orders)} orders")
    await app.broker.close()
    await app.ledger.close()


async def consume(copies: int) -> None:
    """Run a worker until it settled ``copies`` deliveries, then stop it (a service runs
    ``replaysafe run examples.embedded:app`` until SIGTERM instead)."""
    async with asyncio.timeout(30):
        settled = await run_until_settled(Worker(app), copies)
    print(
        f"worker: {settled.applied} applied, {settled.duplicates} answered from the ledger "
        f"({copies} settled)"
    )


if __name__ == "__main__":
    asyncio.run(main())
