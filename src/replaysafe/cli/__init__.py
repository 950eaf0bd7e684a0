"""The ``replaysafe`` command: the click group :func:`main` (entry point ``replaysafe.cli:main``)
and the registration of every subcommand.

One module per command (group); what several of them share lives in :mod:`replaysafe.cli._common`.
The command modules never import this package's names, so importing them all here, at the top,
makes no cycle.
"""

from __future__ import annotations

import click

from replaysafe import __version__
from replaysafe.cli.chaos import chaos_command
from replaysafe.cli.demo import demo_command
from replaysafe.cli.explain import explain_command
from replaysafe.cli.handler import handler_group
from replaysafe.cli.inspect import inspect_command
from replaysafe.cli.ledger import ledger_group
from replaysafe.cli.outbox import outbox_group
from replaysafe.cli.quarantine import quarantine_group
from replaysafe.cli.run import run_command
from replaysafe.cli.simulate import simulate_command
from replaysafe.cli.topology import topology_group

__all__ = ["main"]


@click.group()
@click.version_option(__version__, prog_name="replaysafe")
def main() -> None:
    """replaysafe: business-level exactly-once effects on top of at-least-once brokers."""


for _command in (
    demo_command,
    run_command,
    explain_command,
    quarantine_group,
    inspect_command,
    ledger_group,
    outbox_group,
    simulate_command,
    chaos_command,
    handler_group,
    topology_group,
):
    main.add_command(_command)
