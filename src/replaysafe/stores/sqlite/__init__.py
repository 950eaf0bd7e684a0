"""The SQLite engine: the ledger (and the outbox beside it, :mod:`.outbox`) in one durable file,
safe for many coroutines and for several processes sharing it.

How it stays correct:

- **One writer at a time, decided by SQLite.** Every read-decide-write (claim, extend, complete,
  release, quarantine, redrive, purge, purge_quarantine) runs inside ``BEGIN IMMEDIATE``: the
  write lock is taken *before* the record is read, so two processes can never both read "free"
  and both claim. The state machine itself is ``decide_claim`` / ``check_fence`` from
  :mod:`replaysafe.ledger.base`, shared with every other backend.
- **Fencing tokens come from a one-row meta table** bumped in the same transaction as the claim, so
  they strictly increase across the whole file: across operations, processes and restarts.
- **Durability.** WAL journal, ``PRAGMA synchronous=FULL`` by default: a call that returned has been
  fsynced. ``claim_many`` and ``complete_many`` are one transaction (one fsync) per batch.
- **The event loop never blocks on disk.** The connection lives on one dedicated thread (a
  single-worker executor); an ``asyncio.Lock`` serialises use of it. The lock is what lets an open
  :meth:`SQLiteLedger.transaction` keep the connection across ``await`` points.
- **Time** is the injected :class:`~replaysafe.clock.Clock`, stored as REAL POSIX seconds; leases
  are judged by it (processes sharing a file must share a sane wall clock, as with any lease).

What a caller can lose or see twice: a call that was cancelled, or that raised
``LedgerUnavailable`` on a disk error at commit, may or may not have committed. That is never
unsafe: an unknown claim expires and is taken over with ``recovered=True``; an unknown completion is
found by the next claim as ``AlreadyDone``. The caller must only *not* complete at the broker
after such an error, exactly as after ``LeaseLost``.
"""

from replaysafe.ledger.durability import assess_sqlite
from replaysafe.stores.sqlite.connection import SYNCHRONOUS_MODES, SQLiteResult
from replaysafe.stores.sqlite.ledger import SQLiteLedger, SQLiteTransaction
from replaysafe.stores.sqlite.schema import SCHEMA_VERSION
from replaysafe.stores.sqlite.sql import PURGE_QUARANTINE_SQL, PURGE_SQL
from replaysafe.stores.sqlite.sync import SyncSQLiteLedger, SyncSQLiteTransaction

__all__ = [
    "PURGE_QUARANTINE_SQL",
    "PURGE_SQL",
    "SCHEMA_VERSION",
    "SYNCHRONOUS_MODES",
    "SQLiteLedger",
    "SQLiteResult",
    "SQLiteTransaction",
    "SyncSQLiteLedger",
    "SyncSQLiteTransaction",
    "assess_sqlite",
]
