"""``replaysafe ledger …``: operate a ledger's storage (today: PostgreSQL schema migrations)."""

from __future__ import annotations

import asyncio
import logging

import click

from replaysafe.errors import ReplaysafeError


@click.group("ledger")
def ledger_group() -> None:
    """Operate the replay ledger's storage."""


@ledger_group.command("migrate")
@click.option(
    "--dsn",
    envvar="REPLAYSAFE_PG_DSN",
    required=True,
    help="PostgreSQL DSN (URL or key=value). Prefer the REPLAYSAFE_PG_DSN environment variable "
    "so a password stays out of the process list and shell history.",
)
@click.option(
    "--schema",
    default="replaysafe",
    show_default=True,
    help="Schema that holds the ledger tables (created if missing).",
)
@click.option(
    "--table-prefix",
    default="rs_",
    show_default=True,
    help="Prefix of the ledger's table, sequence and index names.",
)
@click.option(
    "--connect-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=1.0),
    help="Seconds to wait for the server.",
)
def migrate_command(dsn: str, schema: str, table_prefix: str, connect_timeout: float) -> None:
    """Create or upgrade the PostgreSQL ledger schema.

    Idempotent, and safe to run from several processes at once (they take turns on an advisory
    lock; the later ones find nothing to do). Prints what was created or upgraded.
    """
    from replaysafe.ledger.postgres import PostgresLedger

    # the pool logs each failed connection attempt; the error below already says why, once
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)

    async def run() -> str:
        ledger = PostgresLedger(
            dsn,
            schema=schema,
            table_prefix=table_prefix,
            min_size=1,
            max_size=1,
            connect_timeout=connect_timeout,
        )
        try:
            report = await ledger.migrate()
        finally:
            await ledger.close()
        return f"{ledger.dsn}: {report.describe()}"

    try:
        click.echo(asyncio.run(run()))
    except ReplaysafeError as exc:  # messages say what happened and what to do; DSNs redacted
        raise click.ClickException(str(exc)) from None
