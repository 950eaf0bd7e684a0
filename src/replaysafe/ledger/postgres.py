"""The PostgreSQL ledger's public import path. The engine lives in :mod:`replaysafe.stores.postgres`
(connection, errors, schema, statements, the ledger split by role, the sync twin, the outbox);
this module re-exports what users import from here."""

from replaysafe.ledger.durability import assess_postgres
from replaysafe.stores.postgres.connection import PREFIX_PATTERN, SCHEMA_PATTERN
from replaysafe.stores.postgres.ledger import PostgresLedger
from replaysafe.stores.postgres.schema import SCHEMA_VERSION, MigrationReport
from replaysafe.stores.postgres.sql import PURGE_BATCH
from replaysafe.stores.postgres.sync import SyncPostgresLedger, SyncPostgresTransaction
from replaysafe.stores.postgres.transaction import PostgresTransaction

__all__ = [
    "PREFIX_PATTERN",
    "PURGE_BATCH",
    "SCHEMA_PATTERN",
    "SCHEMA_VERSION",
    "MigrationReport",
    "PostgresLedger",
    "PostgresTransaction",
    "SyncPostgresLedger",
    "SyncPostgresTransaction",
    "assess_postgres",
]
