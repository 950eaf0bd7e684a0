"""`replaysafe demo`: replay the double-charge chain under each guarantee and print what it cost.

An alias of ``replaysafe chaos --preset demo``: both run the chaos harness's demo preset
(:mod:`replaysafe.chaos.demo`) through :func:`run_preset` and print its report."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from replaysafe.errors import ReplaysafeError

#: --broker names and their local default URLs (the machine's RabbitMQ, moto and Kafka ports)
DEMO_BROKERS = {
    "memory": "memory",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    # a throwaway moto / Tansu server on a free loopback port, stopped afterwards
    "sqs": "sqs",
    "kafka": "kafka",
}
#: --ledger names and their local defaults
DEMO_LEDGERS = {
    "sqlite": "sqlite",
    "memory": "memory",
    "postgres": "postgresql://postgres@127.0.0.1:5432/test",
    "redis": "redis://127.0.0.1:6379/0",
}


@click.command("demo")
@click.option(
    "--orders",
    default=1000,
    show_default=True,
    type=click.IntRange(4, 1_000_000),
    help="How many capture-payment operations to publish.",
)
@click.option(
    "--seed",
    default=7,
    show_default=True,
    type=int,
    help="Chooses the faults; the same seed gives the same faults under each guarantee.",
)
@click.option(
    "--workers",
    default=8,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Consumer workers (each restarts after a simulated crash).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON only.")
@click.option("--broker", type=click.Choice(sorted(DEMO_BROKERS)), default="memory",
              show_default=True, help="Where the orders travel.")  # fmt: skip
@click.option(
    "--url",
    default=None,
    help="Broker URL (defaults: the local RabbitMQ on 5672; for sqs and kafka a throwaway moto / "
    "Tansu server on a free loopback port).",
)
@click.option("--ledger", type=click.Choice(sorted(DEMO_LEDGERS)), default="sqlite",
              show_default=True, help="Where the replay ledger lives.")  # fmt: skip
@click.option(
    "--dsn",
    default=None,
    help="Ledger DSN/URL for postgres or redis (defaults: the local servers).",
)
def demo_command(
    orders: int, seed: int, workers: int, as_json: bool, broker: str, url: str | None,
    ledger: str, dsn: str | None,
) -> None:  # fmt: skip
    """Replay the double-charge chain under each guarantee (default: memory broker + SQLite)."""
    run_preset(orders=orders, seed=seed, workers=workers, broker_url=url or DEMO_BROKERS[broker],
               ledger_spec=dsn or DEMO_LEDGERS[ledger], as_json=as_json)  # fmt: skip


def run_preset(
    *,
    orders: int,
    seed: int,
    workers: int,
    broker_url: str,
    ledger_spec: str,
    as_json: bool = False,
    json_path: str | None = None,
) -> None:
    """Run the demo preset and print its report: the JSON only (``as_json``), else the table per
    guarantee and where replay stops hurting; ``json_path`` also writes the JSON there. A
    ``ReplaysafeError`` becomes the command's error message."""
    from replaysafe.chaos.demo import STATEMENTS, demo_json, run_demo

    try:
        results = asyncio.run(run_demo(orders=orders, seed=seed, workers=workers,
                                       broker_url=broker_url, ledger_spec=ledger_spec))  # fmt: skip
    except ReplaysafeError as exc:
        raise click.ClickException(str(exc)) from exc
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(demo_json(orders, seed, results), indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(demo_json(orders, seed, results)))
        return
    console = Console()
    console.print(
        f"[bold]capture-payment[/] x {orders} orders, seed {seed}: ambiguous publishes, "
        "crashes after the charge and before it, redelivery by the broker.\n"
    )
    for r in results:
        table = Table(title=f"{r.guarantee.value}", title_justify="left", min_width=60)
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_row("operations (orders)", str(r.operations))
        copies = "-" if r.transport_copies is None else str(r.transport_copies)
        table.add_row("transport copies published", copies)
        table.add_row("charges at payments-api", str(r.effects))
        table.add_row(_flag("orders charged more than once", r.duplicates), str(r.duplicates))
        table.add_row(_flag("orders never charged", r.lost), str(r.lost))
        table.add_row("quarantined", str(r.quarantined))
        table.add_row("copies answered from the ledger (not run)", str(r.answered_by_ledger))
        table.add_row("re-runs answered by idempotency key", str(r.answered_by_key))
        for name, n in r.faults.items():
            table.add_row(f"fault injected: {name}", str(n))
        table.add_row("worker restarts after crashes", str(r.worker_restarts))
        table.add_row("seconds", f"{r.seconds:.2f}")
        console.print(table)
    console.print("\n[bold]Where replay stops hurting[/]")
    for r in results:
        console.print(f"- {STATEMENTS[r.guarantee]}")


def _flag(label: str, n: int) -> str:
    return f"[red]{label}[/]" if n else label
