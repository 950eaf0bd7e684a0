"""replaysafe: business-level exactly-once effects on top of at-least-once brokers.

The public API is what ``__all__`` lists, the names a user of the library writes; everything else
is private and may change. It is, by what it is for:

- the message: ``Envelope``, ``Limits``, ``operation_id``, ``fingerprint``;
- the promise: ``Guarantee``, ``Effect``, ``QuarantineReason``, ``EffectRisk``;
- an app and its workers: ``App``, ``Context``, ``RetryPolicy``, ``Middleware``, ``Worker``,
  ``Producer``;
- the guard inside a consumer you already run: ``Guard``, ``Message``, ``Outcome``;
- backends by URL (docs/urls.md) and the outbox relay: ``open_broker``, ``open_ledger``,
  ``open_outbox``, ``Relay``;
- topology: ``declare_topology``, ``show_topology``;
- the errors to catch: ``ReplaysafeError``, ``ConfigurationError``, ``CapabilityError``,
  ``MissingExtra``, ``BadInput``, ``LeaseLost``, ``LedgerUnavailable``, ``BrokerError``,
  ``BrokerUnavailable``, ``PublishAmbiguous``, ``OutcomeUnknown``, ``EffectNotApplied``.

The backends themselves live with their kind (``replaysafe.brokers.MemoryBroker``,
``replaysafe.brokers.kafka.KafkaBroker``, ``replaysafe.ledger.SQLiteLedger``,
``replaysafe.ledger.postgres.PostgresLedger``, ``replaysafe.outbox.SQLiteOutboxStore``…), and so
do the types a backend author implements (``replaysafe.brokers``: ``Broker``, ``Delivery``…;
``replaysafe.ledger``: ``Ledger``, ``Claim``, ``Record``…), the finer errors
(``replaysafe.errors``) and the test rig (``replaysafe.testing``, ``replaysafe.failpoints``).
The names that used to be importable from here still are, with a ``DeprecationWarning`` that
says where they live now. ``import replaysafe`` imports no driver: ``Relay`` and the moved
backends load on first use.
"""

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from replaysafe._registry import open_broker, open_ledger, open_outbox
from replaysafe.app import App, Context, Middleware, RetryPolicy
from replaysafe.envelope import Envelope, Limits, fingerprint, operation_id
from replaysafe.errors import (
    BadInput,
    BrokerError,
    BrokerUnavailable,
    CapabilityError,
    ConfigurationError,
    EffectNotApplied,
    LeaseLost,
    LedgerUnavailable,
    MissingExtra,
    OutcomeUnknown,
    PublishAmbiguous,
    ReplaysafeError,
)
from replaysafe.guarantees import Effect, Guarantee
from replaysafe.guard import Guard, Message, Outcome
from replaysafe.producer import Producer
from replaysafe.quarantine import EffectRisk, QuarantineReason
from replaysafe.runtime import Worker
from replaysafe.topology import declare_topology, show_topology

if TYPE_CHECKING:
    from replaysafe.outbox import Relay

#: public name -> its module, imported on first access (its module imports a driver's package)
_LAZY = {"Relay": "replaysafe.outbox"}

#: names this module exported before the API was curated -> where they live now
_MOVED = {
    **dict.fromkeys(
        ("Broker", "Publisher", "Subscriber", "Subscription", "Delivery", "Capabilities",
         "RedeliveryKind", "SettleGranularity", "MemoryBroker"),
        "replaysafe.brokers",
    ),
    "RabbitMQBroker": "replaysafe.brokers.rabbitmq",
    "SQSBroker": "replaysafe.brokers.sqs",
    "KafkaBroker": "replaysafe.brokers.kafka",
    **dict.fromkeys(
        ("Ledger", "TransactionalLedger", "Transaction", "OpKey", "Record", "State", "Claim",
         "Acquired", "InFlight", "AlreadyDone", "Conflict", "Quarantined", "MemoryLedger",
         "SQLiteLedger"),
        "replaysafe.ledger",
    ),
    "PostgresLedger": "replaysafe.ledger.postgres",
    "RedisLedger": "replaysafe.ledger.redis",
    "SQLiteOutboxStore": "replaysafe.outbox",
    "PostgresOutboxStore": "replaysafe.outbox",
    **dict.fromkeys(
        ("SimulatedCrash", "FingerprintMismatch", "InvalidOperationId", "PayloadTooLarge",
         "MalformedPayload", "MalformedHeader", "UnsupportedContentType", "LimitExceeded",
         "LedgerError"),
        "replaysafe.errors",
    ),
    "Failpoints": "replaysafe.failpoints",
    "Clock": "replaysafe.clock",
    "SystemClock": "replaysafe.clock",
    "Boundary": "replaysafe.guarantees",
    "canonical_json": "replaysafe.envelope",
    "HandlerSpec": "replaysafe.app",
    "HandlerTopology": "replaysafe.topology",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    """``Relay``, imported now and cached; a moved name, from its module, with a warning."""
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'replaysafe' has no attribute {name!r}")
    warnings.warn(
        f"replaysafe.{name} lives in {module} now: write `from {module} import {name}` "
        "(the top-level name will be removed)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "App",
    "BadInput",
    "BrokerError",
    "BrokerUnavailable",
    "CapabilityError",
    "ConfigurationError",
    "Context",
    "Effect",
    "EffectNotApplied",
    "EffectRisk",
    "Envelope",
    "Guarantee",
    "Guard",
    "LeaseLost",
    "LedgerUnavailable",
    "Limits",
    "Message",
    "Middleware",
    "MissingExtra",
    "Outcome",
    "OutcomeUnknown",
    "Producer",
    "PublishAmbiguous",
    "QuarantineReason",
    "Relay",
    "ReplaysafeError",
    "RetryPolicy",
    "Worker",
    "declare_topology",
    "fingerprint",
    "open_broker",
    "open_ledger",
    "open_outbox",
    "operation_id",
    "show_topology",
]
