"""The SQLite ledger's public names at their historical import path; the engine lives in
:mod:`replaysafe.stores.sqlite`."""

from replaysafe.stores.sqlite import (
    PURGE_QUARANTINE_SQL,
    PURGE_SQL,
    SCHEMA_VERSION,
    SYNCHRONOUS_MODES,
    SQLiteLedger,
    SQLiteResult,
    SQLiteTransaction,
    SyncSQLiteLedger,
    SyncSQLiteTransaction,
    assess_sqlite,
)

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
