"""The findings: what a ``SimulationResult`` means, in sentences (``replaysafe simulate``
prints them under the table, ``--json`` lists them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from replaysafe.simulate.load import HOUR

if TYPE_CHECKING:
    from replaysafe.simulate.model import SimulationResult

#: below this many executions/s on ambiguous operations a load counts as effectively exactly-once
EFFECTIVELY_ZERO_PER_S = 0.01


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _bytes(x: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def _findings(r: SimulationResult) -> tuple[str, ...]:
    m = r.model
    out: list[str] = []
    v = m.visibility_timeout
    off = r.extension_effect["off"]
    verdict = (
        "effectively exactly-once at this load (fewer than 0.01 executions/s on ambiguous "
        "operations)"
        if off["ambiguous_executions_per_s"] < EFFECTIVELY_ZERO_PER_S
        else "rare ambiguity is no longer rare enough to ignore"
    )
    out.append(
        f"{r.outlive_visibility_fraction * 100:.3g}% of executions outlive the {v:g}s "
        f"visibility: {_si(off['redelivery_eligible_per_s'])}/s redelivered while still running, "
        f"{_si(off['ambiguous_executions_per_s'])}/s executions on operations in an ambiguous "
        f"state ({r.attempts_per_outlive:.2f} each), "
        f"{_si(off['duplicates_per_hour_no_ledger'])} duplicate effects/hour without a ledger: "
        + verdict
        + (" (visibility extension is on: the overlap is avoided)" if m.extension else "")
    )
    if r.utilization is not None and r.utilization > 1:
        out.append(
            f"the load needs {_si(r.in_flight_needed)} executions in flight (Little's law) but "
            f"{m.workers} workers x {m.concurrency_per_worker} allow "
            f"{m.workers * (m.concurrency_per_worker or 0)}: the backlog grows without bound and "
            "queueing makes every number here worse"
        )
    out.append(
        f"the ledger holds {_si(r.ledger_rows_at_horizon)} rows "
        f"(~{_bytes(r.ledger_bytes_at_horizon)}) at a {m.retention / HOUR:g} h retention, and "
        f"takes {_si(r.ledger_ops_per_s['total'])} row operations/s"
    )
    if m.max_attempts * v > m.retention:
        out.append(
            f"the retry budget can outlive the horizon ({m.max_attempts} x {v:g}s > "
            f"{m.retention:g}s): late redeliveries are refused as beyond_horizon"
        )
    if r.outcome_unknown_per_hour_with_ledger > 0:
        out.append(
            f"{_si(r.outcome_unknown_per_hour_with_ledger)} operations/hour end as "
            "outcome_unknown after crashes (unkeyed effect): someone has to decide each one"
        )
    return tuple(out)
