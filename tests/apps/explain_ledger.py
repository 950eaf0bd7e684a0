"""An effectively-once app whose ledger is named by ``$REPLAYSAFE_TEST_EXPLAIN_LEDGER`` (any
ledger URL), built afresh on every access of ``app``, so `replaysafe explain` judges the
durability of whichever ledger a test points it at."""

from __future__ import annotations

import os

from replaysafe import App, Context, Effect, Guarantee
from replaysafe.brokers import MemoryBroker
from replaysafe.ledger import ledger_from_url

ENV = "REPLAYSAFE_TEST_EXPLAIN_LEDGER"


async def charge(ctx: Context) -> None:
    return None


def __getattr__(name: str) -> App:
    if name != "app":
        raise AttributeError(name)
    app = App("durability", broker=MemoryBroker(), ledger=ledger_from_url(os.environ[ENV]))
    app.handler("payments", guarantee=Guarantee.EFFECTIVELY_ONCE,
                effect=Effect.keyed("payments-api"))(charge)  # fmt: skip
    return app
