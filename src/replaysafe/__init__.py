"""replaysafe: business-level exactly-once effects on top of at-least-once brokers.

The public API is what ``__all__`` lists; everything else is private and may change.

The backends that need a driver (``RabbitMQBroker``, ``SQSBroker``, ``KafkaBroker``,
``PostgresLedger``, ``RedisLedger``, the outbox stores and ``Relay``) are importable from here but
loaded on first use (module ``__getattr__``): ``import replaysafe`` imports no driver, and each
backend names its extra when its driver is missing.
"""

import importlib
from typing import TYPE_CHECKING, Any

from replaysafe.app import App, Context, HandlerSpec, Middleware, RetryPolicy
from replaysafe.brokers import (
    Broker,
    Capabilities,
    Delivery,
    MemoryBroker,
    Publisher,
    RedeliveryKind,
    SettleGranularity,
    Subscriber,
    Subscription,
)
from replaysafe.clock import Clock, SystemClock
from replaysafe.envelope import Envelope, Limits, canonical_json, fingerprint, operation_id
from replaysafe.errors import (
    BadInput,
    BrokerError,
    BrokerUnavailable,
    CapabilityError,
    ConfigurationError,
    EffectNotApplied,
    FingerprintMismatch,
    InvalidOperationId,
    LeaseLost,
    LedgerError,
    LedgerUnavailable,
    LimitExceeded,
    MalformedHeader,
    MalformedPayload,
    MissingExtra,
    OutcomeUnknown,
    PayloadTooLarge,
    PublishAmbiguous,
    ReplaysafeError,
    SimulatedCrash,
    UnsupportedContentType,
)
from replaysafe.failpoints import Failpoints
from replaysafe.guarantees import Boundary, Effect, Guarantee
from replaysafe.guard import Guard, Message, Outcome
from replaysafe.ledger import (
    Acquired,
    AlreadyDone,
    Claim,
    Conflict,
    InFlight,
    Ledger,
    MemoryLedger,
    OpKey,
    Quarantined,
    Record,
    SQLiteLedger,
    State,
    Transaction,
    TransactionalLedger,
)
from replaysafe.producer import Producer
from replaysafe.quarantine import EffectRisk, QuarantineReason
from replaysafe.runtime import Worker
from replaysafe.topology import HandlerTopology, declare_topology, show_topology

if TYPE_CHECKING:
    from replaysafe.brokers.kafka import KafkaBroker
    from replaysafe.brokers.rabbitmq import RabbitMQBroker
    from replaysafe.brokers.sqs import SQSBroker
    from replaysafe.ledger.postgres import PostgresLedger
    from replaysafe.ledger.redis import RedisLedger
    from replaysafe.outbox import PostgresOutboxStore, Relay, SQLiteOutboxStore

#: public name -> the module that defines it, imported on first access
_LAZY = {
    "KafkaBroker": "replaysafe.brokers.kafka",
    "PostgresLedger": "replaysafe.ledger.postgres",
    "PostgresOutboxStore": "replaysafe.outbox",
    "RabbitMQBroker": "replaysafe.brokers.rabbitmq",
    "RedisLedger": "replaysafe.ledger.redis",
    "Relay": "replaysafe.outbox",
    "SQLiteOutboxStore": "replaysafe.outbox",
    "SQSBroker": "replaysafe.brokers.sqs",
}


def __getattr__(name: str) -> Any:
    """A backend class from :data:`_LAZY`, imported now and cached in the module."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'replaysafe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "Acquired",
    "AlreadyDone",
    "App",
    "BadInput",
    "Boundary",
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Capabilities",
    "CapabilityError",
    "Claim",
    "Clock",
    "ConfigurationError",
    "Conflict",
    "Context",
    "Delivery",
    "Effect",
    "EffectNotApplied",
    "EffectRisk",
    "Envelope",
    "Failpoints",
    "FingerprintMismatch",
    "Guarantee",
    "Guard",
    "HandlerSpec",
    "HandlerTopology",
    "InFlight",
    "InvalidOperationId",
    "KafkaBroker",
    "LeaseLost",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "LimitExceeded",
    "Limits",
    "MalformedHeader",
    "MalformedPayload",
    "MemoryBroker",
    "MemoryLedger",
    "Message",
    "Middleware",
    "MissingExtra",
    "OpKey",
    "Outcome",
    "OutcomeUnknown",
    "PayloadTooLarge",
    "PostgresLedger",
    "PostgresOutboxStore",
    "Producer",
    "PublishAmbiguous",
    "Publisher",
    "QuarantineReason",
    "Quarantined",
    "RabbitMQBroker",
    "Record",
    "RedeliveryKind",
    "RedisLedger",
    "Relay",
    "ReplaysafeError",
    "RetryPolicy",
    "SQLiteLedger",
    "SQLiteOutboxStore",
    "SQSBroker",
    "SettleGranularity",
    "SimulatedCrash",
    "State",
    "Subscriber",
    "Subscription",
    "SystemClock",
    "Transaction",
    "TransactionalLedger",
    "UnsupportedContentType",
    "Worker",
    "canonical_json",
    "declare_topology",
    "fingerprint",
    "operation_id",
    "show_topology",
]
