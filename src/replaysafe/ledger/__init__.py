"""Replay ledgers. Backends other than memory and SQLite import their drivers lazily."""

from replaysafe._registry import open_ledger
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
    "open_ledger",
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


#: the name this function had before the registry; the same function
ledger_from_url = open_ledger
