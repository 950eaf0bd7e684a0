"""The registry: one table from a URL's scheme to the backend that parses it (open_broker,
open_ledger, open_outbox)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from replaysafe._registry import BACKENDS, backend_for, open_ledger, open_outbox, scheme_of
from replaysafe.brokers import broker_from_url, open_broker
from replaysafe.errors import ConfigurationError
from replaysafe.ledger import ledger_from_url
from replaysafe.ledger.durability import DurabilityLevel
from replaysafe.ledger.sqlite import SQLiteLedger
from replaysafe.outbox.postgres import PostgresOutboxStore
from replaysafe.outbox.sqlite import SQLiteOutboxStore


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("memory", "memory"),
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp"),
        ("SQS+HTTP://127.0.0.1:4566", "sqs+http"),
        ("sqlite:/tmp/ledger.db", "sqlite"),
        ("sqlite:relative.db", "sqlite"),
        ("sqlite:///tmp/ledger.db", "sqlite"),
        ("host=db dbname=orders user=app", "postgresql"),
        ("dbname=orders", "postgresql"),
        ("postgres://u@h/db", "postgres"),
        ("/just/a/path", ""),
        ("sqlite", ""),  # a bare word is a scheme only where a backend says so ("memory")
        ("postgres", ""),
        ("", ""),
    ],
)
def test_scheme_of_reads_every_form_the_grammar_has(url: str, scheme: str) -> None:
    assert scheme_of(url) == scheme


def test_every_backend_names_a_module_and_callable_that_exist() -> None:
    """A row of the table that names nothing would only fail when a user opens that URL."""
    seen: set[tuple[str, str]] = set()
    for backend in BACKENDS:
        for scheme in backend.schemes:
            assert (backend.kind, scheme) not in seen, f"{scheme} named twice for {backend.kind}"
            seen.add((backend.kind, scheme))
        module, _, path = backend.opener.partition(":")
        target: object = importlib.import_module(module)  # drivers import lazily: always works
        for name in path.split("."):
            target = getattr(target, name)
        assert callable(target), backend


def test_an_unknown_url_lists_the_shapes_and_never_shows_the_password() -> None:
    with pytest.raises(ConfigurationError) as err:
        open_broker("nats2://admin:s3cret@10.0.0.1:4222")
    text = str(err.value)
    assert "s3cret" not in text and "***" in text
    assert "amqp://" in text and "kafka://" in text  # what to use instead
    with pytest.raises(ConfigurationError, match="unknown ledger URL"):
        open_ledger("mssql://sa:pw@db/x")
    with pytest.raises(ConfigurationError, match="unknown outbox URL"):
        open_outbox("redis://127.0.0.1:6379/0")  # a ledger, but no outbox lives there


def test_the_old_names_are_the_registry() -> None:
    assert broker_from_url is open_broker
    assert ledger_from_url is open_ledger
    assert backend_for("ledger", "host=db dbname=orders").extra == "postgres"


async def test_sqlite_ledger_url_carries_its_options_and_refuses_unknown_ones(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.db"
    ledger = open_ledger(f"sqlite:{path}?synchronous=NORMAL&busy_timeout=2.5")
    try:
        assert isinstance(ledger, SQLiteLedger)
        assert ledger.path == str(path)
        # read back from the live file: the URL's synchronous=NORMAL reached SQLite
        assert (await ledger.durability()).level is DurabilityLevel.LOSES_RECENT
    finally:
        await ledger.close()
    # keywords win over the URL
    other = SQLiteLedger.from_url(f"sqlite:{path}?synchronous=NORMAL", synchronous="FULL")
    try:
        assert (await other.durability()).level is DurabilityLevel.DURABLE
    finally:
        await other.close()
    with pytest.raises(ConfigurationError, match="unknown parameter"):
        open_ledger(f"sqlite:{path}?journal=off")
    with pytest.raises(ConfigurationError, match="needs the path"):
        open_ledger("sqlite:")
    with pytest.raises(ConfigurationError, match="unknown ledger URL"):
        open_ledger("sqlite")  # not a file named "sqlite" in the working directory
    with pytest.raises(ConfigurationError, match="not a SQLite ledger URL"):
        SQLiteLedger.from_url(str(path))
    with pytest.raises(ConfigurationError, match="busy_timeout"):
        open_ledger(f"sqlite:{path}?busy_timeout=soon")


async def test_sqlite_outbox_url_opens_a_store_that_closes_its_own_ledger(tmp_path: Path) -> None:
    store = open_outbox(f"sqlite:{tmp_path / 'ledger.db'}")
    assert isinstance(store, SQLiteOutboxStore)
    await store.migrate()
    assert await store.pending_count() == 0
    await store.close()
    assert store.ledger._closed  # the store opened its ledger, so the store closed it


async def test_postgres_outbox_url_carries_where_the_table_lives(pg_dsn: str) -> None:
    store = open_outbox(f"{pg_dsn}?schema=rs_registry_t&table_prefix=ob_")
    try:
        assert isinstance(store, PostgresOutboxStore)
        assert store.table == "rs_registry_t.ob_outbox"
        assert "schema=" not in repr(store)  # replaysafe's options never reach libpq
    finally:
        await store.close()
    with pytest.raises(ConfigurationError, match="table_prefix"):
        open_outbox(f"{pg_dsn}?table_prefix=Bad-Prefix")
