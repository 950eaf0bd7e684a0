"""Replay ledgers. Backends other than memory and SQLite import their drivers lazily."""

from replaysafe.ledger.base import (
    Acquired,
    AlreadyDone,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    Conflict,
    InFlight,
    Ledger,
    OpKey,
    Quarantined,
    QuarantineEntry,
    QuarantineRequest,
    Record,
    State,
    Transaction,
    TransactionalLedger,
)
from replaysafe.ledger.memory import MemoryLedger
from replaysafe.ledger.sqlite import SQLiteLedger

__all__ = [
    "Acquired",
    "AlreadyDone",
    "Claim",
    "ClaimOutcome",
    "ClaimRequest",
    "Conflict",
    "InFlight",
    "Ledger",
    "MemoryLedger",
    "OpKey",
    "QuarantineEntry",
    "QuarantineRequest",
    "Quarantined",
    "Record",
    "SQLiteLedger",
    "State",
    "Transaction",
    "TransactionalLedger",
]
