"""`replaysafe inspect MODULE:APP [OPERATION_ID]`: what the ledger knows, now."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from replaysafe.app import App
from replaysafe.cli._common import entry_json, load_app, run_app, when
from replaysafe.ledger.base import OpKey


async def ledger_report(app: App, top: int = 10) -> dict[str, Any]:
    """The ledger summary with the size projected over the replay horizon at the current rate."""
    s = await app.ledger.summary(top=top)
    rows = sum(s.by_state.values())
    per_row = (s.approx_bytes / rows) if s.approx_bytes and rows else None
    projected_rows = s.completed_last_hour * app.horizon / 3600.0
    return {
        "ledger": repr(app.ledger),
        "horizon_seconds": app.horizon,
        "by_state": s.by_state,
        "rows": rows,
        "expired_leases": s.expired_leases,
        "oldest_in_flight_age_seconds": (
            None if s.oldest_in_flight_at is None else s.now - s.oldest_in_flight_at
        ),
        "hot_operations": [
            {"handler": k.scope, "operation_id": k.operation_id, "attempts": n}
            for k, n in s.hot_operations
        ],
        "quarantined_by_reason": s.quarantined_by_reason,
        "paused_handlers": {
            n: {"since": p.since, "by": p.by, "reason": p.reason}
            for n, p in (await app.ledger.paused()).items()
        },
        "completed_last_hour": s.completed_last_hour,
        "approx_bytes": s.approx_bytes,
        "projected_rows_at_horizon": round(projected_rows),
        "projected_bytes_at_horizon": None if per_row is None else round(projected_rows * per_row),
    }


async def operation_report(app: App, operation_id: str) -> dict[str, Any]:
    """One operation across the app's handlers: its record and boundary times, and quarantine."""
    out: dict[str, Any] = {"operation_id": operation_id, "handlers": []}
    entries = [e for e in await app.ledger.quarantined(limit=100_000)
               if e.operation_id == operation_id]  # fmt: skip
    for name in app.handlers:
        rec = await app.ledger.get(OpKey(name, operation_id))
        out["handlers"].append({
            "handler": name,
            "state": None if rec is None else rec.state.value,
            "attempts": None if rec is None else rec.attempts,
            "token": None if rec is None else rec.token,
            "owner": None if rec is None else rec.owner,
            "lease_until": None if rec is None else rec.lease_until,
            "first_claimed_at": None if rec is None else rec.created_at,
            # EFFECTED: when the ledger recorded the effect. COMPLETED lives at the broker only.
            "effected_at": None if rec is None else rec.completed_at,
            "last_error": None if rec is None else rec.last_error,
            "quarantine": [entry_json(e) for e in entries if e.scope == name],
        })  # fmt: skip
    return out


@click.command("inspect")
@click.argument("target", metavar="MODULE:APP")
@click.argument("operation_id", required=False)
@click.option("--top", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True)
def inspect_command(target: str, operation_id: str | None, top: int, as_json: bool) -> None:
    """Ledger summary (states, open ambiguity, hot keys, quarantine, size and projection), or one
    operation's boundary timestamps and attempts."""
    app = load_app(target)
    if operation_id is not None:
        doc = run_app(app, operation_report(app, operation_id))
        if as_json:
            click.echo(json.dumps(doc, indent=2))
            return
        console = Console()
        for h in doc["handlers"]:
            console.print(f"[bold]{h['handler']}[/] {operation_id}: {h['state'] or 'never seen'}")
            if h["state"] is not None:
                console.print(f"  attempts {h['attempts']}, fencing token {h['token']}, "
                              f"owner {h['owner']}", highlight=False)  # fmt: skip
                console.print(f"  first claimed {when(h['first_claimed_at'])}, effected "
                              f"{when(h['effected_at'])}; broker completion is not recorded "
                              "in the ledger", highlight=False)  # fmt: skip
            for q in h["quarantine"]:
                console.print(f"  quarantined: {q['reason']} ({q['risk']}), entry {q['id']}")
        return
    doc = run_app(app, ledger_report(app, top))
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    table = Table(title=f"ledger of {app.name}: {doc['ledger']}", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for state, n in sorted(doc["by_state"].items()):
        table.add_row(f"operations {state}", str(n))
    table.add_row("expired leases (outcome unknown until reclaimed)", str(doc["expired_leases"]))
    age = doc["oldest_in_flight_age_seconds"]
    table.add_row("oldest in flight", "-" if age is None else f"{age:.1f}s")
    for reason, n in sorted(doc["quarantined_by_reason"].items()):
        table.add_row(f"quarantined: {reason}", str(n))
    for name, p in sorted(doc["paused_handlers"].items()):
        table.add_row(f"paused: {name} (since {when(p['since'])})", p["reason"] or "-")
    table.add_row("completed in the last hour", str(doc["completed_last_hour"]))
    table.add_row("size now", "-" if doc["approx_bytes"] is None else f"{doc['approx_bytes']} B")
    table.add_row(f"projected rows over the {doc['horizon_seconds'] / 86400:g}-day horizon",
                  str(doc["projected_rows_at_horizon"]))  # fmt: skip
    projected = doc["projected_bytes_at_horizon"]
    table.add_row("projected size", "-" if projected is None else f"{projected} B")
    console = Console()
    console.print(table)
    if doc["hot_operations"]:
        console.print("hot operations (most attempts):")
        for h in doc["hot_operations"]:
            console.print(f"  {h['attempts']:>4}  {h['handler']}/{h['operation_id']}",
                          highlight=False)  # fmt: skip
