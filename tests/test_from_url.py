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


# One URL, one meaning: broker_from_url picks the adapter, the adapter's from_url parses (issue 15).


def _sqs(url: str) -> tuple[str | None, str | None, int]:
    from replaysafe.brokers.sqs import SQSBroker

    seen = set()
    for b in (broker_from_url(url), SQSBroker.from_url(url)):
        assert isinstance(b, SQSBroker)
        seen.add((b._endpoint, b._region, b._wait_time))
    assert len(seen) == 1, seen  # both entry points read the URL alike
    return seen.pop()


@pytest.mark.parametrize(
    ("url", "endpoint", "region", "wait"),
    [
        ("sqs://eu-west-1", None, "eu-west-1", 20),  # a region, never a host
        ("sqs://?region=eu-west-1", None, "eu-west-1", 20),
        ("sqs://", None, None, 20),
        ("sqs://sqs.eu-west-1.amazonaws.com", "https://sqs.eu-west-1.amazonaws.com", None, 20),
        ("sqs+http://127.0.0.1:4566/eu-west-1", "http://127.0.0.1:4566", "eu-west-1", 20),
        ("sqs+http://127.0.0.1:4566?region=eu-west-1&wait_time=5", "http://127.0.0.1:4566",
         "eu-west-1", 5),  # the query is honoured, not dropped
        ("sqs+http://k:hunter2@127.0.0.1:4566", "http://127.0.0.1:4566", "us-east-1", 20),
    ],
)  # fmt: skip
def test_sqs_urls_mean_one_thing(url: str, endpoint: str | None, region: str | None,
                                 wait: int) -> None:  # fmt: skip
    assert _sqs(url) == (endpoint, region, wait)


@pytest.mark.parametrize(
    "url", ["sqs+http://127.0.0.1:4566/eu-west-1?region=us-east-1", "sqs+http://h:1/a/b"]
)
def test_sqs_url_ambiguities_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        broker_from_url(url)


def test_kafka_urls_mean_one_thing() -> None:
    from replaysafe.brokers.kafka import KafkaBroker

    for url, protocol in [
        ("kafka://h:9092", "PLAINTEXT"),
        ("kafka+ssl://h:9093", "SSL"),
        ("kafka+ssl://u:hunter2@h:9093", "SASL_SSL"),  # was "unknown broker" here
    ]:
        a, b = broker_from_url(url), KafkaBroker.from_url(url)
        assert isinstance(a, KafkaBroker)
        assert a._common["security.protocol"] == b._common["security.protocol"] == protocol
        assert "hunter2" not in repr(a)
