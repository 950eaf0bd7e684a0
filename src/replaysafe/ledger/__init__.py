"""Replay ledgers. Backends other than memory and SQLite import their drivers lazily."""

from typing import Any

from replaysafe.ledger.base import (
    Acquired,
    AlreadyDone,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    Conflict,
    HandlerControls,
    InFlight,
    Ledger,
    LedgerAdmin,
    LedgerBackend,
    OpKey,
    PauseState,
    Quarantined,
    QuarantineEntry,
    QuarantineRequest,
    QuarantineStore,
    Record,
    State,
    Transaction,
    TransactionalLedger,
)
from replaysafe.ledger.memory import MemoryLedger
from replaysafe.stores.sqlite import SQLiteLedger

__all__ = [
    "ledger_from_url",
    "Acquired",
    "AlreadyDone",
    "Claim",
    "ClaimOutcome",
    "ClaimRequest",
    "Conflict",
    "HandlerControls",
    "InFlight",
    "Ledger",
    "LedgerAdmin",
    "LedgerBackend",
    "MemoryLedger",
    "OpKey",
    "PauseState",
    "QuarantineEntry",
    "QuarantineRequest",
    "Quarantined",
    "QuarantineStore",
    "Record",
    "SQLiteLedger",
    "State",
    "Transaction",
    "TransactionalLedger",
]


def ledger_from_url(spec: str, **opts: Any) -> LedgerBackend:
    """The ledger named by ``spec``: ``memory``, ``sqlite:PATH``, ``postgresql://…`` (extra
    ``postgres``; ``?schema=…&table_prefix=…&min_size=…&max_size=…&acquire_timeout=…&
    auto_migrate=1`` in the URL or in ``opts``: ``PostgresLedger.from_url``) or ``redis://…``
    (extra ``redis``; ``?prefix=…&retention=…``: ``RedisLedger.from_url``) or ``mysql://…`` /
    ``mariadb://…`` (extra ``mysql``; ``MySQLConfig.from_url``). The one place a
    string becomes a ledger (CLI, demo, chaos); ``opts`` win over the URL."""
    from replaysafe._redact import redact
    from replaysafe.errors import ConfigurationError

    if spec == "memory":
        return MemoryLedger(**opts)
    if spec.startswith("sqlite:"):
        path = spec.removeprefix("sqlite:")
        if not path:
            raise ConfigurationError("sqlite:PATH needs the path of the ledger file")
        return SQLiteLedger(path, **opts)
    if spec.startswith(("postgres://", "postgresql://")) or "dbname=" in spec:
        from replaysafe.stores.postgres.ledger import PostgresLedger

        return PostgresLedger.from_url(spec, **opts)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from replaysafe.ledger.redis import RedisLedger

        return RedisLedger.from_url(spec, **opts)
    if spec.startswith(("mysql://", "mariadb://")):
        from replaysafe.stores.mysql import MySQLLedger

        return MySQLLedger.from_url(spec, **opts)
    raise ConfigurationError(
        f"unknown ledger {redact(spec)!r}; use memory, sqlite:PATH, postgresql://…, redis://… "
        "or mysql://…"
    )
