"""An app for `replaysafe run` tests: each handler call takes a while, then records its op."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from replaysafe import App, Context, Effect, Envelope, Guarantee
from replaysafe.brokers import MemoryBroker
from replaysafe.ledger import SQLiteLedger

OUT = Path(os.environ["SLOW_APP_OUT"])
broker = MemoryBroker()
app = App("slow", broker=broker, ledger=SQLiteLedger(OUT.with_suffix(".db")))


@app.on_startup
async def fill() -> None:
    await broker.publish("jobs", [Envelope.of(f"job:{i}", {"i": i}) for i in range(4)])


@app.handler("jobs", guarantee=Guarantee.EFFECTIVELY_ONCE, effect=Effect.keyed("file"),
             concurrency=4, lease=30)  # fmt: skip
async def work(ctx: Context) -> None:
    with Path(str(OUT) + ".started").open("a") as f:  # noqa: ASYNC230 - a tiny test marker
        f.write(ctx.operation_id + "\n")
    await asyncio.sleep(1.0)
    with OUT.open("a") as f:  # noqa: ASYNC230
        f.write(ctx.operation_id + "\n")
