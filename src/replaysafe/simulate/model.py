"""The simulation: ``simulate()`` and what it returns (sections 2-7 of the package docstring).

Closed-form outputs over the fitted latency and the redelivery chain (``latency``), the replay set
of a crash, the ledger's size and row operations, and one aggregated sample of the process per
time slice for the variation (worst second, worst hour). numpy is loaded by ``latency._load()``;
the functions here import it locally after that call, so importing this module never imports it.
"""

# ruff: noqa: RUF003 - the formulas are written in mathematical notation (λ, ρ, σ, −)

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from replaysafe.simulate.latency import (
    LatencyModel,
    _attempts_per_outlive,
    _fit_rho,
    _load,
    _survive_chain,
    fit_latency,
    redelivery_chain,
)
from replaysafe.simulate.load import HOUR, LoadModel
from replaysafe.simulate.report import _findings

if TYPE_CHECKING:
    from replaysafe.simulate.latency import FloatArray

#: fixed bytes of one ledger row and its index entries (see the package docstring, section 6)
ROW_FIXED_BYTES = 214
ROW_PAGE_OVERHEAD = 1.10
#: slices drawn per numpy call (a day of one-second slices): bounds memory for long runs
CHUNK_SLICES = 86_400


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class ReplaySet:
    """What a crash at ``t`` sends back (fleet-wide; divide by workers for one worker)."""

    t: float
    deliveries: float
    already_effected: float
    duplicates_no_ledger: float
    duplicates_with_ledger: float
    outcome_unknown_with_ledger: float
    workers: int

    def as_json(self) -> dict[str, Any]:
        fleet = {
            "deliveries": self.deliveries,
            "already_effected": self.already_effected,
            "duplicates_no_ledger": self.duplicates_no_ledger,
            "duplicates_with_ledger": self.duplicates_with_ledger,
            "outcome_unknown_with_ledger": self.outcome_unknown_with_ledger,
        }
        return {
            "t": self.t,
            "fleet": fleet,
            "per_worker": {k: v / self.workers for k, v in fleet.items()},
        }


