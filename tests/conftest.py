"""Real services for integration tests, in one place.

PostgreSQL (5432), Redis (6379), RabbitMQ (5672) and NATS (4222, JetStream) run on the machine
already; moto (SQS) and Tansu (Kafka) are started here on free loopback ports and stopped after the
session. With
``CI=true`` a missing service FAILS the test instead of skipping it: CI must never pass by not
testing. Each test run isolates itself (its own schema, key prefix, queue or topic names).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from replaysafe.testing.servers import (  # noqa: F401 - free_port is used by the tests
    ServerUnavailable,
    free_port,
    local_kafka,
    local_sqs,
    port_open,
)

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
#: the checkout under test (its src/ holds the package, its root the ``tests`` package)
ROOT = Path(__file__).resolve().parent.parent

PG_DSN = os.environ.get("REPLAYSAFE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("REPLAYSAFE_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("REPLAYSAFE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("REPLAYSAFE_TEST_NATS", "nats://127.0.0.1:4222")


def unavailable(service: str, why: str) -> None:
    """Skip locally, fail in CI: a missing service must never turn a CI run green."""
    msg = f"{service} is not available: {why}"
    if CI:
        pytest.fail(msg + " (CI=true: a missing service fails the run)", pytrace=False)
    pytest.skip(msg)


def subprocess_env(base: Mapping[str, str] | None = None, /, **extra: str) -> dict[str, str]:
    """The environment for a Python subprocess of ours (the CLI, an example, a test app, ``-c``
    code that imports replaysafe): ``base`` (default: this process's environment) plus
    ``extra``, with this checkout's ``src/`` and root first on ``PYTHONPATH``, so that the
    child imports the replaysafe under test (and ``tests.apps``), never a copy the interpreter
    has installed from another checkout. A ``PYTHONPATH`` in ``extra`` comes next, then the
    one of ``base``."""
    env = dict(os.environ if base is None else base)
    path = [str(ROOT / "src"), str(ROOT)]
    for more in (extra.pop("PYTHONPATH", ""), env.get("PYTHONPATH", "")):
        path += [p for p in more.split(os.pathsep) if p]
    return {**env, **extra, "PYTHONPATH": os.pathsep.join(path)}


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """DSN of the local PostgreSQL (database ``test``)."""
    try:
        import psycopg
    except ImportError:
        unavailable("PostgreSQL", "psycopg is not installed (pip install 'replaysafe[postgres]')")
    try:
        with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        unavailable("PostgreSQL", f"{type(exc).__name__}: {exc}")
    return PG_DSN


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A fresh schema name for one test; dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"rs_test_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        import redis
    except ImportError:
        unavailable("Redis", "redis-py is not installed (pip install 'replaysafe[redis]')")
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        client.ping()
        client.close()
    except Exception as exc:
        unavailable("Redis", f"{type(exc).__name__}: {exc}")
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix for one test; its keys are deleted afterwards."""
    import redis

    prefix = f"rs-test:{uuid.uuid4().hex[:10]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    if not port_open("127.0.0.1", 5672):
        unavailable(
            "RabbitMQ", "nothing listens on 127.0.0.1:5672 (start: rabbitmq-server -detached)"
        )
    return AMQP_URL


@pytest.fixture(scope="session")
def nats_url() -> str:
    """The local NATS server (JetStream enabled)."""
    if not port_open("127.0.0.1", 4222):
        unavailable("NATS", "nothing listens on 127.0.0.1:4222 (start: nats-server -js)")
    return NATS_URL


@pytest.fixture(scope="session")
def sqs_endpoint() -> Iterator[str]:
    """A moto server (SQS) on a free loopback port for this test session."""
    try:
        with local_sqs() as endpoint:
            yield endpoint
    except ServerUnavailable as exc:
        unavailable("SQS (moto)", str(exc))


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A Tansu broker (Kafka protocol, memory storage) on a free loopback port."""
    try:
        with local_kafka() as bootstrap:
            yield bootstrap
    except ServerUnavailable as exc:
        unavailable("Kafka (Tansu)", str(exc))
