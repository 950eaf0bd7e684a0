"""`replaysafe run MODULE:APP`: check the broker and the ledger, run an app's workers until
SIGTERM/SIGINT, drain, and close everything it opened.

Exit status: 0 after a requested stop (drained, or cut at the drain timeout: the last line says
what was cut); 1 when the app cannot start (the start-up check, a hook or the configuration
failed: one paragraph on stderr names the fix); 3 after ``--max-ledger-outage`` seconds without a
ledger; 128 + the signal number after a second SIGINT/SIGTERM (130 for Ctrl-C) stopped it at once.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

from replaysafe.app import App
from replaysafe.errors import ConfigurationError, ReplaysafeError
from replaysafe.guard import Guard
from replaysafe.runtime.health import MAX_LEDGER_OUTAGE, Health
from replaysafe.runtime.preflight import STARTUP_TIMEOUT, Preflight, one_line, preflight
from replaysafe.runtime.worker import Worker

log = logging.getLogger("replaysafe.runtime")
T = TypeVar("T")

#: `replaysafe run`'s exit status when the app cannot start
EXIT_START_FAILED = 1
#: ... when the ledger stayed unreachable longer than --max-ledger-outage
EXIT_LEDGER_OUTAGE = 3
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


def _forget(app: App | Guard) -> bool:
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


def _say(text: str) -> None:
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
            _say(f"could not close the {what} cleanly: {one_line(exc)}")


def run_app(app: App | Guard, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` (a coroutine over ``app``) on a fresh event loop, then close the app's broker
    and ledger on that loop; a :class:`ReplaysafeError` becomes a one-paragraph CLI error. For
    every command that opens an app's broker or ledger (explain, inspect, quarantine,
    handler), or a guard's ledger (explain). An app whose module was already imported when the
    command started (the command was invoked in-process, by a test or a notebook) belongs to its
    caller and is left open; one the command imported is closed and its import undone
    (:func:`_forget`)."""

    async def go() -> T:
        try:
            return await work
        finally:
            if _forget(app):
                await close_app(app)

    try:
        return asyncio.run(go())
    except ReplaysafeError as exc:  # messages say what happened and what to do; DSNs redacted
        raise click.ClickException(one_line(exc)) from None


async def _hooks(hooks: list[Any]) -> None:
    for hook in hooks:
        await hook()


