"""`replaysafe simulate`: the load model of the ambiguity window, on the command line.

Inputs come, in increasing priority, from the model's defaults, ``--preset``, ``--from-metrics``
(rate, latency mean, p99 and measured tail) and the explicit options; ``--scale K`` then projects
K times the traffic. The model itself lives in :mod:`replaysafe.simulate`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from replaysafe.errors import ConfigurationError, MissingExtra

if TYPE_CHECKING:
    from collections.abc import Callable

    from click.decorators import FC

    from replaysafe.simulate import LoadModel, SimulationResult

_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def seconds(value: str | float) -> float:
    """A duration: plain seconds or a number with ms, s, m, h or d (``30``, ``24h``, ``365d``)."""
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h|d|)\s*", value)
    if match is None:
        raise click.BadParameter(f"{value!r} is not a duration (e.g. 30, 1.5s, 250ms, 24h, 365d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


SECONDS = seconds

#: option name -> LoadModel field, for every input the model has
_FIELDS: dict[str, str] = {
    "rate": "rate_per_s",
    "workers": "workers",
    "concurrency": "concurrency_per_worker",
    "latency_mean": "latency_mean",
    "latency_p99": "latency_p99",
    "tail_beyond_visibility": "tail_beyond_visibility",
    "slow_median": "slow_median",
    "slow_sigma": "slow_sigma",
    "attempts_per_outlive": "attempts_per_outlive",
    "retry_slow_probability": "retry_slow_probability",
    "visibility_timeout": "visibility_timeout",
    "extension": "extension",
    "lease": "lease",
    "max_attempts": "max_attempts",
    "crash_rate": "crash_rate_per_hour",
    "crash_at": "crash_at",
    "effect": "effect",
    "effect_at": "effect_at",
    "ack_latency": "ack_latency",
    "ledger_latency": "ledger_latency",
    "retention": "retention",
    "duration": "duration",
    "slice_seconds": "slice_seconds",
    "scope_bytes": "scope_bytes",
    "operation_id_bytes": "operation_id_bytes",
    "result_bytes": "result_bytes",
    "row_bytes": "ledger_row_bytes",
    "seed": "seed",
}


def build_model(
    preset_name: str | None,
    overrides: dict[str, Any],
    metrics: tuple[str, ...],
    window: float | None,
    handler: str | None,
) -> tuple[LoadModel, dict[str, Any] | None]:
    """The LoadModel from defaults < preset < metrics < explicit options (before ``--scale``)."""
    from replaysafe.simulate import LoadModel, MetricsView, model_from_metrics, preset

    given = {_FIELDS[k]: v for k, v in overrides.items() if v is not None}
    base: LoadModel
    if preset_name is not None:
        base = preset(preset_name)
    elif "rate_per_s" in given or metrics:
        base = LoadModel(rate_per_s=given.get("rate_per_s", 1.0))
    else:
        raise click.UsageError(
            "give a load: --preset seed-test|seed-sale, --rate MSG_PER_S, or --from-metrics FILE"
        )
    # rho is either given or fitted to an attempts target: an explicit one replaces the other
    if "retry_slow_probability" in given:
        base = replace(base, attempts_per_outlive=None)
    if "attempts_per_outlive" in given:
        base = replace(base, retry_slow_probability=None)
    # explicit options shape the model the metrics are read against (visibility, slow component)
    base = replace(base, **{k: v for k, v in given.items() if k != "rate_per_s"})
    report: dict[str, Any] | None = None
    if metrics:
        if len(metrics) > 2:
            raise click.UsageError("--from-metrics takes one dump, or two (earlier, later)")
        if window is None:
            raise click.UsageError(
                "--from-metrics needs --window SECONDS: the time the counters cover (the "
                "process uptime for one dump, the time between the two dumps for two)"
            )
        views = [MetricsView.read(_read(path), handler=handler) for path in metrics]
        view = views[-1].minus(views[0]) if len(views) == 2 else views[0]
        fit = model_from_metrics(base, view, window=window, p99=given.get("latency_p99"))
        base = fit.model
        report = fit.as_json()
    return replace(base, **given), report


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read metrics from {path}: {exc}") from exc


# --------------------------------------------------------------------------- output


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    if x == 0:
        return f"0{unit}"
    if abs(x) >= 1e12 or abs(x) < 1e-2:
        return f"{x:.3g}{unit}"
    if abs(x) >= 1e4:
        return f"{x:,.0f}{unit}"
    return f"{x:,.2f}{unit}"


def _print_table(result: SimulationResult, scale: float, baseline: dict[str, float] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result.model
    console = Console()
    fit = result.latency.describe()
    title = (
        f"{m.rate_per_s:,.0f} msg/s · mean {m.latency_mean:g}s · p99 {m.latency_p99:g}s · "
        f"visibility {m.visibility_timeout:g}s ({'extended' if m.extension else 'not extended'}) "
        f"· budget {m.max_attempts} · retention {m.retention / 3600:g}h"
        + (f" · projected at {scale:g}x" if scale != 1 else "")
    )
    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    if baseline is not None:
        table.add_column("at 1x", justify="right")
    rows: list[tuple[str, str, str]] = [
        ("rate_per_s", "new operations / s", _fmt(result.rate_per_s)),
        ("outlive_visibility_fraction", "share of executions outliving visibility",
         f"{result.outlive_visibility_fraction * 100:.3g}%"),
        ("redelivery_eligible_per_s", "eligible for redelivery / s",
         _fmt(result.redelivery_eligible_per_s)),
        ("redeliveries_per_s", "redeliveries / s", _fmt(result.redeliveries_per_s)),
        ("attempts_per_outlive", "executions per op that outlived",
         _fmt(result.attempts_per_outlive)),
        ("ambiguous_executions_per_s", "executions on ambiguous ops / s",
         _fmt(result.ambiguous_executions_per_s)),
        ("budget_exhausted_per_s", "retry budget exhausted / s",
         _fmt(result.budget_exhausted_per_s)),
        ("duplicates_per_hour_no_ledger", "duplicate effects / h, no ledger",
         _fmt(result.duplicates_per_hour_no_ledger)),
        ("duplicates_per_hour_with_ledger", "duplicate effects / h, with the ledger",
         _fmt(result.duplicates_per_hour_with_ledger)),
        ("outcome_unknown_per_hour_with_ledger", "outcome unknown / h, with the ledger",
         _fmt(result.outcome_unknown_per_hour_with_ledger)),
        ("in_flight_needed", "in-flight executions needed (Little)", _fmt(result.in_flight_needed)),
        ("in_flight_needed_per_worker", "... per worker", _fmt(result.in_flight_needed_per_worker)),
        ("open_ambiguity", "open ambiguity (effected, not completed)",
         _fmt(result.open_ambiguity)),
        ("overlapping_operations", "ops redelivered while still running",
         _fmt(result.overlapping_operations)),
        ("ledger_ops_total", "ledger row operations / s", _fmt(result.ledger_ops_per_s["total"])),
        ("ledger_rows_at_horizon", "ledger rows at the horizon",
         _fmt(result.ledger_rows_at_horizon)),
        ("ledger_bytes_at_horizon", "ledger bytes at the horizon (est.)",
         _fmt(result.ledger_bytes_at_horizon / 1e9, " GB")),
    ]  # fmt: skip
    for key, label, value in rows:
        if baseline is not None:
            table.add_row(label, value, _fmt(baseline.get(key)))
        else:
            table.add_row(label, value)
    console.print(table)
    rs = result.replay_set.as_json()
    console.print(
        f"[bold]crash at t={rs['t']:g}s[/]: one worker's replay set is "
        f"{_fmt(rs['per_worker']['deliveries'])} deliveries, "
        f"{_fmt(rs['per_worker']['already_effected'])} already effected "
        f"(fleet: {_fmt(rs['fleet']['deliveries'])})"
    )
    comps = ", ".join(
        f"{c['weight']:.4%} lognormal(median {c['median_s']:.3g}s, sigma {c['sigma']:.3g})"
        for c in fit["components"]
    )
    console.print(
        f"latency fit: {comps}; retry slow probability {result.retry_slow_probability:.3f}"
    )
    if result.sampled is not None:
        s = result.sampled
        console.print(
            f"sampled {s.seconds:g}s in {s.slices:,} slices ({s.messages:,} messages): "
            f"{s.redelivery_eligible_per_s:.3g} eligible/s, "
            f"worst slice {s.worst_slice_eligible_per_s:.3g}/s, "
            f"worst hour {s.duplicates_per_hour_max:,.0f} duplicates"
        )
    console.print("\n[bold]Findings[/]")
    for finding in result.findings:
        console.print(f"- {finding}")


_BASELINE_KEYS = (
    "rate_per_s",
    "redelivery_eligible_per_s",
    "redeliveries_per_s",
    "ambiguous_executions_per_s",
    "duplicates_per_hour_no_ledger",
    "in_flight_needed",
    "ledger_rows_at_horizon",
    "ledger_bytes_at_horizon",
)


def plot(result: SimulationResult, path: str) -> None:
    """Two panels: the latency tail against the visibility line, and ambiguous executions/s over
    traffic scale x visibility timeout (the ambiguity surface)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtra("report", "matplotlib") from exc
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    from replaysafe.simulate import LatencyModel, ambiguity_surface

    m, lat = result.model, result.latency
    v = m.visibility_timeout
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)

    lo = max(1e-4, float(lat.quantile(1e-4)))
    hi = max(5 * v, float(lat.quantile(1 - 1e-7)))
    x = np.geomspace(lo, hi, 600)
    ax1.loglog(x, lat.sf(x), label="fitted S(x) = P(latency > x)", color="C0")
    if len(lat.components) > 1:
        for (w, mu, s), name in zip(lat.components, ("body", "slow provider"), strict=False):
            part = LatencyModel(((1.0, mu, s),))
            ax1.loglog(x, w * part.sf(x), "--", label=f"{name} ({w:.3%})", alpha=0.7)
    share = result.outlive_visibility_fraction
    ax1.axvline(v, color="C3", label=f"visibility {v:g}s")
    if share > 0:
        ax1.axhline(share, color="C3", ls=":", alpha=0.6)
        ax1.annotate(f"{share * 100:.3g}% outlive it\n{result.redelivery_eligible_per_s:.3g}/s",
                     (v, share), textcoords="offset points", xytext=(8, 8))  # fmt: skip
    ax1.set_ylim(max(1e-12, min(1e-9, share / 100 if share > 0 else 1e-9)), 1.5)
    ax1.set_xlabel("handler latency (s)")
    ax1.set_ylabel("share of executions slower")
    ax1.set_title("latency tail vs visibility timeout")
    ax1.legend(loc="lower left", fontsize=8)

    scales = np.geomspace(0.1, 20, 60)
    vis = np.linspace(max(1.0, v / 6), 4 * v, 60)
    _, surface = ambiguity_surface(m, scales, vis)
    positive = surface[surface > 0]
    floor = max(1e-9, float(positive.min())) if positive.size else 1e-9
    top = max(floor * 10, float(surface.max()))
    mesh = ax2.pcolormesh(vis, m.rate_per_s * scales, np.maximum(surface, floor),
                          norm=LogNorm(vmin=floor, vmax=top), shading="auto",
                          cmap="magma")  # fmt: skip
    fig.colorbar(mesh, ax=ax2, label="executions on ambiguous operations / s")
    levels = [10.0**k for k in range(-6, 7) if floor < 10.0**k < top]
    if levels:
        cs = ax2.contour(vis, m.rate_per_s * scales, surface, levels=levels, colors="white")
        ax2.clabel(cs, fmt=lambda z: f"{z:g}/s", fontsize=8)
    ax2.plot([v], [m.rate_per_s], "o", color="cyan", label="this model")
    ax2.set_yscale("log")
    ax2.set_xlabel("visibility timeout (s)")
    ax2.set_ylabel("arrival rate (msg/s)")
    ax2.set_title("ambiguity surface over load (extension off)")
    ax2.legend(loc="upper right", fontsize=8)
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise click.BadParameter(f"cannot write the plot to {path}: {exc}") from exc
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- the command


