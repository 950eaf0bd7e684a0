"""`replaysafe run MODULE:APP`: run an app's workers until SIGTERM/SIGINT, then drain."""

from __future__ import annotations

import asyncio
import importlib
import signal
import sys

import click

from replaysafe.app import App
from replaysafe.errors import ConfigurationError


def load_app(target: str) -> App:
    """Import ``module:attribute`` (the working directory is importable) and check it is an App."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(f"expected MODULE:APP, got {target!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}") from exc
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise click.BadParameter(f"{target} is {type(app).__name__}, not a replaysafe App")
    return app


async def serve(
    app: App, handlers: list[str] | None, drain_timeout: float, metrics_port: int | None = None
) -> None:
    """Run one worker for ``handlers`` until SIGTERM/SIGINT, then stop fetching, drain for up to
    ``drain_timeout`` seconds and settle what finished (unfinished work is left to the broker).
    With ``metrics_port``, ``/metrics`` is served on 127.0.0.1 in Prometheus text format."""
    for hook in app.startup_hooks:
        await hook()
    worker = app.worker(handlers=handlers or None)
    if metrics_port is not None:
        from replaysafe.observe.prometheus import serve as serve_metrics

        serve_metrics(metrics_port, lambda: [worker.stats])
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    click.echo(f"replaysafe: {app.name} running {[s.name for s in worker.specs]} as {worker.owner}",
               err=True)  # fmt: skip
    try:
        await worker.run(drain_timeout=drain_timeout)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for hook in app.shutdown_hooks:
            await hook()
    click.echo(f"replaysafe: {app.name} stopped after draining", err=True)


@click.command("run")
@click.argument("target", metavar="MODULE:APP")
@click.option("--handler", "handlers", multiple=True, help="Run only these handlers (repeat).")
@click.option("--drain-timeout", default=30.0, show_default=True, type=float,
              help="On SIGTERM, how long in-flight handlers may take to finish.")  # fmt: skip
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus /metrics on 127.0.0.1:PORT (extra: metrics).")  # fmt: skip
def run_command(
    target: str, handlers: tuple[str, ...], drain_timeout: float, metrics_port: int | None
) -> None:
    """Run an app's handlers until SIGTERM or SIGINT, then drain gracefully."""
    app = load_app(target)
    try:
        asyncio.run(serve(app, list(handlers), drain_timeout, metrics_port))
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc
