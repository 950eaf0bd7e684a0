"""Replay ledgers. Backends other than memory and SQLite import their drivers lazily."""

from replaysafe.ledger.base import (
    AlreadyDone,
    Acquired,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    Conflict,
    InFlight,
    Ledger,
    OpKey,
    QuarantineEntry,
    QuarantineRequest,
    Quarantined,
    Record,
    State,
    Transaction,
    TransactionalLedger,
)
from replaysafe.ledger.memory import MemoryLedger

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
    "State",
    "Transaction",
    "TransactionalLedger",
]
