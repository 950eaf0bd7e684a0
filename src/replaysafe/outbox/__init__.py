"""The transactional outbox: stage envelopes in the business transaction, publish after commit.

::

    store = SQLiteOutboxStore(ledger)          # or PostgresOutboxStore(ledger)
    await store.migrate()
    async with ledger.transaction() as tx:
        await tx.execute("INSERT INTO orders ...", (...))
        await store.stage(tx, "order-events", [Envelope.of(op_id, event, key=order_id)])
    ...
    await Relay(store, broker).run(stop_event)  # publishes committed rows, in order per key

The PostgreSQL store imports its driver lazily (extra ``postgres``).
"""

from replaysafe.outbox.base import (
    ClaimedBatch,
    OutboxRow,
    OutboxState,
    OutboxStore,
    Skip,
)
from replaysafe.outbox.relay import Relay
from replaysafe.stores.postgres._outbox import PostgresOutboxStore
from replaysafe.stores.sqlite._outbox import SQLiteOutboxStore

__all__ = [
    "ClaimedBatch",
    "OutboxRow",
    "OutboxState",
    "OutboxStore",
    "PostgresOutboxStore",
    "Relay",
    "SQLiteOutboxStore",
    "Skip",
]
