"""An app that claims effectively-once over a downstream that cannot deduplicate and re-runs it."""

from __future__ import annotations

from replaysafe import App, Context, Effect, Guarantee
from replaysafe.brokers import MemoryBroker
from replaysafe.ledger import SQLiteLedger

app = App("bad", broker=MemoryBroker(), ledger=SQLiteLedger(":memory:"))


@app.handler("emails", guarantee=Guarantee.EFFECTIVELY_ONCE,
             effect=Effect.unkeyed("smtp", on_unknown="retry"))  # fmt: skip
async def send(ctx: Context) -> None:
    return None
