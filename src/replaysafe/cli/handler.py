"""`replaysafe handler pause | resume | list`: durable per-handler control through the app's ledger.

The flag lives in the ledger because it is the one durable store that every worker of the app
shares: each worker reads the flags about once a second (``Worker.control_interval``), stops
fetching a paused handler's source (in-flight work finishes and settles normally) and fetches
again once it is resumed. A restarted worker starts paused if its handler is paused.
"""

from __future__ import annotations

import getpass
import json
import socket
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from replaysafe.app import App
from replaysafe.cli._common import load_app, run_app, when
from replaysafe.ledger.base import PauseState
from replaysafe.runtime.worker import CONTROL_INTERVAL


def _operator() -> str:
    """Who runs the command (``user@host``), recorded as ``by`` when ``--by`` is not given."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _known(app: App, handler: str) -> None:
    if handler not in app.handlers:
        raise click.BadParameter(
            f"{app.name} has no handler {handler!r}; its handlers: "
            f"{', '.join(sorted(app.handlers)) or 'none'}",
            param_hint="HANDLER",
        )


def handler_rows(app: App, flags: dict[str, PauseState]) -> list[dict[str, Any]]:
    """One row per handler of the app, plus any paused name the app does not know (a flag left
    behind by a renamed or removed handler: resume it to clear it)."""
    rows: list[dict[str, Any]] = []
    for name in sorted(set(app.handlers) | set(flags)):
        spec = app.handlers.get(name)
        state = flags.get(name)
        rows.append({
            "handler": name,
            "source": None if spec is None else spec.source,
            "guarantee": None if spec is None else spec.guarantee.value,
            "known": spec is not None,
            "paused": state is not None,
            "since": None if state is None else state.since,
            "by": None if state is None else state.by,
            "reason": None if state is None else state.reason,
        })  # fmt: skip
    return rows


@click.group("handler")
def handler_group() -> None:
    """Pause, resume or list an app's handlers (a durable flag every worker sees)."""


@handler_group.command("pause")
@click.argument("target", metavar="MODULE:APP")
@click.argument("handler")
@click.option("--reason", default="", help="Why (shown by `handler list` and in worker logs).")
@click.option("--by", "by", default=None, help="Who pauses it (default: user@host).")
def pause_command(target: str, handler: str, reason: str, by: str | None) -> None:
    """Stop every worker from fetching HANDLER's source; in-flight work settles normally."""
    app = load_app(target)
    _known(app, handler)
    run_app(app, app.ledger.set_paused(handler, True, reason=reason, by=by or _operator()))
    source = app.handlers[handler].source
    click.echo(
        f"paused {handler}: every worker stops fetching from {source} at its next control check "
        f"(about every {CONTROL_INTERVAL:g}s); in-flight work settles normally. Resume with "
        f"`replaysafe handler resume {target} {handler}`."
    )


@handler_group.command("resume")
@click.argument("target", metavar="MODULE:APP")
@click.argument("handler")
def resume_command(target: str, handler: str) -> None:
    """Let every worker fetch HANDLER's source again."""
    app = load_app(target)

    async def go() -> bool:
        was = handler in await app.ledger.paused()
        if not was:
            _known(app, handler)  # an unknown name may still clear a flag left behind
        await app.ledger.set_paused(handler, False)
        return was

    was_paused = run_app(app, go())
    if was_paused:
        click.echo(f"resumed {handler}: workers fetch again at their next control check")
    else:
        click.echo(f"{handler} was not paused; nothing to do")


@handler_group.command("list")
@click.argument("target", metavar="MODULE:APP")
@click.option("--json", "as_json", is_flag=True)
def list_command(target: str, as_json: bool) -> None:
    """Every handler of the app: running or paused (since when, by whom, why)."""
    app = load_app(target)
    rows = handler_rows(app, run_app(app, app.ledger.paused()))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"handlers of {app.name}", title_justify="left")
    for col in ("handler", "source", "guarantee", "state", "since", "by", "reason"):
        table.add_column(col, overflow="fold")
    for r in rows:
        state = "[red]paused[/]" if r["paused"] else "running"
        if not r["known"]:
            state += " (not in this app)"
        table.add_row(
            r["handler"], r["source"] or "-", r["guarantee"] or "-", state,
            when(r["since"]), r["by"] or "-", r["reason"] or "-",
        )  # fmt: skip
    Console(width=max(Console().width, 140)).print(table)