async def serve(
    app: App,
    handlers: list[str] | None,
    drain_timeout: float,
    metrics_port: int | None = None,
    *,
    metrics_host: str = "127.0.0.1",
    max_ledger_outage: float | None = MAX_LEDGER_OUTAGE,
    startup_timeout: float = STARTUP_TIMEOUT,
) -> int:
    """Run one worker for ``handlers`` (all by default); returns the exit status (see the
    module docstring).

    Start: the app's startup hooks, the start-up check (:func:`preflight`: broker and ledger
    probed within ``startup_timeout`` seconds; a failure is one paragraph and status 1, with
    nothing consumed), then the worker. With ``metrics_port``, ``metrics_host:metrics_port``
    serves ``/metrics``, ``/healthz`` and ``/readyz``. The first SIGTERM/SIGINT stops fetching and
    drains for up to ``drain_timeout`` seconds; a second one stops at once. Last: the shutdown
    hooks, then the broker and the ledger are closed."""
    loop = asyncio.get_running_loop()
    # the pool logs every failed connection attempt; our own errors say why, once
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    main = asyncio.current_task()
    assert main is not None
    signals: list[signal.Signals] = []
    worker: Worker | None = None

    def on_signal(sig: signal.Signals) -> None:
        signals.append(sig)
        if worker is None or not consuming:
            if len(signals) == 1:
                main.cancel()  # nothing consumed yet: stop starting
            return
        if len(signals) == 1:
            _say(f"{app.name}: {sig.name}: draining {worker.in_flight} in flight, up to "
                 f"{drain_timeout:g}s; Ctrl-C again to stop now")  # fmt: skip
            worker.stop()
        elif len(signals) == 2:
            _say(f"{app.name}: {sig.name} again: stopping now")
            worker.stop(now=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    httpd = None
    started_hooks = consuming = False
    try:
        try:
            await _hooks(app.startup_hooks)
            started_hooks = True
            worker = Worker(app, handlers=handlers or None)
            health = Health(app, worker, max_ledger_outage=max_ledger_outage)
            if metrics_port is not None:
                httpd = _serve_metrics(metrics_host, metrics_port, worker, health)
            checked = await preflight(app, worker.specs, worker.owner, within=startup_timeout)
        except asyncio.CancelledError:
            if not signals:
                raise
            _say(f"{app.name}: {signals[0].name} while starting; nothing was consumed")
            return 128 + signals[0]
        except ReplaysafeError as exc:
            _say(f"{app.name} cannot start: {one_line(exc)}")
            return EXIT_START_FAILED
        for w in checked.warnings:
            log.warning("%s %s", w.id, w.message)
        reads = "; ".join(_reads(s.name, checked) for s in worker.specs)
        _say(f"{app.name} running as {worker.owner}: {reads}")
        consuming = True  # no await since the check: a signal now stops the worker
        return await _run(app, worker, health, drain_timeout, max_ledger_outage, signals)
    finally:
        try:
            if started_hooks:
                await _hooks(app.shutdown_hooks)
        finally:
            _forget(app)  # a worker's app is closed whoever imported it
            await close_app(app)
            if httpd is not None:
                await asyncio.to_thread(httpd.shutdown)
                httpd.server_close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def _reads(handler: str, checked: Preflight) -> str:
    g = checked.groups[handler]
    waiting = "" if g.messages is None else f" ({g.messages} waiting)"
    return f"{handler} reads {g.name}{waiting}"


async def _run(
    app: App,
    worker: Worker,
    health: Health,
    drain_timeout: float,
    max_ledger_outage: float | None,
    signals: list[signal.Signals],
) -> int:
    """The worker until it stops; the exit status and the last line."""
    running = asyncio.ensure_future(worker.run(drain_timeout=drain_timeout))
    watch = asyncio.ensure_future(health.watch())
    outage = None
    try:
        await asyncio.wait({running, watch}, return_when=asyncio.FIRST_COMPLETED)
        if watch.done() and not running.done():
            outage = watch.result()
            _say(f"{app.name}: the ledger has been unreachable for {outage:.0f}s "
                 f"(--max-ledger-outage {max_ledger_outage:g}): stopping, then exiting with "
                 f"status {EXIT_LEDGER_OUTAGE} so that the supervisor restarts the "
                 "worker")  # fmt: skip
            worker.stop()
        try:
            await running
        except ReplaysafeError as exc:  # subscribe refused, configuration, …
            _say(f"{app.name} cannot run: {one_line(exc)}")
            return EXIT_START_FAILED
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    report = worker.stop_report
    assert report is not None
    _say(f"{app.name}: {report.describe(app)}")
    if report.forced and len(signals) >= 2:
        return 128 + signals[1]
    return EXIT_LEDGER_OUTAGE if outage is not None else 0


def _serve_metrics(host: str, port: int, worker: Worker, health: Health) -> Any:
    from replaysafe.observe.prometheus import serve as serve_metrics

    try:
        return serve_metrics(port, lambda: [worker.stats], host, health.status)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port} ({one_line(exc)}); choose another "
            "--metrics-port or --metrics-host"
        ) from None


@click.command("run")
@click.argument("target", metavar="MODULE:APP")
@click.option("--handler", "handlers", multiple=True, help="Run only these handlers (repeat).")
@click.option("--drain-timeout", default=30.0, show_default=True, type=float,
              help="On SIGTERM, how long in-flight handlers may take to finish.")  # fmt: skip
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve /metrics (Prometheus), /healthz and /readyz on this port "
                   "(extra: metrics).")  # fmt: skip
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address the metrics port listens on (0.0.0.0 or :: for every "
                   "interface).")  # fmt: skip
@click.option("--max-ledger-outage", default=MAX_LEDGER_OUTAGE, show_default=True,
              type=click.FloatRange(min=0), metavar="SECONDS",
              help="Exit with status 3 after this long without a reachable ledger, so that a "
                   "supervisor restarts the worker (0: never).")  # fmt: skip
@click.option("--startup-timeout", default=STARTUP_TIMEOUT, show_default=True,
              type=click.FloatRange(min=0.1), metavar="SECONDS",
              help="How long the start-up check of the broker and the ledger may "
                   "take.")  # fmt: skip
def run_command(
    target: str,
    handlers: tuple[str, ...],
    drain_timeout: float,
    metrics_port: int | None,
    metrics_host: str,
    max_ledger_outage: float,
    startup_timeout: float,
) -> None:
    """Check the broker and the ledger, run an app's handlers until SIGTERM or SIGINT, then drain
    (a second signal stops at once)."""
    app = load_app(target)
    status = asyncio.run(serve(app, list(handlers), drain_timeout, metrics_port,
                               metrics_host=metrics_host, max_ledger_outage=max_ledger_outage,
                               startup_timeout=startup_timeout))  # fmt: skip
    if status:
        sys.exit(status)
