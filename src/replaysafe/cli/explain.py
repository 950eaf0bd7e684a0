"""`replaysafe explain MODULE:ATTR`: the guarantee statement, per handler of an App or for a
Guard, with findings."""

from __future__ import annotations

import json

import click
from rich.console import Console

from replaysafe.cli._common import load_target, run_app
from replaysafe.explain import Report, explain, explain_guard
from replaysafe.guard import Guard

_COLOR = {"error": "red", "warning": "yellow", "info": "cyan"}


def print_report(report: Report, console: Console) -> None:
    for h in report.handlers:
        boundary = h.boundary or "nowhere: replay hurts"
        kind = "guard " if h.kind == "guard" else ""
        console.print(f"{kind}[bold]{h.name}[/] ({h.guarantee.value}) — replay stops hurting at: "
                      f"[bold]{boundary}[/]")  # fmt: skip
        for line in h.statement:
            console.print(f"  - {line}", highlight=False)
        for f in h.findings:
            color = _COLOR[f.severity]
            console.print(f"  [{color}]{f.severity.upper()} {f.id}[/] {f.message}", highlight=False)
        console.print()


@click.command("explain")
@click.argument("target", metavar="MODULE:APP|GUARD")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--strict", is_flag=True, help="Exit 1 when any finding is an error.")
@click.option("--p99", "p99", multiple=True, metavar="HANDLER=SECONDS",
              help="Observed p99 latency of a handler or guard (repeat per handler).")  # fmt: skip
def explain_command(target: str, as_json: bool, strict: bool, p99: tuple[str, ...]) -> None:
    """Say, per handler and boundary by boundary, where replay stops hurting.

    TARGET is an App, or a Guard (stated as a handler whose broker is unknown and whose ack is
    the caller's)."""
    app = load_target(target)
    observed: dict[str, float] = {}
    for item in p99:
        name, _, value = item.partition("=")
        try:
            observed[name] = float(value)
        except ValueError:
            raise click.BadParameter(f"--p99 wants HANDLER=SECONDS, got {item!r}") from None
    if isinstance(app, Guard):
        report = run_app(app, explain_guard(app, p99=observed))
    else:
        report = run_app(app, explain(app, p99=observed))
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        print_report(report, Console())
    if strict and report.errors:
        raise SystemExit(1)
