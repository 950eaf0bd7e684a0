"""The public API is curated: ``__all__`` is exactly what we mean to support."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

import replaysafe
from replaysafe import errors

from .conftest import subprocess_env


def _documented() -> set[str]:
    """The names the package docstring lists as the API (``name``, in its bullet list): the one
    list of the public API, so the docstring and ``__all__`` cannot drift apart."""
    doc = replaysafe.__doc__ or ""
    listed = doc[doc.index("by what it is for:") : doc.index("The backends themselves")]
    return set(re.findall(r"``([A-Za-z_]+)``", listed))


def test_all_is_curated_and_importable() -> None:
    expected = _documented()
    assert 25 <= len(expected) <= 40, sorted(expected)  # a user's API, not every type we have
    assert set(replaysafe.__all__) == expected
    assert sorted(replaysafe.__all__) == replaysafe.__all__
    for name in replaysafe.__all__:
        assert getattr(replaysafe, name) is not None


def test_backend_author_types_live_with_their_kind() -> None:
    """What a backend author implements is exported by its layer, not by the package."""
    import replaysafe.brokers
    import replaysafe.ledger

    for module, names in ((replaysafe.brokers, ("Broker", "Delivery", "Subscription",
                                               "Capabilities", "SettleOnce")),
                          (replaysafe.ledger, ("Ledger", "LedgerBackend", "QuarantineStore",
                                              "HandlerControls", "LedgerAdmin", "Claim",
                                              "Record"))):  # fmt: skip
        for name in names:
            assert getattr(module, name) is not None, (module.__name__, name)
            assert name not in replaysafe.__all__


def test_a_moved_name_still_imports_and_says_where_it_lives() -> None:
    from replaysafe.ledger import SQLiteLedger

    with pytest.warns(DeprecationWarning, match=r"from replaysafe\.ledger import SQLiteLedger"):
        assert replaysafe.SQLiteLedger is SQLiteLedger  # type: ignore[attr-defined]
    for name, module in replaysafe._MOVED.items():
        with pytest.warns(DeprecationWarning):
            value = getattr(replaysafe, name)
        assert value is getattr(importlib.import_module(module), name), name


#: driver packages, and the modules of the backends that import them
DRIVERS = ("aio_pika", "aiormq", "psycopg", "psycopg_pool", "redis", "confluent_kafka",
           "aiobotocore", "botocore", "nats", "asyncmy")  # fmt: skip
LAZY = {
    "RabbitMQBroker": "replaysafe.brokers.rabbitmq",
    "SQSBroker": "replaysafe.brokers.sqs",
    "KafkaBroker": "replaysafe.brokers.kafka",
    "PostgresLedger": "replaysafe.ledger.postgres",
    "RedisLedger": "replaysafe.ledger.redis",
    "NATSBroker": "replaysafe.brokers.nats",
    "MySQLLedger": "replaysafe.stores.mysql",
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


def test_relay_resolves_from_the_package() -> None:
    from replaysafe.outbox import Relay

    assert replaysafe.Relay is Relay
    assert "Relay" in dir(replaysafe)
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
