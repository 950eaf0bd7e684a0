"""One place turns a string into a backend, and it never echoes a password."""

from __future__ import annotations

import pytest

from replaysafe import ConfigurationError, MemoryBroker, MemoryLedger, SQLiteLedger
from replaysafe.brokers import broker_from_url
from replaysafe.ledger import ledger_from_url


def test_ledgers_from_urls(tmp_path: object) -> None:
    assert isinstance(ledger_from_url("memory"), MemoryLedger)
    assert isinstance(ledger_from_url(f"sqlite:{tmp_path}/l.db"), SQLiteLedger)
    from replaysafe.ledger.postgres import PostgresLedger
    from replaysafe.ledger.redis import RedisLedger

    pg = ledger_from_url("postgresql://app:hunter2@127.0.0.1:5432/test")
    assert isinstance(pg, PostgresLedger) and "hunter2" not in repr(pg)
    rd = ledger_from_url("redis://:hunter2@127.0.0.1:6379/0")
    assert isinstance(rd, RedisLedger) and "hunter2" not in repr(rd)


@pytest.mark.parametrize("spec", ["sqlite:", "mysql://root:hunter2@db/x", "nonsense"])
def test_unknown_ledgers_are_refused_without_secrets(spec: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        ledger_from_url(spec)
    assert "hunter2" not in str(err.value)


def test_brokers_from_urls() -> None:
    assert isinstance(broker_from_url("memory"), MemoryBroker)
    with pytest.raises(ConfigurationError) as err:
        broker_from_url("nats://app:hunter2@127.0.0.1:4222")
    assert "hunter2" not in str(err.value)
