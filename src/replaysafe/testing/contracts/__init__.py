"""Conformance suites shipped with the package; each backend's tests subclass them.

A backend is supported when it passes its contract. Skips come from the backend's declared
capabilities, never from ad-hoc flags.
"""

from replaysafe.testing.contracts.admin import LedgerAdminContract
from replaysafe.testing.contracts.broker import BrokerContract
from replaysafe.testing.contracts.controls import HandlerControlsContract
from replaysafe.testing.contracts.ledger import LedgerBackendContract, LedgerContract
from replaysafe.testing.contracts.outbox import OutboxStoreContract
from replaysafe.testing.contracts.quarantine import QuarantineStoreContract
from replaysafe.testing.contracts.transactional import TransactionalLedgerContract

__all__ = [
    "BrokerContract",
    "HandlerControlsContract",
    "LedgerAdminContract",
    "LedgerBackendContract",
    "LedgerContract",
    "OutboxStoreContract",
    "QuarantineStoreContract",
    "TransactionalLedgerContract",
]
