"""replaysafe: business-level exactly-once effects on top of at-least-once brokers.

The public API is what ``__all__`` lists; everything else is private and may change.
"""

from replaysafe.app import App, Context, HandlerSpec, RetryPolicy
from replaysafe.brokers.base import (
    Broker,
    Capabilities,
    Delivery,
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
    FingerprintMismatch,
    InvalidOperationId,
    LeaseLost,
    LedgerError,
    LedgerUnavailable,
    LimitExceeded,
    MalformedHeader,
    MalformedPayload,
    MissingExtra,
    PayloadTooLarge,
    PublishAmbiguous,
    ReplaysafeError,
    SimulatedCrash,
    UnsupportedContentType,
)
from replaysafe.failpoints import Failpoints
from replaysafe.guarantees import Boundary, Effect, Guarantee
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
    State,
    Transaction,
    TransactionalLedger,
)
from replaysafe.producer import Producer
from replaysafe.quarantine import EffectRisk, QuarantineReason
from replaysafe.runtime import Worker

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
    "EffectRisk",
    "Envelope",
    "Failpoints",
    "FingerprintMismatch",
    "Guarantee",
    "HandlerSpec",
    "InFlight",
    "InvalidOperationId",
    "LeaseLost",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "LimitExceeded",
    "Limits",
    "MalformedHeader",
    "MalformedPayload",
    "MemoryLedger",
    "MissingExtra",
    "OpKey",
    "PayloadTooLarge",
    "Producer",
    "PublishAmbiguous",
    "Publisher",
    "QuarantineReason",
    "Quarantined",
    "Record",
    "RedeliveryKind",
    "ReplaysafeError",
    "RetryPolicy",
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
    "fingerprint",
    "operation_id",
]
