"""The public API is curated: ``__all__`` is exactly what we mean to support."""

from __future__ import annotations

import subprocess
import sys

import replaysafe
from replaysafe import errors

from .conftest import subprocess_env

EXPECTED = {
    # model
    "Envelope", "Limits", "operation_id", "fingerprint", "canonical_json",
    "Guarantee", "Boundary", "Effect", "QuarantineReason", "EffectRisk",
    # app and runtime
    "App", "Context", "HandlerSpec", "RetryPolicy", "Worker", "Producer", "Failpoints",
    "Clock", "SystemClock", "Middleware",
    # the guard: the pipeline inside a consumer you already run
    "Guard", "Message", "Outcome",
    # ledger
    "Ledger", "TransactionalLedger", "Transaction", "MemoryLedger", "SQLiteLedger", "OpKey",
    "Record", "State", "Claim", "Acquired", "InFlight", "AlreadyDone", "Conflict", "Quarantined",
    # brokers
    "Broker", "Publisher", "Subscriber", "Subscription", "Delivery", "Capabilities",
    "RedeliveryKind", "SettleGranularity", "MemoryBroker",
    # backends with a driver (loaded on first access), outbox
    "RabbitMQBroker", "SQSBroker", "KafkaBroker", "PostgresLedger", "RedisLedger",
    "SQLiteOutboxStore", "PostgresOutboxStore", "Relay",
    # topology (what a producer publishes to before any worker ran)
    "declare_topology", "show_topology", "HandlerTopology",
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


#: driver packages, and the modules of the backends that import them
DRIVERS = ("aio_pika", "aiormq", "psycopg", "psycopg_pool", "redis", "confluent_kafka",
           "aiobotocore", "botocore")  # fmt: skip
LAZY = {
    "RabbitMQBroker": "replaysafe.brokers.rabbitmq",
    "SQSBroker": "replaysafe.brokers.sqs",
    "KafkaBroker": "replaysafe.brokers.kafka",
    "PostgresLedger": "replaysafe.ledger.postgres",
    "RedisLedger": "replaysafe.ledger.redis",
}


def test_import_replaysafe_imports_no_driver() -> None:
    """``import replaysafe`` stays light: the backends' drivers (and the backend modules) load
    when a backend is first used, so an install without an extra can import the package."""
    code = (
        "import sys, replaysafe\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {DRIVERS!r}"
        f" or m in {sorted(LAZY.values())!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout


def test_backends_resolve_from_the_package() -> None:
    import importlib

    for name, module in LAZY.items():
        assert getattr(replaysafe, name) is getattr(importlib.import_module(module), name)
        assert name in dir(replaysafe)
    from replaysafe.outbox import PostgresOutboxStore, Relay, SQLiteOutboxStore

    assert (replaysafe.Relay, replaysafe.SQLiteOutboxStore, replaysafe.PostgresOutboxStore) == (
        Relay, SQLiteOutboxStore, PostgresOutboxStore,
    )  # fmt: skip
    try:
        replaysafe.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


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
