"""An app for `replaysafe topology` tests: two effectively-once handlers on one RabbitMQ source
(named by TOPOLOGY_SOURCE), keyed by the payload's order id, as a plain producer would need."""

from __future__ import annotations

import os
from pathlib import Path

from replaysafe import App, Context, Effect, Guarantee
from replaysafe.brokers.rabbitmq import RabbitMQBroker
from replaysafe.ledger import SQLiteLedger


def make_app(source: str, url: str, ledger: Path, applied: list[str] | None = None) -> App:
    app = App("shop", broker=RabbitMQBroker(url), ledger=SQLiteLedger(ledger))

    @app.handler(source, guarantee=Guarantee.EFFECTIVELY_ONCE, effect=Effect.keyed("payments"),
                 key=lambda p: ("capture-payment", p["order_id"]))  # fmt: skip
    async def capture_payment(ctx: Context) -> None:
        if applied is not None:
            applied.append(f"capture:{ctx.payload['order_id']}")

    @app.handler(source, guarantee=Guarantee.EFFECTIVELY_ONCE, effect=Effect.keyed("mail"),
                 key=lambda p: ("receipt", p["order_id"]), name="send_receipt")  # fmt: skip
    async def receipt(ctx: Context) -> None:
        if applied is not None:
            applied.append(f"receipt:{ctx.payload['order_id']}")

    return app


if "TOPOLOGY_SOURCE" in os.environ:
    app = make_app(
        os.environ["TOPOLOGY_SOURCE"],
        os.environ["TOPOLOGY_AMQP"],
        Path(os.environ["TOPOLOGY_LEDGER"]),
    )
