"""The SQLite outbox store at its historical import path; it lives in
:mod:`replaysafe.stores.sqlite.outbox`."""

from replaysafe.stores.sqlite.outbox import SCHEMA_VERSION, SQLiteOutboxStore

__all__ = ["SCHEMA_VERSION", "SQLiteOutboxStore"]
