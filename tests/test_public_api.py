"""The public API is curated: ``__all__`` is exactly what we mean to support."""

from __future__ import annotations

import replaysafe
from replaysafe import errors

EXPECTED = {
    # model
    "Envelope", "Limits", "operation_id", "fingerprint", "canonical_json",
    "Guarantee", "Boundary", "Effect", "QuarantineReason", "EffectRisk",
    # app and runtime
    "App", "Context", "HandlerSpec", "RetryPolicy", "Worker", "Producer", "Failpoints",
    "Clock", "SystemClock",
    # ledger
    "Ledger", "TransactionalLedger", "Transaction", "MemoryLedger", "SQLiteLedger", "OpKey",
    "Record", "State", "Claim", "Acquired", "InFlight", "AlreadyDone", "Conflict", "Quarantined",
    # brokers
    "Broker", "Publisher", "Subscriber", "Subscription", "Delivery", "Capabilities",
    "RedeliveryKind", "SettleGranularity", "MemoryBroker",
    # errors
    "ReplaysafeError", "ConfigurationError", "CapabilityError", "MissingExtra", "BadInput",
    "InvalidOperationId", "PayloadTooLarge", "MalformedPayload", "MalformedHeader",
    "UnsupportedContentType", "LimitExceeded", "FingerprintMismatch", "LedgerError", "LeaseLost",
    "LedgerUnavailable", "BrokerError", "PublishAmbiguous", "BrokerUnavailable", "SimulatedCrash",
    "OutcomeUnknown", "EffectNotApplied",
}  # fmt: skip


def test_all_is_curated_and_importable() -> None:
    assert set(replaysafe.__all__) == EXPECTED
    assert sorted(replaysafe.__all__) == replaysafe.__all__
    for name in replaysafe.__all__:
        assert getattr(replaysafe, name) is not None


def test_one_exception_tree() -> None:
    for name in dir(errors):
        obj = getattr(errors, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, BaseException)
            and obj.__module__ == errors.__name__
        ):
            if obj is errors.SimulatedCrash:
                # a simulated process death must not be catchable as an ordinary error
                assert not issubclass(obj, Exception)
            else:
                assert issubclass(obj, errors.ReplaysafeError), name


def test_bad_input_errors_carry_a_quarantine_reason() -> None:
    for cls in errors.BadInput.__subclasses__():
        assert cls("x").reason.value, cls
