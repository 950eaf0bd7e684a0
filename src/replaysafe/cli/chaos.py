"""`replaysafe chaos`: run the fault matrix against a broker and a ledger, count business effects
at the sink, write the JSON (and the HTML report)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

import click

from replaysafe.errors import ConfigurationError


def _names(value: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    if value == "all":
        return known
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown {what} {', '.join(unknown) or '(empty)'}; use all or a comma-separated "
            f"list of: {', '.join(known)}"
        )
    return names


#: options a preset runs without: it brings its own scenario (every guarantee, its own faults)
PRESET_IGNORES = ("effect", "guarantee", "fault", "cells", "parallel", "run_timeout", "html_path")


@click.command("chaos")
@click.option("--preset", type=click.Choice(["demo"]), default=None,
              help="Run a named scenario instead of the matrix. demo: the double-charge chain "
                   "of `replaysafe demo` (--ops orders, default 1000; --workers, default 8; "
                   "--seed; --broker/--broker-url; --ledger/--ledger-url; --json PATH) and "
                   "its report.")  # fmt: skip
@click.option("--broker", type=click.Choice(["memory", "rabbitmq", "sqs", "kafka", "nats"]),
              default="memory", show_default=True)  # fmt: skip
@click.option("--broker-url", default=None,
              help="amqp://… (RabbitMQ), http://127.0.0.1:PORT (an SQS-compatible server), "
                   "host:port (Kafka bootstrap) or nats://host:port (NATS JetStream). Passwords "
                   "are never printed. Without it: the local RabbitMQ on 5672 or NATS on 4222; "
                   "for SQS and Kafka a throwaway moto / Tansu server is started on a free "
                   "loopback port and stopped afterwards.")  # fmt: skip
@click.option("--ledger", type=click.Choice(["sqlite", "postgres", "redis"]), default="sqlite",
              show_default=True)  # fmt: skip
@click.option("--ledger-url", default=None, help="PostgreSQL DSN or Redis URL.")
@click.option("--effect", default="keyed", show_default=True,
              help="keyed|transactional|unkeyed, comma-separated, or all.")  # fmt: skip
@click.option("--guarantee", default="all", show_default=True,
              help="all or a comma-separated list of guarantees.")  # fmt: skip
@click.option("--fault", default="all", show_default=True,
              help="all or a comma-separated list of faults.")  # fmt: skip
@click.option("--cells", type=click.Choice(["product", "default"]), default="product",
              show_default=True,
              help="product: every applicable guarantee x effect x fault of the lists; default: "
                   "the tested matrix (effectively-once under every fault, plus the "
                   "at-least-once/at-most-once contrast under crash_after_effect).")  # fmt: skip
@click.option("--ops", default=200, show_default=True, type=click.IntRange(10, 10_000_000))
@click.option("--workers", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option("--seed", default=7, show_default=True, type=int)
@click.option("--parallel", default=2, show_default=True, type=click.IntRange(1, 32),
              help="Runs (cells) at the same time.")  # fmt: skip
@click.option("--run-timeout", default=600.0, show_default=True, type=float,
              help="Upper bound of one run, seconds.")  # fmt: skip
@click.option("--json", "json_path", default=None, help="Write the results JSON here.")
@click.option("--html", "html_path", default=None, help="Write the HTML report here.")
def chaos_command(
    broker: str,
    broker_url: str | None,
    ledger: str,
    ledger_url: str | None,
    effect: str,
    guarantee: str,
    fault: str,
    cells: str,
    ops: int,
    workers: int,
    seed: int,
    parallel: int,
    run_timeout: float,
    json_path: str | None,
    html_path: str | None,
    preset: str | None,
) -> None:
    """Break things on purpose and count what the downstream saw.

    Exit status 1 when a run misses the pass bar or is invalid (its fault never hit)."""
    if preset == "demo":
        _run_demo_preset(broker, broker_url, ledger, ledger_url, ops, workers, seed, json_path)
        return
    from replaysafe.chaos.cells import (
        EFFECTS,
        FAULTS,
        GUARANTEES,
        ChaosConfig,
        default_cells,
    )
    from replaysafe.chaos.checker import contrast_bar, pass_bar
    from replaysafe.chaos.harness import run_matrix

    cfg = ChaosConfig(
        broker=broker,
        ledger=ledger,
        effects=_names(effect, EFFECTS, "effect"),
        guarantees=_names(guarantee, GUARANTEES, "guarantee"),
        faults=_names(fault, FAULTS, "fault"),
        ops=ops,
        workers=workers,
        seed=seed,
        parallel=parallel,
        broker_url=broker_url,
        ledger_url=ledger_url,
        run_timeout=run_timeout,
        cells=default_cells(broker, ledger) if cells == "default" else None,
    )

    def progress(r: object) -> None:
        click.echo(json.dumps(r.as_json()), err=True)  # type: ignore[attr-defined]

    try:
        with contextlib.ExitStack() as stack:
            if broker_url is None and broker in ("sqs", "kafka"):
                from replaysafe.testing.servers import local_kafka, local_sqs

                cfg.broker_url = stack.enter_context(
                    local_sqs() if broker == "sqs" else local_kafka()
                )
                click.echo(f"started a throwaway {broker} server at {cfg.broker_url}", err=True)
            matrix = asyncio.run(run_matrix(cfg, progress=progress))
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc
    from replaysafe.chaos.report import write_html, write_json

    if json_path:
        write_json(matrix, json_path)
    else:
        click.echo(json.dumps(matrix.as_json(), indent=2))
    if html_path:
        try:
            write_html(matrix, html_path)
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from exc
    problems = [p for r in matrix.runs for p in pass_bar(r)] + contrast_bar(matrix.runs)
    for p in problems:
        click.echo(f"FAIL {p}", err=True)
    click.echo(f"{len(matrix.runs)} runs in {matrix.seconds:.0f}s, {len(problems)} problem(s)",
               err=True)  # fmt: skip
    if problems:
        sys.exit(1)


def _run_demo_preset(
    broker: str,
    broker_url: str | None,
    ledger: str,
    ledger_url: str | None,
    ops: int,
    workers: int,
    seed: int,
    json_path: str | None,
) -> None:
    """``--preset demo``: what ``replaysafe demo`` runs, with the matrix's options mapped onto
    the demo's (``--ops`` and ``--workers`` keep the demo's defaults unless given); an option
    that only shapes the matrix is refused rather than silently ignored."""
    from click.core import ParameterSource

    from replaysafe.chaos.demo import sqs_url
    from replaysafe.cli.demo import DEMO_BROKERS, DEMO_LEDGERS, run_preset

    ctx = click.get_current_context()

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) is not ParameterSource.DEFAULT

    ignored = [f"--{n.removesuffix('_path').replace('_', '-')}" for n in PRESET_IGNORES if given(n)]
    if ignored:
        raise click.UsageError(
            f"--preset demo runs its own scenario (every guarantee, its own faults); drop "
            f"{', '.join(ignored)}, or run the matrix without --preset"
        )
    if broker not in DEMO_BROKERS:
        raise click.UsageError(
            f"--preset demo runs on {', '.join(sorted(DEMO_BROKERS))}, not {broker}: its "
            f"broker faults are defined for those; run the matrix on {broker} without --preset"
        )
    url = broker_url
    if url is not None and broker == "sqs" and url.startswith("http://"):
        url = sqs_url(url)  # the matrix's plain endpoint, as the demo's SQS URL
    elif url is not None and broker == "kafka" and "://" not in url:
        url = f"kafka://{url}"
    run_preset(
        orders=ops if given("ops") else 1000,
        seed=seed,
        workers=workers if given("workers") else 8,
        broker_url=url or DEMO_BROKERS[broker],
        ledger_spec=ledger_url or DEMO_LEDGERS[ledger],
        json_path=json_path,
    )
