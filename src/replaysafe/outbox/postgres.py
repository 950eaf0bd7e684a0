"""The PostgreSQL outbox's public import path; the store lives in
:mod:`replaysafe.stores.postgres.outbox`."""

from replaysafe.stores.postgres.outbox import PostgresOutboxStore

__all__ = ["PostgresOutboxStore"]