@dataclass(frozen=True, slots=True)
class Sampled:
    """Totals of one aggregated sample of the process over ``duration``."""

    seconds: float
    slices: int
    messages: int
    outlived: int
    redeliveries: int
    executions: int
    ambiguous_executions: int
    budget_exhausted: int
    crashes: int
    crash_replays: int
    duplicates_no_ledger: int
    redelivery_eligible_per_s: float
    ambiguous_executions_per_s: float
    worst_slice_eligible_per_s: float
    duplicates_per_hour_mean: float
    duplicates_per_hour_max: float
    ledger_rows_at_end: int
    wall_seconds: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """The outputs (see the package docstring for every formula). ``as_json()`` is what
    ``replaysafe simulate --json`` prints."""

    model: LoadModel
    latency: LatencyModel
    retry_slow_probability: float
    rate_per_s: float
    outlive_visibility_fraction: float
    outlive_visibility_per_s: float
    redelivery_eligible_per_s: float
    redeliveries_per_s: float
    attempts_per_outlive: float
    ambiguous_executions_per_s: float
    budget_exhausted_per_s: float
    executions_per_s: float
    redelivery_chain: tuple[float, ...]
    in_flight_needed: float
    utilization: float | None
    open_ambiguity: float
    overlapping_operations: float
    crash_replays_per_s: float
    replay_set: ReplaySet
    duplicates_per_hour_no_ledger: float
    duplicates_per_hour_with_ledger: float
    outcome_unknown_per_hour_with_ledger: float
    ledger_ops_per_s: dict[str, float]
    visibility_extensions_per_s: float
    ledger_row_bytes: float
    ledger_rows_at_horizon: float
    ledger_bytes_at_horizon: float
    extension_effect: dict[str, dict[str, float]]
    sampled: Sampled | None
    findings: tuple[str, ...] = field(default=())

    @property
    def in_flight_needed_per_worker(self) -> float:
        return self.in_flight_needed / self.model.workers

    def as_json(self) -> dict[str, Any]:
        return {
            "rate_per_s": self.rate_per_s,
            "outlive_visibility_fraction": self.outlive_visibility_fraction,
            "outlive_visibility_per_s": self.outlive_visibility_per_s,
            "redelivery_eligible_per_s": self.redelivery_eligible_per_s,
            "redeliveries_per_s": self.redeliveries_per_s,
            "attempts_per_outlive": self.attempts_per_outlive,
            "ambiguous_executions_per_s": self.ambiguous_executions_per_s,
            "budget_exhausted_per_s": self.budget_exhausted_per_s,
            "executions_per_s": self.executions_per_s,
            "redelivery_chain": list(self.redelivery_chain),
            "retry_slow_probability": self.retry_slow_probability,
            "in_flight_needed": self.in_flight_needed,
            "in_flight_needed_per_worker": self.in_flight_needed_per_worker,
            "utilization": self.utilization,
            "open_ambiguity": self.open_ambiguity,
            "overlapping_operations": self.overlapping_operations,
            "crash_replays_per_s": self.crash_replays_per_s,
            "replay_set_at_crash": self.replay_set.as_json(),
            "duplicates_per_hour_no_ledger": self.duplicates_per_hour_no_ledger,
            "duplicates_per_hour_with_ledger": self.duplicates_per_hour_with_ledger,
            "outcome_unknown_per_hour_with_ledger": self.outcome_unknown_per_hour_with_ledger,
            "ledger_ops_per_s": dict(self.ledger_ops_per_s),
            "visibility_extensions_per_s": self.visibility_extensions_per_s,
            "ledger_row_bytes": self.ledger_row_bytes,
            "ledger_rows_at_horizon": self.ledger_rows_at_horizon,
            "ledger_bytes_at_horizon": self.ledger_bytes_at_horizon,
            "extension_effect": {k: dict(v) for k, v in self.extension_effect.items()},
            "latency_fit": self.latency.describe(),
            "sampled": None if self.sampled is None else self.sampled.as_json(),
            "findings": list(self.findings),
            "inputs": self.model.as_json(),
        }


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class _Overlap:
    """Section 2 numbers for one visibility regime."""

    chain: FloatArray
    eligible: float
    redeliveries: float
    attempts: float
    ambiguous: float
    exhausted: float
    extra_executions: float  # per second, beyond the first execution of each operation


