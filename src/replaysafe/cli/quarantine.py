"""`replaysafe quarantine list | show | redrive | purge` over an app's ledger."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from replaysafe.app import App
from replaysafe.cli._common import entry_json, load_app, run_app, when
from replaysafe.ledger.base import QuarantineEntry
from replaysafe.quarantine import QuarantineReason
from replaysafe.redrive import redrive

REASONS = click.Choice([r.value for r in QuarantineReason])


async def _entries(app: App, ids: tuple[str, ...], reason: str | None) -> list[QuarantineEntry]:
    if ids:
        found = [await app.ledger.quarantine_entry(i) for i in ids]
        missing = [i for i, e in zip(ids, found, strict=True) if e is None]
        if missing:
            raise click.ClickException(f"no quarantine entries {missing}; see `quarantine list`")
        return [e for e in found if e is not None]
    if reason is None:
        raise click.UsageError("name entry IDS or --reason")
    return await app.ledger.quarantined(reason=QuarantineReason(reason), limit=100_000)


@click.group("quarantine")
def quarantine_group() -> None:
    """Inspect, redrive or purge quarantined messages (through the app's ledger)."""


@quarantine_group.command("list")
@click.argument("target", metavar="MODULE:APP")
@click.option("--reason", type=REASONS, default=None)
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True)
def list_command(target: str, reason: str | None, limit: int, as_json: bool) -> None:
    """Quarantine entries, oldest first."""
    app = load_app(target)
    why = QuarantineReason(reason) if reason else None
    entries = run_app(app, app.ledger.quarantined(reason=why, limit=limit))
    if as_json:
        click.echo(json.dumps([entry_json(e) for e in entries], indent=2))
        return
    table = Table(title=f"quarantine of {app.name} ({len(entries)})", title_justify="left")
    table.add_column("id", no_wrap=True, min_width=32)
    for col in ("handler", "reason", "operation", "risk", "attempts", "seen", "since",
                "redrives"):  # fmt: skip
        table.add_column(col, overflow="fold")
    for e in entries:
        cells = [e.id, e.scope, e.reason.value, e.operation_id or "-", e.risk.value,
                 str(e.attempts), str(e.seen), when(e.created_at), str(e.redrives)]  # fmt: skip
        table.add_row(*cells)
    Console(width=max(Console().width, 160)).print(table)


@quarantine_group.command("show")
@click.argument("target", metavar="MODULE:APP")
@click.argument("entry_id")
def show_command(target: str, entry_id: str) -> None:
    """One entry in full, with its (size-capped, possibly redacted) message copy."""
    app = load_app(target)
    [entry] = run_app(app, _entries(app, (entry_id,), None))
    click.echo(json.dumps(entry_json(entry, with_message=True), indent=2))


@quarantine_group.command("redrive")
@click.argument("target", metavar="MODULE:APP")
@click.argument("ids", nargs=-1)
@click.option("--reason", type=REASONS, default=None, help="Redrive every entry with this reason.")
@click.option(
    "--force",
    is_flag=True,
    help="Also redrive bad input and copies beyond the horizon (may apply twice).",
)
def redrive_command(target: str, ids: tuple[str, ...], reason: str | None, force: bool) -> None:
    """Republish entries through the ledger: applied operations are answered as duplicates."""
    app = load_app(target)

    async def go() -> list[Any]:
        return await redrive(app, await _entries(app, ids, reason), force=force)

    results = run_app(app, go())
    for r in results:
        mark = "redriven" if r.redriven else "REFUSED"
        click.echo(f"{mark} {r.entry_id} {r.operation_id or '-'}: {r.detail}")
    if any(not r.redriven for r in results):
        raise SystemExit(1)


@quarantine_group.command("purge")
@click.argument("target", metavar="MODULE:APP")
@click.argument("ids", nargs=-1)
@click.option("--reason", type=REASONS, default=None)
@click.option("--older-than", type=float, default=None, metavar="SECONDS",
              help="Only entries quarantined more than SECONDS ago.")  # fmt: skip
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge_command(
    target: str, ids: tuple[str, ...], reason: str | None, older_than: float | None, yes: bool
) -> None:
    """Delete quarantine entries (their operations stay as they are)."""
    if not ids and reason is None and older_than is None:
        raise click.UsageError("name entry IDS, --reason or --older-than")
    if not yes:
        click.confirm("Delete the matching quarantine entries for good?", abort=True)
    app = load_app(target)
    cutoff = app.clock.now() - older_than if older_than is not None else None
    why = QuarantineReason(reason) if reason else None
    n = run_app(app, app.ledger.purge_quarantine(list(ids) or None, reason=why, older_than=cutoff))
    click.echo(f"purged {n} quarantine entries")
