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


@pytest.mark.parametrize("spec", ["sqlite:", "mssql://root:hunter2@db/x", "nonsense"])
def test_unknown_ledgers_are_refused_without_secrets(spec: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        ledger_from_url(spec)
    assert "hunter2" not in str(err.value)


def test_brokers_from_urls() -> None:
    assert isinstance(broker_from_url("memory"), MemoryBroker)
    # nats:// is a known scheme since the NATS adapter: an unknown one is refused, no secret shown
    with pytest.raises(ConfigurationError) as err:
        broker_from_url("mqtt://app:hunter2@127.0.0.1:1883")
    assert "hunter2" not in str(err.value)
    from replaysafe.brokers.nats import NATSBroker

    nats = broker_from_url("nats://app:hunter2@127.0.0.1:4222")
    assert isinstance(nats, NATSBroker) and "hunter2" not in repr(nats)


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


def test_ledger_urls_carry_the_ledgers_own_options() -> None:
    """``?schema=…`` / ``?prefix=…`` are the ledger's, taken out before the driver sees the URL;
    the driver's own parameters stay; keyword options win (issue 15: one grammar)."""
    from replaysafe.ledger.postgres import PostgresLedger
    from replaysafe.ledger.redis import RedisLedger

    pg = ledger_from_url(
        "postgresql://app:hunter2@127.0.0.1:5432/test?application_name=x&schema=s1"
        "&auto_migrate=yes&max_size=4&acquire_timeout=2.5",
        max_size=3,
    )
    assert isinstance(pg, PostgresLedger)
    assert (pg._schema, pg._auto_migrate, pg._max_size) == ("s1", True, 3)
    assert pg._dsn == "postgresql://app:hunter2@127.0.0.1:5432/test?application_name=x"
    rd = ledger_from_url("redis://:hunter2@127.0.0.1:6379/0?client_name=c&prefix=p:&retention=60")
    assert isinstance(rd, RedisLedger)
    assert (rd._prefix, rd._url) == ("p:", "redis://:hunter2@127.0.0.1:6379/0?client_name=c")
    assert rd._codec.retention == 60.0


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:hunter2@db/test?auto_migrate=maybe",
        "postgresql://app:hunter2@db/test?max_size=four",
        "postgresql://app:hunter2@db/test?schema=a&schema=b",
        "redis://:hunter2@db:6379/0?retention=soon",
    ],
)
def test_bad_ledger_url_options_are_refused_without_secrets(url: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        ledger_from_url(url)
    assert "hunter2" not in str(err.value) and "URL" in str(err.value)


async def test_a_postgres_ledger_opened_from_its_url_works() -> None:
    """The options in the URL reach a real ledger: its own schema, migrated on open."""
    import uuid

    from replaysafe.ledger.base import Acquired, OpKey

    schema = f"url_{uuid.uuid4().hex[:8]}"
    led = ledger_from_url(
        f"postgresql://postgres@127.0.0.1:5432/test?schema={schema}&auto_migrate=1&max_size=2"
    )
    try:
        out = await led.claim(OpKey("s", "op-1"), "fp", "me", 5.0)
        assert isinstance(out, Acquired)
        await led.complete(out.claim, None)
        assert led.schema == schema  # type: ignore[attr-defined]
    finally:
        import psycopg

        await led.close()
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_the_drivers_query_parameters_pass_through_byte_for_byte() -> None:
    """Taking the ledger's options out must not re-encode the driver's: libpq reads %20 as a
    space but "+" as a plus, so ``options=-c%20statement_timeout%3D5000`` must stay as it is."""
    from replaysafe.ledger.postgres import PostgresLedger

    raw = "postgresql://app@db/x?options=-c%20statement_timeout%3D5000&schema=s1&sslmode=require"
    pg = ledger_from_url(raw)
    assert isinstance(pg, PostgresLedger) and pg._schema == "s1"
    assert pg._dsn == "postgresql://app@db/x?options=-c%20statement_timeout%3D5000&sslmode=require"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqs+http://k:hunter2@h:1?bogus=1", "bogus"),
        ("sqs+http://k:hunter2@h:1?wait_time=1&wait_time=2", "twice"),
        ("sqs+http://k:hunter2@h:1?wait_time=soon", "wait_time"),
    ],
)
def test_sqs_url_parameters_are_checked(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        broker_from_url(url)
    assert says in str(err.value) and "hunter2" not in str(err.value)
