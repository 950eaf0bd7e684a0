"""`replaysafe run MODULE:APP`: check the broker and the ledger, run an app's workers until
SIGTERM/SIGINT, drain, and close everything it opened.

Exit status: 0 after a requested stop (drained, or cut at the drain timeout: the last line says
what was cut); 1 when the app cannot start (the start-up check, a hook or the configuration
failed: one paragraph on stderr names the fix); 3 after ``--max-ledger-outage`` seconds without a
ledger; 128 + the signal number after a second SIGINT/SIGTERM (130 for Ctrl-C) stopped it at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import click

from replaysafe.app import App
from replaysafe.cli._common import close_app, forget, load_app, say
from replaysafe.errors import ConfigurationError, ReplaysafeError
from replaysafe.runtime.health import MAX_LEDGER_OUTAGE, Health
from replaysafe.runtime.preflight import STARTUP_TIMEOUT, Preflight, one_line, preflight
from replaysafe.runtime.worker import Worker

log = logging.getLogger("replaysafe.runtime")

#: `replaysafe run`'s exit status when the app cannot start
EXIT_START_FAILED = 1
#: ... when the ledger stayed unreachable longer than --max-ledger-outage
EXIT_LEDGER_OUTAGE = 3


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
            say(f"{app.name}: {sig.name}: draining {worker.in_flight} in flight, up to "
                 f"{drain_timeout:g}s; Ctrl-C again to stop now")  # fmt: skip
            worker.stop()
        elif len(signals) == 2:
            say(f"{app.name}: {sig.name} again: stopping now")
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
            say(f"{app.name}: {signals[0].name} while starting; nothing was consumed")
            return 128 + signals[0]
        except ReplaysafeError as exc:
            say(f"{app.name} cannot start: {one_line(exc)}")
            return EXIT_START_FAILED
        for w in checked.warnings:
            log.warning("%s %s", w.id, w.message)
        reads = "; ".join(_reads(s.name, checked) for s in worker.specs)
        say(f"{app.name} running as {worker.owner}: {reads}")
        consuming = True  # no await since the check: a signal now stops the worker
        return await _run(app, worker, health, drain_timeout, max_ledger_outage, signals)
    finally:
        try:
            if started_hooks:
                await _hooks(app.shutdown_hooks)
        finally:
            forget(app)  # a worker's app is closed whoever imported it
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
            say(f"{app.name}: the ledger has been unreachable for {outage:.0f}s "
                 f"(--max-ledger-outage {max_ledger_outage:g}): stopping, then exiting with "
                 f"status {EXIT_LEDGER_OUTAGE} so that the supervisor restarts the "
                 "worker")  # fmt: skip
            worker.stop()
        try:
            await running
        except ReplaysafeError as exc:  # subscribe refused, configuration, …
            say(f"{app.name} cannot run: {one_line(exc)}")
            return EXIT_START_FAILED
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    report = worker.stop_report
    assert report is not None
    say(f"{app.name}: {report.describe(app)}")
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
