"""What several ``replaysafe`` commands share: importing the app (or guard) a command names,
running work on it on a fresh event loop and closing what the command opened, one-line messages
on stderr, and the formatting of timestamps and quarantine entries.

A leaf of the ``cli`` package: it imports no command module and not ``replaysafe.cli`` itself, so
the package ``__init__`` can import every command at its top without a cycle.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import weakref
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from replaysafe.app import App
from replaysafe.errors import ReplaysafeError
from replaysafe.guard import Guard
from replaysafe.ledger.base import QuarantineEntry
from replaysafe.runtime.preflight import one_line

T = TypeVar("T")

#: how long closing the broker or the ledger may take at the end of a command
CLOSE_TIMEOUT = 5.0


#: apps and guards a command imported (their module was not loaded before), with that module's
#: name: the command owns their broker and ledger and closes them when it ends (see ``run_app``)
_imported: weakref.WeakKeyDictionary[App | Guard, str] = weakref.WeakKeyDictionary()


def load_app(target: str) -> App:
    """Import ``module:attribute`` (the working directory is importable) and check it is an App.
    A :class:`ReplaysafeError` raised by the import (the app's configuration refused) is a
    one-paragraph CLI error, status 1."""
    app = load_target(target)
    if not isinstance(app, App):
        raise click.BadParameter(f"{target} is {type(app).__name__}, not a replaysafe App")
    return app


def load_target(target: str) -> App | Guard:
    """:func:`load_app` for a command that also takes a :class:`~replaysafe.Guard` (explain):
    the attribute is an App or a Guard; anything else is a usage error."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(f"expected MODULE:ATTR, got {target!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    fresh = module_name not in sys.modules
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}") from exc
    except ReplaysafeError as exc:
        # the app refused its own configuration while the module was imported (App.handler: a
        # sync handler, a bad name ...): its message names the fix, a traceback adds nothing
        raise click.ClickException(f"{target}: {one_line(exc)}") from None
    found = getattr(module, attr, None)
    if not isinstance(found, App | Guard):
        raise click.BadParameter(
            f"{target} is {type(found).__name__}, not a replaysafe App or Guard"
        )
    if fresh:
        _imported[found] = module_name
    return found


def forget(app: App | Guard) -> bool:
    """Whether a command imported ``app`` (see :func:`load_app`); if so, the import is undone:
    once its broker and ledger are closed the app is of no further use (a closed ledger refuses
    every call), so the next command in the same process must import its module anew rather
    than find it in ``sys.modules``. An app that its module re-exports from another module stays
    the closed one: import it from where it is defined."""
    module = _imported.pop(app, None)
    if module is None:
        return False
    sys.modules.pop(module, None)
    return True


def say(text: str) -> None:
    """``text`` as one ``replaysafe: …`` line on stderr."""
    click.echo(f"replaysafe: {text}", err=True)


async def close_app(app: App | Guard) -> None:
    """Close the app's broker and ledger (a guard: the guard, then its ledger), each within
    ``CLOSE_TIMEOUT`` seconds (both are idempotent), on the loop that opened their connections:
    a connection left open when its event loop closes ends in "Task was destroyed but it is
    pending!" and driver tracebacks. A close that fails is said in one line."""
    first = ("broker", app.broker.close) if isinstance(app, App) else ("guard", app.close)
    for what, close in (first, ("ledger", app.ledger.close)):
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await close()
        except Exception as exc:
            say(f"could not close the {what} cleanly: {one_line(exc)}")


def run_app(app: App | Guard, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` (a coroutine over ``app``) on a fresh event loop, then close the app's broker
    and ledger on that loop; a :class:`ReplaysafeError` becomes a one-paragraph CLI error. For
    every command that opens an app's broker or ledger (explain, inspect, quarantine,
    handler), or a guard's ledger (explain). An app whose module was already imported when the
    command started (the command was invoked in-process, by a test or a notebook) belongs to its
    caller and is left open; one the command imported is closed and its import undone
    (:func:`forget`)."""

    async def go() -> T:
        try:
            return await work
        finally:
            if forget(app):
                await close_app(app)

    try:
        return asyncio.run(go())
    except ReplaysafeError as exc:  # messages say what happened and what to do; DSNs redacted
        raise click.ClickException(one_line(exc)) from None


def when(ts: float | None) -> str:
    """A UTC timestamp as ``YYYY-MM-DD HH:MM:SSZ``; ``-`` for none."""
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def entry_json(e: QuarantineEntry, *, with_message: bool = False) -> dict[str, Any]:
    """A quarantine entry as JSON (``quarantine list/show``, ``inspect``); the message only with
    ``with_message`` (it may be large)."""
    out: dict[str, Any] = {
        "id": e.id, "handler": e.scope, "reason": e.reason.value, "risk": e.risk.value,
        "operation_id": e.operation_id, "fingerprint": e.fingerprint, "attempts": e.attempts,
        "seen": e.seen, "first_detail": e.first_detail, "last_detail": e.last_detail,
        "created_at": e.created_at, "published_at": e.published_at,
        "message_size": e.message_size, "truncated": e.truncated,
        "redriven_at": e.redriven_at, "redrives": e.redrives,
    }  # fmt: skip
    if with_message and e.message is not None:
        out["message"] = e.message.decode("utf-8", "replace")
    return out