def _overlap(lat: LatencyModel, m: LoadModel, rho: float, extended: bool) -> _Overlap:
    import numpy as np  # simulate() called _load(): present

    lam, b = m.rate_per_s, m.max_attempts
    if extended:
        zero = np.zeros(b)
        return _Overlap(zero, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
    chain = np.asarray(redelivery_chain(lat, m.visibility_timeout, b, rho), dtype=float)
    p1 = float(chain[0])
    attempts = _attempts_per_outlive(chain)
    return _Overlap(
        chain=chain,
        eligible=lam * p1,
        redeliveries=lam * float(np.sum(chain)),
        attempts=attempts,
        ambiguous=lam * p1 * attempts,
        exhausted=lam * float(chain[-1]),
        extra_executions=lam * float(np.sum(chain[:-1])),
    )


def _row_bytes(m: LoadModel) -> float:
    if m.ledger_row_bytes is not None:
        return m.ledger_row_bytes
    raw = ROW_FIXED_BYTES + 2 * (m.scope_bytes + m.operation_id_bytes) + m.result_bytes
    return raw * ROW_PAGE_OVERHEAD


def simulate(model: LoadModel, *, sample: bool = True) -> SimulationResult:
    """Fit the latency, compute every output in closed form and, with ``sample``, draw one
    aggregated sample of the process over ``model.duration`` (section 7)."""
    _load()
    import numpy as np  # present: _load() raised MissingExtra otherwise

    m = model
    lat = fit_latency(
        m.latency_mean,
        m.latency_p99,
        visibility=m.visibility_timeout,
        tail_beyond_visibility=m.tail_beyond_visibility,
        slow_median=m.slow_median,
        slow_sigma=m.slow_sigma,
    )
    v, b, lam, w = m.visibility_timeout, m.max_attempts, m.rate_per_s, m.workers
    if m.attempts_per_outlive is not None:
        rho = _fit_rho(lat, v, b, m.attempts_per_outlive)
    else:
        rho = m.retry_slow_probability or 0.0

    off = _overlap(lat, m, rho, extended=False)
    on = _overlap(lat, m, rho, extended=True)
    cur = on if m.extension else off

    mean_l = lat.mean()
    p_out = float(lat.sf(v))
    retry_mean = rho * lat.mean_given_above(v) + (1 - rho) * mean_l
    busy_first = lam * mean_l
    busy_retry = cur.extra_executions * retry_mean
    in_flight = busy_first + busy_retry + lam * m.ack_latency
    capacity = None if m.concurrency_per_worker is None else m.concurrency_per_worker * w
    utilization = None if capacity is None else in_flight / capacity

    # open populations (section 3)
    open_ambiguity = lam * ((1 - m.effect_at) * mean_l + m.ack_latency)
    if m.extension or p_out <= 0:
        overlapping = 0.0
    else:
        t = np.linspace(v, b * v, 20_001)
        y = _survive_chain(lat, t, v, b, rho)
        overlapping = lam * float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(t)))  # trapezoid rule

    # a crash at t (section 4)
    t_crash = m.duration if m.crash_at is None else m.crash_at
    replay_set = _replay_set(lat, m, busy_first + busy_retry, t_crash)
    steady = _replay_set(lat, m, busy_first + busy_retry, math.inf)
    crashes_per_s = m.crash_rate_per_hour / HOUR
    crash_replays = crashes_per_s * steady.deliveries / w
    crash_dups = crashes_per_s * steady.duplicates_no_ledger / w
    crash_dups_ledger = crashes_per_s * steady.duplicates_with_ledger / w
    crash_unknown = crashes_per_s * steady.outcome_unknown_with_ledger / w
    # under effectively-once the visibility is extended: only crashes redeliver
    eo_crash_replays = crashes_per_s * lam * (mean_l + m.ack_latency + m.ledger_latency) / w

    # the ledger (section 6)
    extends = lam * lat.expected_floor(m.heartbeat)
    ledger_ops = {
        "claims": lam + eo_crash_replays,
        "completes": lam,
        "extends": extends,
        "purges": lam,
        "quarantines": crash_unknown,
    }
    ledger_ops["total"] = sum(ledger_ops.values())
    row_bytes = _row_bytes(m)
    rows = lam * m.retention + lam * (mean_l + m.ledger_latency)

    def regime(o: _Overlap) -> dict[str, float]:
        # each regime has its own in-flight work, so its own crash replay set
        busy = busy_first + o.extra_executions * retry_mean
        replays = _replay_set(lat, m, busy, math.inf)
        replays_per_s = crashes_per_s * replays.deliveries / w
        return {
            "redelivery_eligible_per_s": o.eligible + replays_per_s,
            "redeliveries_per_s": o.redeliveries + replays_per_s,
            "ambiguous_executions_per_s": o.ambiguous + 2 * replays_per_s,
            "duplicates_per_hour_no_ledger": HOUR
            * (o.extra_executions + crashes_per_s * replays.duplicates_no_ledger / w),
            "in_flight_needed": busy + lam * m.ack_latency,
        }

    extension_effect = {"off": regime(off), "on": regime(on)}
    extension_effect["on"]["visibility_extensions_per_s"] = extends
    extension_effect["off"]["visibility_extensions_per_s"] = 0.0

    result = SimulationResult(
        model=m,
        latency=lat,
        retry_slow_probability=rho,
        rate_per_s=lam,
        outlive_visibility_fraction=p_out,
        outlive_visibility_per_s=lam * p_out,
        redelivery_eligible_per_s=cur.eligible + crash_replays,
        redeliveries_per_s=cur.redeliveries + crash_replays,
        attempts_per_outlive=off.attempts,
        ambiguous_executions_per_s=cur.ambiguous + 2 * crash_replays,
        budget_exhausted_per_s=cur.exhausted,
        executions_per_s=lam + cur.extra_executions + crash_replays,
        redelivery_chain=tuple(float(p) for p in off.chain),
        in_flight_needed=in_flight,
        utilization=utilization,
        open_ambiguity=open_ambiguity,
        overlapping_operations=overlapping,
        crash_replays_per_s=crash_replays,
        replay_set=replay_set,
        duplicates_per_hour_no_ledger=HOUR * (cur.extra_executions + crash_dups),
        duplicates_per_hour_with_ledger=HOUR * crash_dups_ledger,
        outcome_unknown_per_hour_with_ledger=HOUR * crash_unknown,
        ledger_ops_per_s=ledger_ops,
        visibility_extensions_per_s=extends if m.extension else 0.0,
        ledger_row_bytes=row_bytes,
        ledger_rows_at_horizon=rows,
        ledger_bytes_at_horizon=rows * row_bytes,
        extension_effect=extension_effect,
        sampled=None,
    )
    sampled = _sample(result, steady) if sample else None
    return replace(result, sampled=sampled, findings=_findings(result))


