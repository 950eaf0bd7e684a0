"""Chaos output: the issue's JSON, and an HTML report with embedded PNG charts.

The HTML report shows the matrix (guarantee x fault, green when the run passes the bar, red when
it does not, grey when invalid), the distribution of the ambiguity window (EFFECTED -> COMPLETED,
from the sink journal and the recorded completions), and the timeline of one duplicate chain
under at-least-once beside the same operation under effectively-once. Charts need matplotlib
(extra ``report``), imported only here and only when an HTML report is asked for.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from replaysafe.chaos.checker import RunResult, pass_bar
from replaysafe.errors import MissingExtra

if TYPE_CHECKING:
    from replaysafe.chaos.cells import Matrix


def write_json(matrix: Matrix, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(matrix.as_json(), indent=2) + "\n")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("report", "matplotlib") from None
    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _status(r: RunResult) -> str:
    if not r.valid:
        return "invalid"
    return "fail" if pass_bar(r) else "pass"


def _matrix_png(plt: Any, runs: list[RunResult]) -> str:
    rows = sorted({(r.guarantee, r.effect) for r in runs})
    faults = sorted({r.fault for r in runs})
    colour = {"pass": (0.55, 0.8, 0.55), "fail": (0.9, 0.45, 0.45), "invalid": (0.7, 0.7, 0.7)}
    grid = [[(1.0, 1.0, 1.0)] * len(faults) for _ in rows]
    labels = [[""] * len(faults) for _ in rows]
    for r in runs:
        i, j = rows.index((r.guarantee, r.effect)), faults.index(r.fault)
        grid[i][j] = colour[_status(r)]
        labels[i][j] = f"L{r.lost} D{r.duplicates}"
    fig, ax = plt.subplots(figsize=(max(6, len(faults) * 1.1), max(2, len(rows) * 0.6)))
    ax.imshow(grid, aspect="auto")
    ax.set_xticks(range(len(faults)), faults, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{g} / {e}" for g, e in rows], fontsize=8)
    for i in range(len(rows)):
        for j in range(len(faults)):
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=6)
    ax.set_title("guarantee x fault (green: passes the bar; red: fails; grey: invalid)")
    data = _png(fig)
    plt.close(fig)
    return data


def _window_png(plt: Any, runs: list[RunResult]) -> str | None:
    windows = [w * 1000 for r in runs for w in r.windows]
    if not windows:
        return None
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.hist(windows, bins=50)
    ax.set_xlabel("ambiguity window EFFECTED -> COMPLETED (ms)")
    ax.set_ylabel("operations")
    ax.set_title(f"{len(windows)} operations")
    data = _png(fig)
    plt.close(fig)
    return data


def _chain_png(plt: Any, runs: list[RunResult]) -> str | None:
    """One duplicated operation under at-least-once beside the same operation's attempts under
    effectively-once (same fault, same seed: the same operation was hit). One row per attempt at
    the sink, labelled with its outcome, fencing token and worker pid; time in milliseconds from
    the operation's first attempt. Blue: the first effect; red: an effect beyond the first (a
    duplicate charge); grey: no effect (answered from the key, fenced, refused)."""
    alo = next((r for r in runs if r.guarantee == "at-least-once" and r.duplicate_chain), None)
    if alo is None:
        return None
    op = alo.duplicate_chain[0].op
    eo = next((r for r in runs if r.guarantee == "effectively-once" and r.fault == alo.fault), None)
    eo_chain = [a for a in (eo.attempts_of(op) if eo is not None else [])]
    panels = (
        (f"at-least-once / {alo.effect} / {alo.fault}", alo.duplicate_chain),
        (f"effectively-once / {eo.effect if eo else '-'} / {alo.fault}", eo_chain),
    )
    rows = max(len(chain) for _, chain in panels) or 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.45 * rows))
    for ax, (title, chain) in zip(axes, panels, strict=True):
        ax.set_title(f"{title}\n{op}: {len(chain)} attempt(s) at the sink", fontsize=9)
        ax.set_xlabel("ms since the first attempt")
        if not chain:
            ax.set_yticks([])
            continue
        t0 = min(a.started for a in chain)
        span = max(max(a.ended for a in chain) - t0, 0.001) * 1000
        effects = 0
        labels = []
        for n, a in enumerate(chain):
            if a.effect:
                effects += 1
            color = "tab:grey" if not a.effect else "tab:blue" if effects == 1 else "tab:red"
            width = max((a.ended - a.started) * 1000, span / 150)  # a short call stays visible
            ax.barh(n, width, left=(a.started - t0) * 1000, color=color, height=0.6)
            token = "no token" if a.token is None else f"token {a.token}"
            labels.append(f"#{n + 1} {a.outcome}, {token}, pid {a.pid}")
        ax.set_yticks(range(len(chain)), labels, fontsize=7)
        ax.set_ylim(rows - 0.5, -0.5)  # first attempt on top
        ax.set_xlim(-span * 0.02, span * 1.05)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def write_html(matrix: Matrix, path: str | Path) -> None:
    plt = _pyplot()
    runs = matrix.runs
    parts = [
        "<!doctype html><meta charset=utf-8><title>replaysafe chaos</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;font-size:12px}"
        ".pass{background:#cfc}.fail{background:#fcc}.invalid{background:#ddd}</style>",
        f"<h1>replaysafe chaos: {html.escape(matrix.broker)} + {html.escape(matrix.ledger)}</h1>",
        f"<p>{matrix.ops} operations per run, seed {matrix.seed}, {len(runs)} runs, "
        f"{matrix.seconds:.0f} s</p>",
        f'<h2>Matrix</h2><img src="data:image/png;base64,{_matrix_png(plt, runs)}">',
    ]
    window = _window_png(plt, runs)
    if window:
        parts.append(f'<h2>Ambiguity window</h2><img src="data:image/png;base64,{window}">')
    chain = _chain_png(plt, runs)
    if chain:
        parts.append(
            "<h2>One duplicate chain: at-least-once beside effectively-once</h2>"
            f'<img src="data:image/png;base64,{chain}">'
        )
    keys = list(runs[0].as_json()) if runs else []
    parts.append("<h2>Runs</h2><table><tr>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>")
    for r in runs:
        cells = "".join(f"<td>{html.escape(str(v))}</td>" for v in r.as_json().values())
        parts.append(f'<tr class="{_status(r)}">{cells}</tr>')
    parts.append("</table>")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(parts))