def _opt(*names: str, **kw: Any) -> Callable[[FC], FC]:
    """An option that defaults to None: "not given", so it never overrides a preset."""
    return click.option(*names, default=None, show_default=False, **kw)


@click.command("simulate")
@click.option(
    "--preset",
    "preset_name",
    type=click.Choice(["seed-test", "seed-sale"]),
    help="Start from the seed's test or sale inputs; other options override them.",
)
@_opt("--rate", type=float, help="Arrival rate: new operations per second.")
@_opt("--workers", type=click.IntRange(1), help="Consumer workers.")
@_opt("--concurrency", type=click.IntRange(1), help="In-flight executions per worker.")
@_opt("--latency-mean", type=SECONDS, help="Mean handler latency.")
@_opt("--latency-p99", type=SECONDS, help="p99 handler latency.")
@_opt(
    "--tail-beyond-visibility",
    type=float,
    help="Share of executions longer than the visibility (fits a slow-provider component).",
)
@_opt("--slow-median", type=SECONDS, help="Median of the slow-provider component [60s].")
@_opt("--slow-sigma", type=float, help="Sigma (log scale) of the slow-provider component [0.5].")
@_opt(
    "--attempts-per-outlive",
    type=float,
    help="Mean executions of an operation that outlived visibility (fits the retry slowness).",
)
@_opt(
    "--retry-slow-probability",
    type=click.FloatRange(0, 1),
    help="Chance a retry of a slow operation is slow again [0].",
)
@_opt(
    "--visibility-timeout",
    "--visibility",
    "visibility_timeout",
    type=SECONDS,
    help="Visibility timeout (or lease) [30s].",
)
@click.option(
    "--extension/--no-extension",
    default=None,
    help="The runtime extends visibility while a handler runs [off].",
)
@_opt("--lease", type=SECONDS, help="Ledger lease; heartbeat = lease/3 [the visibility].")
@_opt("--max-attempts", type=click.IntRange(1), help="Retry budget, first execution included [3].")
@_opt("--crash-rate", type=click.FloatRange(0), help="Worker crashes per hour, fleet-wide [0].")
@_opt("--crash-at", type=SECONDS, help="When the replay set is evaluated [end of the run].")
@_opt(
    "--effect",
    type=click.Choice(["keyed", "transactional", "unkeyed", "unkeyed-retry"]),
    help="The effect behind the ledger [keyed].",
)
@_opt(
    "--effect-at",
    type=click.FloatRange(0, 1),
    help="Where in a run the effect becomes true, 0..1 [1 = at the end].",
)
@_opt("--ack-latency", type=SECONDS, help="Effect to broker completion [20ms].")
@_opt("--ledger-latency", type=SECONDS, help="Effect to ledger complete [5ms].")
@_opt("--retention", type=SECONDS, help="Dedupe retention / replay horizon [24h].")
@_opt("--duration", type=SECONDS, help="Simulated time [1h].")
@_opt("--slice-seconds", type=SECONDS, help="Sampling slice [1s].")
@_opt("--scope-bytes", type=click.IntRange(0), help="Ledger scope length [16].")
@_opt("--operation-id-bytes", type=click.IntRange(0), help="Operation id length [40].")
@_opt("--result-bytes", type=click.IntRange(0), help="Stored result length [0].")
@_opt("--row-bytes", type=float, help="Measured bytes per ledger row [estimate].")
@_opt("--seed", type=int, help="Seed of the sampled run [0].")
@click.option("--no-sample", is_flag=True, help="Closed form only: skip the sampled run.")
@click.option(
    "--from-metrics",
    "metrics",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="A Prometheus dump of replaysafe's metrics (twice: earlier, later).",
)
@_opt("--window", type=SECONDS, help="Seconds the metrics counters cover.")
@_opt("--handler", help="Read only this handler's metrics.")
@click.option(
    "--scale",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Project this many times the traffic.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outputs as JSON.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="Write the tail and the ambiguity surface to this image (needs matplotlib).",
)
def simulate_command(
    preset_name: str | None,
    metrics: tuple[str, ...],
    window: float | None,
    handler: str | None,
    scale: float,
    no_sample: bool,
    as_json: bool,
    plot_path: str | None,
    **overrides: Any,
) -> None:
    """Model the ambiguity window under a load: redeliveries, executions on ambiguous
    operations, duplicates without and with the ledger, concurrency and ledger size."""  # fmt: skip
    from replaysafe.simulate import simulate

    try:
        model, metrics_report = build_model(preset_name, overrides, metrics, window, handler)
        projected = model.scaled(scale) if scale != 1 else model
        result = simulate(projected, sample=not no_sample)
        baseline = None
        if scale != 1:
            base = simulate(model, sample=False).as_json()
            baseline = {k: base[k] for k in _BASELINE_KEYS}
            baseline["in_flight_needed_per_worker"] = base["in_flight_needed_per_worker"]
        if plot_path is not None:
            plot(result, plot_path)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        out = result.as_json()
        out["scale"] = scale
        if baseline is not None:
            out["baseline"] = baseline
        if metrics_report is not None:
            out["from_metrics"] = metrics_report
        if plot_path is not None:
            out["plot"] = plot_path
        click.echo(json.dumps(out, allow_nan=False, default=_json_default))
        return
    if metrics_report is not None:
        click.echo(
            f"from metrics: {metrics_report['measured_rate_per_s']:.4g} msg/s over "
            f"{metrics_report['window_s']:g}s, "
            f"mean {metrics_report['measured_latency_mean']:.4g}s, "
            f"p99 {metrics_report['measured_latency_p99']:.4g}s; "
            + "; ".join(metrics_report["notes"])
        )
    _print_table(result, scale, baseline)
    if plot_path is not None:
        click.echo(f"plot written to {plot_path}")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