def _replay_set(lat: LatencyModel, m: LoadModel, busy: float, t: float) -> ReplaySet:
    """Section 4: what a whole-fleet crash at ``t`` sends back."""
    lam, mean_l = m.rate_per_s, lat.mean()
    mt = mean_l if math.isinf(t) else lat.mean_min(t)
    warm = mt / mean_l if mean_l > 0 else 0.0
    ack = lam * m.ack_latency if t > 0 else 0.0
    deliveries = busy * warm + ack
    effected = lam * (1 - m.effect_at) * mt + ack
    claims_held = lam * mt
    unrecorded = lam * ((1 - m.effect_at) * mt + (m.ledger_latency if t > 0 else 0.0))
    return ReplaySet(
        t=t,
        deliveries=deliveries,
        already_effected=effected,
        duplicates_no_ledger=effected,
        duplicates_with_ledger=unrecorded if m.effect == "unkeyed-retry" else 0.0,
        outcome_unknown_with_ledger=claims_held if m.effect == "unkeyed" else 0.0,
        workers=m.workers,
    )


# --------------------------------------------------------------------------- sampling


def _sample(r: SimulationResult, steady: ReplaySet) -> Sampled:
    """Section 7: one aggregated sample, a chunk of slices per numpy call."""
    import numpy as np  # simulate() called _load(): present

    m = r.model
    started = time.perf_counter()
    rng = np.random.default_rng(m.seed)
    dt = m.slice_seconds
    n_slices = max(1, math.ceil(m.duration / dt - 1e-9))
    last_width = m.duration - (n_slices - 1) * dt
    chain = np.zeros(m.max_attempts) if m.extension else np.asarray(r.redelivery_chain)
    # Poisson splitting: the operations arriving in a slice that are redelivered exactly j times
    # are independent Poisson(λ·dt·P(R = j)) draws, P(R = j) = p_j − p_{j+1} (p_0 = 1, p_{B+1} = 0)
    levels = np.concatenate(([1.0], chain, [0.0]))
    p_exact = np.clip(levels[:-1] - levels[1:], 0.0, 1.0)
    b = m.max_attempts
    crash_rate = m.crash_rate_per_hour / HOUR
    replay_mean = steady.deliveries / m.workers
    effected_share = steady.already_effected / steady.deliveries if steady.deliveries > 0 else 0.0
    effected_share = min(1.0, effected_share)
    keep_from = m.duration - m.retention  # arrivals after this are still in the ledger at the end
    totals = dict.fromkeys(
        ("messages", "outlived", "redeliveries", "executions", "ambiguous", "exhausted",
         "crashes", "replays", "dups", "rows"),
        0,
    )  # fmt: skip
    worst_second = 0.0
    hour_dups: dict[int, int] = {}
    zeros = np.zeros(min(CHUNK_SLICES, n_slices), dtype=np.int64)
    for start in range(0, n_slices, CHUNK_SLICES):
        n = min(CHUNK_SLICES, n_slices - start)
        width = np.full(n, dt)
        if start + n == n_slices:
            width[-1] = last_width
        t0 = (start + np.arange(n)) * dt
        lam_dt = m.rate_per_s * width
        arrivals = zeros[:n].copy()
        outlived = zeros[:n].copy()
        redeliv = zeros[:n].copy()
        extra = zeros[:n].copy()
        exhausted = zeros[:n]
        for j, pj in enumerate(p_exact):
            if pj <= 0:
                continue
            nj = rng.poisson(lam_dt * pj)
            arrivals += nj
            if j >= 1:
                outlived += nj
                redeliv += j * nj
                extra += min(j, b - 1) * nj  # the (B+1)-th delivery is quarantined, not run
            if j == b:
                exhausted = nj
        if crash_rate > 0:
            crashes = rng.poisson(crash_rate * width)
            effected = rng.poisson(crashes * replay_mean * effected_share)
            replays = effected + rng.poisson(crashes * replay_mean * (1.0 - effected_share))
        else:
            crashes = replays = effected = zeros[:n]
        dups = extra + effected
        eligible = outlived + replays
        worst_second = max(worst_second, float(np.max(eligible / width)))
        hours = (t0 // HOUR).astype(np.int64)
        base = int(hours[0])
        for h, s in enumerate(np.bincount(hours - base, weights=dups)):
            hour_dups[base + h] = hour_dups.get(base + h, 0) + int(s)
        totals["messages"] += int(arrivals.sum())
        totals["outlived"] += int(outlived.sum())
        totals["redeliveries"] += int(redeliv.sum() + replays.sum())
        totals["executions"] += int(arrivals.sum() + extra.sum() + replays.sum())
        totals["ambiguous"] += int(outlived.sum() + extra.sum() + 2 * replays.sum())
        totals["exhausted"] += int(exhausted.sum())
        totals["crashes"] += int(crashes.sum())
        totals["replays"] += int(replays.sum())
        totals["dups"] += int(dups.sum())
        totals["rows"] += int(arrivals[t0 >= keep_from].sum())
    full_hours = [v for h, v in hour_dups.items() if (h + 1) * HOUR <= m.duration + 1e-9]
    per_hour_mean = totals["dups"] * HOUR / m.duration
    return Sampled(
        seconds=m.duration,
        slices=n_slices,
        messages=totals["messages"],
        outlived=totals["outlived"],
        redeliveries=totals["redeliveries"],
        executions=totals["executions"],
        ambiguous_executions=totals["ambiguous"],
        budget_exhausted=totals["exhausted"],
        crashes=totals["crashes"],
        crash_replays=totals["replays"],
        duplicates_no_ledger=totals["dups"],
        redelivery_eligible_per_s=(totals["outlived"] + totals["replays"]) / m.duration,
        ambiguous_executions_per_s=totals["ambiguous"] / m.duration,
        worst_slice_eligible_per_s=worst_second,
        duplicates_per_hour_mean=per_hour_mean,
        duplicates_per_hour_max=float(max(full_hours)) if full_hours else per_hour_mean,
        ledger_rows_at_end=totals["rows"],
        wall_seconds=time.perf_counter() - started,
    )
