"""``replaysafe outbox …``: run the outbox relay, inspect the backlog, create the tables.

The outbox lives in the application's database: ``--ledger sqlite:PATH`` (the SQLite ledger file)
or ``--ledger postgres`` with ``--dsn`` (or ``REPLAYSAFE_PG_DSN``), ``--schema`` and
``--table-prefix``. The broker is chosen by ``--broker``:

=================================== ==============================================================
``memory``                          an in-process broker (tests, dry runs: published messages are
                                    gone when the process exits)
``amqp://user:pass@host:5672/vhost`` RabbitMQ (``amqps://`` for TLS); extra ``rabbitmq``
``sqs://[REGION]``                  Amazon SQS with the usual AWS credential chain; extra ``sqs``
``sqs+http://host:port[/REGION]``   an SQS-compatible endpoint (moto, LocalStack)
``kafka://host:port[,host:port]``   Kafka bootstrap servers; extra ``kafka``
=================================== ==============================================================

``REPLAYSAFE_FAILPOINTS`` is honoured by ``relay`` (chaos tests kill it between publish and mark).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import click

from replaysafe._registry import open_outbox, scheme_of
from replaysafe.brokers import BROKER_SCHEMES
from replaysafe.brokers import broker_from_url as resolve_broker
from replaysafe.errors import ConfigurationError, ReplaysafeError


def _ledger_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--ledger",
            "ledger_spec",
            required=True,
            metavar="sqlite:PATH|postgres|URL",
            help="Where the outbox lives: the SQLite ledger file, PostgreSQL (with --dsn, "
            "--schema, --table-prefix), or an outbox URL (docs/urls.md: its query names the "
            "schema and table prefix).",
        ),
        click.option(
            "--dsn",
            envvar="REPLAYSAFE_PG_DSN",
            default=None,
            help="PostgreSQL DSN for --ledger postgres. Prefer the REPLAYSAFE_PG_DSN environment "
            "variable so a password stays out of the process list and shell history.",
        ),
        click.option(
            "--schema", default="replaysafe", show_default=True, help="PostgreSQL schema."
        ),
        click.option(
            "--table-prefix", default="rs_", show_default=True, help="PostgreSQL table prefix."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@asynccontextmanager
async def _store(ledger_spec: str, dsn: str | None, schema: str, prefix: str) -> AsyncIterator[Any]:
    """Open the outbox store named on the command line (``open_outbox``: the one grammar);
    close what it opened. ``postgres`` stands for the DSN of ``--dsn`` / REPLAYSAFE_PG_DSN."""
    url = ledger_spec
    options: dict[str, Any] = {}
    if ledger_spec == "postgres":
        if not dsn:
            raise ConfigurationError(
                "--ledger postgres needs --dsn or the REPLAYSAFE_PG_DSN environment variable"
            )
        # --schema/--table-prefix belong to this form; a URL carries ?schema=&table_prefix=
        url, options = dsn, {"schema": schema, "table_prefix": prefix}
    if scheme_of(url) in ("postgresql", "postgres"):
        # the pool logs each failed connection attempt; the error raised says why, once
        logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
        options["max_size"] = 2
    store = open_outbox(url, **options)
    try:
        yield store
    finally:
        await store.close()


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except ReplaysafeError as exc:  # messages say what happened and what to do; DSNs redacted
        raise click.ClickException(str(exc)) from None


@click.group("outbox")
def outbox_group() -> None:
    """Publish staged outbox rows and inspect the backlog."""


@outbox_group.command("migrate")
@_ledger_options
def migrate_command(ledger_spec: str, dsn: str | None, schema: str, table_prefix: str) -> None:
    """Create the outbox tables if missing (idempotent, safe to run concurrently)."""

    async def run() -> str:
        async with _store(ledger_spec, dsn, schema, table_prefix) as store:
            await store.migrate()
            return f"outbox ready: {store!r}"

    click.echo(_run(run()))


@outbox_group.command("pending")
@_ledger_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def pending_command(
    ledger_spec: str, dsn: str | None, schema: str, table_prefix: str, as_json: bool
) -> None:
    """Print how many rows wait for the relay and the publish lag (age of the oldest)."""

    async def run() -> tuple[int, float | None]:
        async with _store(ledger_spec, dsn, schema, table_prefix) as store:
            return await store.pending_count(), await store.oldest_pending_age()

    pending, lag = _run(run())
    if as_json:
        click.echo(json.dumps({"pending": pending, "publish_lag_seconds": lag}))
    else:
        shown = "none pending" if lag is None else f"oldest staged {lag:.1f}s ago"
        click.echo(f"pending {pending} ({shown})")


@outbox_group.command("relay")
@_ledger_options
@click.option(
    "--broker",
    "broker_spec",
    required=True,
    metavar="URL",
    help=f"Where to publish: {BROKER_SCHEMES}.",
)
@click.option("--batch", default=100, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--poll-interval", default=0.5, show_default=True, type=click.FloatRange(0.001))
@click.option(
    "--retention",
    default=86_400.0,
    show_default=True,
    type=click.FloatRange(1.0),
    help="Seconds published rows are kept before cleanup deletes them.",
)
@click.option(
    "--publish-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.001),
    help="A publish call taking longer is treated as ambiguous and retried with the same ids.",
)
@click.option("--owner", default=None, help="Relay name (default: host-pid-random).")
@click.option("--once", is_flag=True, help="Publish what is pending now, then exit.")
def relay_command(
    ledger_spec: str,
    dsn: str | None,
    schema: str,
    table_prefix: str,
    broker_spec: str,
    batch: int,
    poll_interval: float,
    retention: float,
    publish_timeout: float,
    owner: str | None,
    once: bool,
) -> None:
    """Publish committed outbox rows in order per key until SIGTERM/SIGINT (graceful: the pass in
    progress finishes and the relay lease is released)."""
    from replaysafe import observe as o
    from replaysafe.failpoints import FAILPOINTS
    from replaysafe.outbox.relay import Relay

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    FAILPOINTS.enable_from_env()

    async def run() -> tuple[str, int]:
        broker = resolve_broker(broker_spec)
        try:
            async with _store(ledger_spec, dsn, schema, table_prefix) as store:
                relay = Relay(
                    store,
                    broker,
                    batch=batch,
                    poll_interval=poll_interval,
                    retention=retention,
                    publish_timeout=publish_timeout,
                    owner=owner,
                )
                if once:
                    while await relay.run_once() == batch:
                        pass
                    await relay.cleanup()
                else:
                    stop = asyncio.Event()
                    loop = asyncio.get_running_loop()
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        loop.add_signal_handler(sig, stop.set)
                    try:
                        await relay.run(stop)
                    finally:
                        for sig in (signal.SIGTERM, signal.SIGINT):
                            with contextlib.suppress(Exception):
                                loop.remove_signal_handler(sig)
                return relay.owner, relay.stats.total(o.OUTBOX_PUBLISHED)
        finally:
            await broker.close()

    name, published = _run(run())
    if once:
        click.echo(f"published {published}")
    else:
        click.echo(f"relay {name} stopped after publishing {published} row(s)")


__all__ = ["outbox_group", "resolve_broker"]
