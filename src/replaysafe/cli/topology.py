"""`replaysafe topology declare|show MODULE:APP`: create and name what an app's handlers consume,
so that a producer (a plain client too) can publish before any worker ran."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import click

from replaysafe.app import App
from replaysafe.cli._common import load_app, run_app
from replaysafe.topology import HandlerTopology, declare_topology, show_topology


def _run(
    target: str, call: Callable[[App], Awaitable[list[HandlerTopology]]]
) -> list[HandlerTopology]:
    app = load_app(target)
    # aiormq logs each failed connection attempt; the error run_app prints already says why, once
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)

    async def work() -> list[HandlerTopology]:
        return await call(app)

    return run_app(app, work())


def _print(topology: list[HandlerTopology], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([t.as_json() for t in topology], indent=2))
        return
    for t in topology:
        rows = [("source", t.source), ("group", t.group), *t.names.items()]
        width = max(len(label) for label, _ in rows)
        click.echo(f"handler {t.handler}")
        for label, value in rows:
            mark = "   <- producers publish here" if (label, value) == t.publish_to else ""
            click.echo(f"  {label.ljust(width)}  {value}{mark}")


@click.group("topology")
def topology_group() -> None:
    """An app's broker topology: per handler, its source, group and broker names."""


@topology_group.command("show")
@click.argument("target", metavar="MODULE:APP")
@click.option("--json", "as_json", is_flag=True, help="Print the topology as JSON.")
def show_command(target: str, as_json: bool) -> None:
    """Print, per handler, the source, the group and what the broker declares for them
    (RabbitMQ exchange and queues, SQS queue URL, Kafka topic and group id). Creates nothing."""
    _print(_run(target, show_topology), as_json)


@topology_group.command("declare")
@click.argument("target", metavar="MODULE:APP")
@click.option("--visibility-timeout", type=click.FloatRange(min=1.0), default=None,
              help="SQS: the visibility timeout of a queue created now (default 30 s; an "
              "existing queue is kept as it is).")  # fmt: skip
@click.option("--partitions", type=click.IntRange(min=1), default=None,
              help="Kafka: the partition count of a topic created now (default 1; an existing "
              "topic is kept as it is).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the topology as JSON.")
def declare_command(
    target: str, visibility_timeout: float | None, partitions: int | None, as_json: bool
) -> None:
    """Create what the app's handlers consume, so that messages published before any worker ran
    are kept: the RabbitMQ exchange with a queue (and dead-letter queue) per group, the SQS queue,
    the Kafka topic. Idempotent. Prints the topology, as `show` does."""
    topology = _run(
        target,
        lambda app: declare_topology(
            app, visibility_timeout=visibility_timeout, partitions=partitions
        ),
    )
    if not as_json:
        click.echo(f"declared the topology of {len(topology)} handler(s)", err=True)
    _print(topology, as_json)
