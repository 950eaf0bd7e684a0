"""Conformance suites shipped with the package; each backend's tests subclass them.

A backend is supported when it passes its contract. Skips come from the backend's declared
capabilities, never from ad-hoc flags.
"""

from replaysafe.testing.contracts.broker import BrokerContract
from replaysafe.testing.contracts.ledger import LedgerContract, TransactionalLedgerContract
from replaysafe.testing.contracts.outbox import OutboxStoreContract

__all__ = [
    "BrokerContract",
    "LedgerContract",
    "OutboxStoreContract",
    "TransactionalLedgerContract",
]
