"""The load model of the ambiguity window: ``replaysafe simulate``.

"At 10x scale, rare ambiguity stops being rare enough to ignore." This module turns a load
(arrival rate, handler latency, visibility timeout, retry budget, crash rate, retention) into the
numbers a team needs *before* the sale: how many operations outlive the broker's visibility and
are redelivered while still running, how many handler executions land on operations already in an
ambiguous state, how many duplicate effects that makes per hour without a ledger and with one, how
much in-flight concurrency the load needs, and how big the ledger grows over its horizon.

Everything is closed form over the fitted latency distribution (exact expectations), plus a
vectorised, aggregated sample of the same process per time slice (per-second buckets by default:
Poisson arrivals, binomial thinning through the redelivery chain, Poisson crashes) for the
variation: worst second, worst hour. There is no per-message loop: a year of 18,000 msg/s
(5.7e11 messages) is 3.2e7 one-second buckets, drawn a day at a time.

Notation
--------
``λ`` ``rate_per_s`` (new operations per second) · ``L`` the latency of one handler execution,
``S(x) = P(L > x)`` its survival function, ``E[L]`` its mean · ``V`` ``visibility_timeout`` ·
``B`` ``max_attempts`` (the retry budget: executions, the first included) · ``ρ``
``retry_slow_probability`` · ``f`` ``effect_at`` · ``a`` ``ack_latency`` · ``ℓ``
``ledger_latency`` · ``W`` ``workers`` · ``c`` ``crash_rate_per_hour / 3600`` · ``R``
``retention`` · ``h = lease / 3`` the runtime's heartbeat · ``Φ``, ``Q = 1 - Φ`` the standard
normal CDF and tail · ``z = Φ⁻¹(0.99) ≈ 2.3263``.

1. Latency
~~~~~~~~~~
*Lognormal from mean m and p99 q*: ``ln L ~ N(μ, σ²)`` with ``E[L] = exp(μ + σ²/2) = m`` and
``exp(μ + zσ) = q`` give ``σ²/2 − zσ + ln(q/m) = 0``; the smaller root
``σ = z − sqrt(z² − 2 ln(q/m))``, ``μ = ln m − σ²/2``. It exists only when
``q/m ≤ exp(z²/2) ≈ 14.96``: a lognormal with mean m cannot have a heavier p99 than that.

*Tail mixture* (``tail_beyond_visibility`` given): ``F = (1−w)·LN(μ_b, σ_b) + w·LN(ln M_s, σ_s)``,
a lognormal body plus a slow-provider component with median ``M_s`` (``slow_median``) and
``σ_s`` (``slow_sigma``). For each weight ``w`` the body is refitted so the *mixture* keeps mean
m and p99 q: ``m_b = (m − w·E_s)/(1−w)`` with ``E_s = M_s·exp(σ_s²/2)``, the body's CDF at q is
``c_b = (0.99 − w·F_s(q))/(1−w)`` and ``σ_b``, ``μ_b`` follow as above with ``z_b = Φ⁻¹(c_b)``.
``w`` is then solved (bisection) so that ``S(V) = (1−w)·S_b(V) + w·S_s(V)`` equals the stated
share. The fit fails loudly when no ``w`` can do it.

For a lognormal component, ``S(x) = Q((ln x − μ)/σ)`` and the partial mean
``E[L; L > x] = exp(μ + σ²/2)·Q((ln x − μ − σ²)/σ)``; mixtures weight them. ``E[min(L, t)] =
E[L] − E[L; L > t] + t·S(t)``.

2. The overlap chain (visibility not extended: ``extension=False``)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A copy received at 0 is visible again at V unless completed; the broker hands it to another
consumer *while the first execution still runs* (the SQS leak). Execution ``i`` starts at
``(i−1)·V``; any execution that finishes completes the message (a delete with any receipt);
the ``(B+1)``-th delivery is quarantined (``max_attempts``) and completed, without running. The
first execution's latency is ``L ~ F``. A retry of an operation that outlived visibility hits the
same slowdown with probability ρ (its latency is then drawn from ``L | L > V``), otherwise it is
a fresh draw from F: ``S_r(x) = ρ·S(max(x, V))/S(V) + (1−ρ)·S(x)``. The probability that the
message is still not completed at ``j·V`` -- i.e. that it is delivered a ``(j+1)``-th time -- is

    p_j = S(jV) · Π_{k=1}^{j−1} S_r(kV)                       (j = 1 … B)

and the per-second rates follow:

    outlive_visibility_fraction = p_1 = S(V)
    redelivery_eligible_per_s   = λ·p_1
    redeliveries_per_s          = λ·Σ_{j=1}^{B} p_j
    executions per operation    = 1 + Σ_{j=1}^{B−1} p_j
    attempts_per_outlive        = 1 + Σ_{j=1}^{B−1} p_j / p_1   (executions of an op that outlived)
    ambiguous_executions_per_s  = λ·p_1·attempts_per_outlive
    budget_exhausted_per_s      = λ·p_B                          (quarantined as max_attempts)

When ``attempts_per_outlive`` is given (the seed's 2.3) ρ is solved (bisection) so the chain
reproduces it; ρ = 0 is the independent-retries lower bound. With ``extension=True`` the runtime
extends visibility every heartbeat while the handler runs, so no ``p_j`` redelivery happens: only
crashes return messages early.

3. Little's law and the open populations
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    in_flight_needed = λ·E[L] + λ·Σ_{j=1}^{B−1} p_j·E_r + λ·a,
    E_r = ρ·E[L | L > V] + (1−ρ)·E[L]                            (mean latency of a retry)
    open_ambiguity   = λ·((1−f)·E[L] + a)      effects done, broker completion not yet recorded
    overlapping_operations = λ·∫_V^{BV} P(T_c > t) dt              (redelivered, not yet completed)
    P(T_c > t) = S(t) · Π_{i=2}^{k(t)} S_r(t − (i−1)V),  k(t) = min(B, ⌊t/V⌋ + 1)

4. A crash at time t (the replay set)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Load starts at 0. The executions in flight at t are ``in_flight_needed · E[min(L, t)]/E[L]`` (the
warm-up of Little's law); all of them are delivered again after their visibility (a crash settles
nothing). Of those, ``λ·((1−f)·E[min(L, t)] + a)`` had already applied their effect: replaying them
duplicates the effect without a ledger. With the ledger (effectively-once: claim, effect, ledger
complete, ack) an effect whose ledger row committed is answered ``AlreadyDone``; the claims still
held (``λ·E[min(L, t)]``) come back as recovered claims: a keyed effect re-runs under the same
idempotency key and a transactional one rolled back (no duplicate); an unkeyed effect is
quarantined ``outcome_unknown`` (default) or, with ``on_unknown="retry"``, re-run, duplicating the
``λ·((1−f)·E[min(L, t)] + ℓ)`` whose effect happened before the ledger recorded it. A worker crash
is the fleet's replay set divided by W; crashes arrive at rate c (steady state, t → ∞).

5. Duplicates per hour
~~~~~~~~~~~~~~~~~~~~~~
Without a ledger (at-least-once) every extra execution applies its effect again (no deadline cuts
it): ``3600·(λ·Σ_{j=1}^{B−1} p_j + c·effected_per_worker_crash)``; with ``extension=True`` the first
term is 0. With the ledger, overlapping copies meet the live lease (``InFlight``) and are not run;
what remains is the crash term of section 4 for the declared effect.

6. The ledger
~~~~~~~~~~~~~
Row operations per second (effectively-once, lease and visibility extended together): claims
``λ + c·(λ·(E[L] + a + ℓ))/W`` (first deliveries plus crash replays), completes ``λ``, lease
extensions ``λ·Σ_{k≥1} S(k·h)`` (= λ·E[⌊L/h⌋], one per heartbeat a handler lives through),
purges ``λ`` (steady state, once the run is longer than the retention), quarantines (outcome
unknown). Batching (``claim_many``, ``complete_many``) cuts round trips, not row operations.
Rows at the horizon: ``λ·R + λ·(E[L] + ℓ)`` (completed rows kept for the retention plus the
in-flight ones). Bytes per row (PostgreSQL estimate, override with ``ledger_row_bytes``):
``(214 + 2·(scope_bytes + operation_id_bytes) + result_bytes)·1.10`` -- heap tuple header and
line pointer, a 64-hex fingerprint, state, token, owner, lease, attempts, three timestamps, the
primary-key entry (scope, operation id again) and the purge-index entry, plus 10% page overhead.

7. Sampling
~~~~~~~~~~~
Per slice of ``slice_seconds`` (width dt), by Poisson splitting: the operations arriving in the
slice that are redelivered exactly ``j`` times are independent ``Poisson(λ·dt·(p_j − p_{j+1}))``
draws (``p_0 = 1``, ``p_{B+1} = 0``), so arrivals, outlived operations (``j ≥ 1``), redeliveries
(``Σ j·N_j``), extra executions (``Σ min(j, B−1)·N_j``) and exhausted budgets (``N_B``) come from
B+1 draws per slice; crashes are ``Poisson(c·dt)`` and their replays, effected or not, Poisson
with mean (crashes × the per-worker replay set × the share). Sums per slice and per hour give the
totals, the worst second and the worst hour; the expectation of every sampled total equals the
closed form, which is what the headline numbers report.

Limits (said plainly): latency is independent of load (no provider saturation); the fleet has
the capacity the model says it needs (``utilization`` reports when it does not, and then queueing
makes everything worse); no handler deadline cuts an execution; redelivery is immediate at
visibility expiry; the ack of a stale receipt deletes the message (SQS); one latency distribution
for every message.
"""

# ruff: noqa: RUF002, RUF003 - the formulas are written in mathematical notation (λ, ρ, σ, −)

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Literal

from replaysafe.errors import ConfigurationError, MissingExtra

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float64]
else:
    np = None  # bound by _load(): numpy is the optional extra "sim"

__all__ = [
    "PRESETS",
    "EffectModel",
    "LatencyModel",
    "LoadModel",
    "MetricsFit",
    "MetricsView",
    "SimulationResult",
    "ambiguity_surface",
    "fit_latency",
    "model_from_metrics",
    "parse_exposition",
    "preset",
    "redelivery_chain",
    "simulate",
]

EffectModel = Literal["keyed", "transactional", "unkeyed", "unkeyed-retry"]
EFFECT_MODELS: tuple[str, ...] = ("keyed", "transactional", "unkeyed", "unkeyed-retry")

#: fixed bytes of one ledger row and its index entries (see the module docstring, section 6)
ROW_FIXED_BYTES = 214
ROW_PAGE_OVERHEAD = 1.10
#: below this many executions/s on ambiguous operations a load counts as effectively exactly-once
EFFECTIVELY_ZERO_PER_S = 0.01
#: slices drawn per numpy call (a day of one-second slices): bounds memory for long runs
CHUNK_SLICES = 86_400
HOUR = 3600.0


def _load() -> None:
    """Import numpy on first use; without it, name the extra to install."""
    if globals()["np"] is None:
        try:
            import numpy
        except ImportError as exc:
            raise MissingExtra("sim", "numpy") from exc
        globals()["np"] = numpy


# --------------------------------------------------------------------------- latency


#: coefficients of the erfcc Chebyshev fit, lowest order first
_ERFCC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
          -1.13520398, 1.48851587, -0.82215223, 0.17087277)  # fmt: skip


def _q(z: Any) -> FloatArray:
    """Standard normal upper tail ``Q(z) = P(Z > z) = erfc(z/√2)/2``, vectorised.

    numpy has no erfc; this is the Chebyshev fit of Numerical Recipes (``erfcc``), fractional
    error below 1.2e-7 everywhere -- relative, so tail probabilities of 1e-12 keep their digits,
    which ``1 − Φ(z)`` would not.
    """
    x = np.asarray(z, dtype=float) / math.sqrt(2.0)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * a)
    poly = np.zeros_like(t)
    for c in reversed(_ERFCC):  # Horner
        poly = c + t * poly
    erfc = t * np.exp(-a * a + poly)
    return np.asarray(0.5 * np.where(x >= 0, erfc, 2.0 - erfc), dtype=float)


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """A mixture of lognormals: ``components`` are ``(weight, mu, sigma)`` of ``ln L``.

    The weights sum to 1. ``sf``, ``cdf`` and ``quantile`` take scalars or arrays (vectorised).
    """

    components: tuple[tuple[float, float, float], ...]

    def __post_init__(self) -> None:
        if not self.components or abs(sum(w for w, _, _ in self.components) - 1.0) > 1e-9:
            raise ConfigurationError("LatencyModel: component weights must sum to 1")

    @classmethod
    def lognormal(cls, mean: float, p99: float) -> LatencyModel:
        """The lognormal with this mean and p99 (section 1 of the module docstring)."""
        mu, sigma = _fit_lognormal(mean, p99)
        return cls(((1.0, mu, sigma),))

    def sf(self, x: Any) -> FloatArray:
        """``S(x) = P(L > x)``."""
        _load()
        xa = np.asarray(x, dtype=float)
        lx = np.log(np.maximum(xa, 1e-300))
        out = np.zeros_like(lx)
        for w, mu, s in self.components:
            out = out + w * _q((lx - mu) / s)
        return np.asarray(np.where(xa > 0, out, 1.0), dtype=float)

    def cdf(self, x: Any) -> FloatArray:
        return 1.0 - self.sf(x)

    def mean(self) -> float:
        return sum(w * math.exp(mu + s * s / 2) for w, mu, s in self.components)

    def mean_above(self, x: float) -> float:
        """The partial mean ``E[L; L > x]``."""
        _load()
        if x <= 0:
            return self.mean()
        lx = math.log(x)
        return float(
            sum(
                w * math.exp(mu + s * s / 2) * float(_q(np.asarray((lx - mu - s * s) / s)))
                for w, mu, s in self.components
            )
        )

    def mean_given_above(self, x: float) -> float:
        """``E[L | L > x]`` (the mean latency of the executions that outlive ``x``)."""
        tail = float(self.sf(x))
        return self.mean_above(x) / tail if tail > 0 else max(x, self.mean())

    def mean_min(self, t: float) -> float:
        """``E[min(L, t)] = ∫_0^t S(u) du``: Little's law during the first ``t`` seconds."""
        if t <= 0:
            return 0.0
        return self.mean() - self.mean_above(t) + t * float(self.sf(t))

    def expected_floor(self, h: float) -> float:
        """``E[⌊L/h⌋] = Σ_{k≥1} S(k·h)``: heartbeats an execution lives through."""
        _load()
        if h <= 0:
            raise ConfigurationError("a heartbeat must be positive seconds")
        top = float(self.quantile(1.0 - 1e-12))
        k = np.arange(1, max(2, min(int(top / h) + 2, 2_000_000)), dtype=float)
        return float(np.sum(self.sf(k * h)))

    def quantile(self, p: Any) -> FloatArray:
        """Inverse CDF (vectorised bisection on ``ln x``)."""
        _load()
        pa = np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
        lo = np.full(pa.shape, min(mu - 12 * s for _, mu, s in self.components))
        hi = np.full(pa.shape, max(mu + 12 * s for _, mu, s in self.components))
        for _ in range(80):
            mid = (lo + hi) / 2
            below = self.cdf(np.exp(mid)) < pa
            lo = np.where(below, mid, lo)
            hi = np.where(below, hi, mid)
        return np.asarray(np.exp((lo + hi) / 2), dtype=float)

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        """``n`` independent latencies."""
        _load()
        weights = np.array([w for w, _, _ in self.components])
        which = rng.choice(len(self.components), size=n, p=weights / weights.sum())
        mus = np.array([mu for _, mu, _ in self.components])[which]
        sigmas = np.array([s for _, _, s in self.components])[which]
        return np.asarray(np.exp(rng.normal(mus, sigmas)), dtype=float)

    def sample_beyond(self, rng: np.random.Generator, n: int, x: float) -> FloatArray:
        """``n`` latencies drawn from ``L | L > x`` (inverse transform on the upper tail)."""
        _load()
        tail = float(self.sf(x))
        if tail <= 0:
            return np.full(n, x)
        return self.quantile(1.0 - tail * rng.random(n))

    def describe(self) -> dict[str, Any]:
        return {
            "components": [
                {"weight": w, "mu": mu, "sigma": s, "median_s": math.exp(mu)}
                for w, mu, s in self.components
            ],
            "mean_s": self.mean(),
            "p99_s": float(self.quantile(0.99)),
        }


def _fit_lognormal(mean: float, p99: float, cdf_at_p99: float = 0.99) -> tuple[float, float]:
    """``(mu, sigma)`` of the lognormal with this mean and this CDF value at ``p99``."""
    if mean <= 0 or p99 <= 0:
        raise ConfigurationError("latency mean and p99 must be positive seconds")
    if not 0.5 < cdf_at_p99 < 1.0:
        raise ConfigurationError(
            f"cannot fit a lognormal body: it would need {cdf_at_p99:.6f} of its mass below the "
            "p99; the slow component takes too much of the distribution"
        )
    z = NormalDist().inv_cdf(cdf_at_p99)
    d = math.log(p99 / mean)
    disc = z * z - 2 * d
    if d <= 0 or disc < 0:
        limit = math.exp(z * z / 2)
        raise ConfigurationError(
            f"no lognormal has mean {mean:g}s and p99 {p99:g}s: its p99/mean ratio must lie in "
            f"(1, {limit:.2f}], this is {p99 / mean:.2f}. Give a smaller p99 (the seed's 'p99 "
            "under X' is an upper bound), or a tail mixture with --tail-beyond-visibility"
        )
    sigma = z - math.sqrt(disc)
    return math.log(mean) - sigma * sigma / 2, sigma


def _mixture_for_weight(
    w: float, mean: float, p99: float, slow_mu: float, slow_sigma: float
) -> LatencyModel | None:
    """The mixture with slow weight ``w`` whose mean and p99 are ``mean`` and ``p99``, or None
    when no lognormal body can make up the rest."""
    if w == 0:
        mu, s = _fit_lognormal(mean, p99)
        return LatencyModel(((1.0, mu, s),))
    slow_mean = math.exp(slow_mu + slow_sigma**2 / 2)
    body_mean = (mean - w * slow_mean) / (1 - w)
    slow_cdf_q = NormalDist(slow_mu, slow_sigma).cdf(math.log(p99))
    body_cdf_q = (0.99 - w * slow_cdf_q) / (1 - w)
    if body_mean <= 0:
        return None
    try:
        mu, s = _fit_lognormal(body_mean, p99, body_cdf_q)
    except ConfigurationError:
        return None
    return LatencyModel(((1 - w, mu, s), (w, slow_mu, slow_sigma)))


def fit_latency(
    mean: float,
    p99: float,
    *,
    visibility: float | None = None,
    tail_beyond_visibility: float | None = None,
    slow_median: float = 60.0,
    slow_sigma: float = 0.5,
) -> LatencyModel:
    """The latency distribution: a lognormal from ``mean`` and ``p99``, or -- with
    ``tail_beyond_visibility`` -- the tail mixture whose share beyond ``visibility`` is exactly
    that (section 1 of the module docstring). Raises ``ConfigurationError`` when no such
    distribution exists, saying which input to change."""
    _load()
    if tail_beyond_visibility is None:
        return LatencyModel.lognormal(mean, p99)
    if visibility is None or visibility <= 0:
        raise ConfigurationError("a tail share needs the visibility timeout it is measured at")
    share = tail_beyond_visibility
    if not 0 < share < 1:
        raise ConfigurationError(f"tail_beyond_visibility must be in (0, 1), got {share}")
    if (visibility >= p99 and share >= 0.01) or (visibility < p99 and share <= 0.01):
        raise ConfigurationError(
            f"inconsistent tail: p99 {p99:g}s and visibility {visibility:g}s put "
            f"{'less' if visibility >= p99 else 'more'} than 1% beyond the visibility, but the "
            f"stated share is {share:.4%}; fix one of the three"
        )
    slow_mu = math.log(slow_median)

    def excess(w: float) -> float | None:
        lat = _mixture_for_weight(w, mean, p99, slow_mu, slow_sigma)
        return None if lat is None else float(lat.sf(visibility)) - share

    base = excess(0.0)
    if base is None:
        raise ConfigurationError("unreachable: the lognormal fit raises")  # pragma: no cover
    if abs(base) <= 1e-12 * share:
        return LatencyModel.lognormal(mean, p99)
    if base > 0:
        raise ConfigurationError(
            f"the lognormal with mean {mean:g}s and p99 {p99:g}s already puts "
            f"{base + share:.4%} beyond {visibility:g}s, more than the stated {share:.4%}: a slow "
            "component can only add tail. Drop the tail share or give a smaller p99"
        )
    # bracket the first root on a fine geometric grid (the feasible weights can be a narrow
    # band below the point where no lognormal body is left), then bisect
    lo, hi = 0.0, None
    for w in np.geomspace(1e-12, 0.999, 721):
        e = excess(float(w))
        if e is None:
            continue
        if e >= 0:
            hi = float(w)
            break
        lo = float(w)
    if hi is None:
        raise ConfigurationError(
            f"no slow component with median {slow_median:g}s (sigma {slow_sigma:g}) can put "
            f"{share:.4%} beyond {visibility:g}s while keeping mean {mean:g}s and p99 {p99:g}s: "
            "give a larger slow_median or check the inputs"
        )
    for _ in range(200):
        mid = (lo + hi) / 2
        e = excess(mid)
        if e is None or e > 0:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-15 * hi:
            break
    fitted = _mixture_for_weight(hi, mean, p99, slow_mu, slow_sigma)
    assert fitted is not None
    return fitted


# --------------------------------------------------------------------------- the chain


def _retry_sf(lat: LatencyModel, x: FloatArray, v: FloatArray, rho: float) -> FloatArray:
    """``S_r(x)``: survival of a retry's latency (section 2)."""
    sv = lat.sf(v)
    cond = np.where(sv > 0, lat.sf(np.maximum(x, v)) / np.where(sv > 0, sv, 1.0), 0.0)
    return np.asarray(rho * cond + (1 - rho) * lat.sf(x), dtype=float)


def redelivery_chain(lat: LatencyModel, visibility: Any, max_attempts: int, rho: float) -> Any:
    """``[p_1 … p_B]``: the probability that a message is delivered a (j+1)-th time because no
    execution finished within ``j`` visibility timeouts (section 2). ``visibility`` may be an
    array; the result then has shape ``(B, *visibility.shape)``."""
    _load()
    v = np.asarray(visibility, dtype=float)
    out = []
    acc = np.ones_like(v)  # Π_{k=1}^{j−1} S_r(kV)
    for j in range(1, max_attempts + 1):
        out.append(lat.sf(j * v) * acc)
        acc = acc * _retry_sf(lat, j * v, v, rho)
    return np.stack(out)


def _survive_chain(
    lat: LatencyModel, t: FloatArray, v: float, max_attempts: int, rho: float
) -> FloatArray:
    """``P(T_c > t)``: not yet completed at ``t`` (section 3); 0 from ``B·V`` on (quarantined)."""
    out = lat.sf(t)
    vv = np.asarray(v)
    for i in range(2, max_attempts + 1):
        started = t >= (i - 1) * v
        out = out * np.where(started, _retry_sf(lat, np.maximum(t - (i - 1) * v, 0.0), vv, rho), 1)
    return np.asarray(np.where(t < max_attempts * v, out, 0.0), dtype=float)


def _attempts_per_outlive(chain: FloatArray) -> float:
    p1 = float(chain[0])
    if p1 <= 0:
        return 1.0
    return 1.0 + float(np.sum(chain[:-1])) / p1


def _fit_rho(lat: LatencyModel, v: float, max_attempts: int, target: float) -> float:
    """ρ such that the chain gives ``target`` executions per operation that outlived."""
    lo_a = _attempts_per_outlive(redelivery_chain(lat, v, max_attempts, 0.0))
    hi_a = _attempts_per_outlive(redelivery_chain(lat, v, max_attempts, 1.0))
    if not lo_a - 1e-9 <= target <= hi_a + 1e-9:
        raise ConfigurationError(
            f"attempts_per_outlive {target:g} is out of reach: with this latency, a "
            f"{v:g}s visibility and a budget of {max_attempts} an operation that outlived "
            f"visibility runs between {lo_a:.3f} (independent retries) and {hi_a:.3f} times "
            "(every retry as slow as the first). Change the budget, the tail or the target"
        )
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _attempts_per_outlive(redelivery_chain(lat, v, max_attempts, mid)) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class LoadModel:
    """The inputs of the load model. Times are seconds, rates per second.

    Latency: ``latency_mean`` and ``latency_p99`` fit a lognormal; with
    ``tail_beyond_visibility`` (the share of executions longer than ``visibility_timeout``) a
    slow-provider component (``slow_median``, ``slow_sigma``) is mixed in with the weight that
    makes the share exact. ``attempts_per_outlive`` (mean executions of an operation that
    outlived visibility) fits ``retry_slow_probability`` (the chance a retry hits the same
    slowdown); give one of the two, or neither (independent retries, ρ = 0).
    """

    rate_per_s: float
    workers: int = 1
    #: per worker; None: unbounded (the model reports what is needed)
    concurrency_per_worker: int | None = None
    latency_mean: float = 0.1
    latency_p99: float = 1.0
    tail_beyond_visibility: float | None = None
    slow_median: float = 60.0
    slow_sigma: float = 0.5
    attempts_per_outlive: float | None = None
    retry_slow_probability: float | None = None
    #: SQS visibility timeout, or the lease of a broker that redelivers on lease expiry
    visibility_timeout: float = 30.0
    #: the runtime extends visibility (every heartbeat) while the handler runs
    extension: bool = False
    #: ledger lease (heartbeat = lease / 3); None: the visibility timeout
    lease: float | None = None
    #: retry budget: executions including the first (RetryPolicy.max_attempts)
    max_attempts: int = 3
    #: worker crashes per hour across the fleet (each loses that worker's in-flight work)
    crash_rate_per_hour: float = 0.0
    #: when the replay set is evaluated (seconds after load starts); None: the end of the run
    crash_at: float | None = None
    effect: EffectModel = "keyed"
    #: where in a handler's run its effect becomes true (0 = at the start, 1 = at the end)
    effect_at: float = 1.0
    #: effect -> broker completion (ack / DeleteMessage round trip)
    ack_latency: float = 0.02
    #: effect -> ledger complete (one ledger round trip)
    ledger_latency: float = 0.005
    #: dedupe retention / replay horizon of the ledger
    retention: float = 86_400.0
    #: simulated time
    duration: float = 3600.0
    slice_seconds: float = 1.0
    scope_bytes: int = 16
    operation_id_bytes: int = 40
    result_bytes: int = 0
    #: measured bytes per ledger row (e.g. pg_total_relation_size / rows); None: the estimate
    ledger_row_bytes: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        def positive(name: str, value: float) -> None:
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigurationError(f"{name} must be a positive number, got {value!r}")

        def non_negative(name: str, value: float) -> None:
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigurationError(f"{name} must be >= 0, got {value!r}")

        for name in ("rate_per_s", "latency_mean", "latency_p99", "slow_median", "slow_sigma",
                     "visibility_timeout", "retention", "duration", "slice_seconds"):  # fmt: skip
            positive(name, getattr(self, name))
        for name in ("crash_rate_per_hour", "ack_latency", "ledger_latency"):
            non_negative(name, getattr(self, name))
        for name in ("scope_bytes", "operation_id_bytes", "result_bytes"):
            non_negative(name, getattr(self, name))
        if self.workers < 1:
            raise ConfigurationError(f"workers must be at least 1, got {self.workers}")
        if self.concurrency_per_worker is not None and self.concurrency_per_worker < 1:
            raise ConfigurationError("concurrency_per_worker must be at least 1 (or None)")
        if self.max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        if self.lease is not None:
            positive("lease", self.lease)
        if self.crash_at is not None:
            non_negative("crash_at", self.crash_at)
        if self.ledger_row_bytes is not None:
            positive("ledger_row_bytes", self.ledger_row_bytes)
        if not 0 <= self.effect_at <= 1:
            raise ConfigurationError(f"effect_at must be in [0, 1], got {self.effect_at}")
        if self.effect not in EFFECT_MODELS:
            raise ConfigurationError(f"effect must be one of {EFFECT_MODELS}, not {self.effect!r}")
        if self.attempts_per_outlive is not None and self.retry_slow_probability is not None:
            raise ConfigurationError(
                "give attempts_per_outlive (the retry slowness is fitted to it) or "
                "retry_slow_probability, not both"
            )
        if self.retry_slow_probability is not None and not 0 <= self.retry_slow_probability <= 1:
            raise ConfigurationError("retry_slow_probability must be in [0, 1]")
        if self.attempts_per_outlive is not None and self.attempts_per_outlive < 1:
            raise ConfigurationError("attempts_per_outlive must be at least 1")
        if self.slice_seconds > self.duration:
            raise ConfigurationError("slice_seconds must not exceed duration")
        if self.duration / self.slice_seconds > 1e9:
            raise ConfigurationError(
                "more than 1e9 slices: use a larger slice_seconds for so long a duration"
            )

    @property
    def heartbeat(self) -> float:
        return (self.lease if self.lease is not None else self.visibility_timeout) / 3

    def scaled(self, k: float) -> LoadModel:
        """The same system at ``k``× the traffic (latency unchanged: see the limits)."""
        if not k > 0:
            raise ConfigurationError(f"a traffic scale must be positive, got {k}")
        return replace(self, rate_per_s=self.rate_per_s * k)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, LoadModel] = {
    # The seed's test environment: "400 messages/s across 20 workers, 120 ms average handler
    # time, p99 under 2 s, SQS visibility 30 s, 3 attempts, 24 h dedupe retention". A lognormal
    # with a 120 ms mean cannot have a p99 above 1.795 s (p99/mean <= 14.96); the preset takes
    # 1.2 s (p99/mean = 10), comfortably "under 2 s". docs/simulate.md shows the sensitivity.
    "seed-test": LoadModel(
        rate_per_s=400.0,
        workers=20,
        latency_mean=0.120,
        latency_p99=1.2,
        visibility_timeout=30.0,
        max_attempts=3,
        retention=86_400.0,
    ),
    # The seed's sale: "18,000 messages/s, 900 ms average, p99 11 s, 0.4% of messages outliving
    # visibility ... at 2.3 attempts on average".
    "seed-sale": LoadModel(
        rate_per_s=18_000.0,
        workers=20,
        latency_mean=0.900,
        latency_p99=11.0,
        tail_beyond_visibility=0.004,
        attempts_per_outlive=2.3,
        visibility_timeout=30.0,
        max_attempts=3,
        retention=86_400.0,
    ),
}


def preset(name: str) -> LoadModel:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}"
        ) from None


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
    """The outputs (see the module docstring for every formula). ``as_json()`` is what
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


# --------------------------------------------------------------------------- findings


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


# --------------------------------------------------------------------------- surfaces


def ambiguity_surface(
    model: LoadModel, scales: Any, visibilities: Any
) -> tuple[SimulationResult, FloatArray]:
    """Ambiguous executions/s over a grid of traffic scales (rows) and visibility timeouts
    (columns), extension off, with the latency and ρ fitted at the model's own visibility."""
    _load()
    base = simulate(model, sample=False)
    vis = np.asarray(visibilities, dtype=float)
    chain = np.asarray(
        redelivery_chain(base.latency, vis, model.max_attempts, base.retry_slow_probability)
    )
    per_op = chain[0] + np.sum(chain[:-1], axis=0)  # λ·p1·attempts = λ·(p1 + Σ_{j<B} p_j)
    rates = model.rate_per_s * np.asarray(scales, dtype=float)
    return base, np.asarray(np.outer(rates, per_op), dtype=float)


# --------------------------------------------------------------------------- from metrics

#: delivery outcomes that end a *new* operation's first pass through the pipeline; the others
#: (duplicate, in_flight, retried, lease_lost, ledger_unavailable) are repeat deliveries
FIRST_OUTCOMES = frozenset({"applied", "quarantined", "failed", "conflict"})

_SAMPLE_LINE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)"
    r"(?:\s+(?P<ts>-?\d+))?\s*$"
)
_LABEL_PAIR = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True, slots=True)
class MetricSample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, key: str) -> str | None:
        return dict(self.labels).get(key)


def parse_exposition(text: str) -> list[MetricSample]:
    """The samples of a Prometheus text exposition (version 0.0.4; comments and ``# TYPE`` /
    ``# HELP`` lines are skipped, timestamps ignored). Raises ``ConfigurationError`` naming the
    first line it cannot read."""
    out: list[MetricSample] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_LINE.match(line)
        if match is None:
            raise ConfigurationError(f"metrics line {number} is not a Prometheus sample: {raw!r}")
        labels: list[tuple[str, str]] = []
        body = match.group("labels") or ""
        pos = 0
        while pos < len(body.rstrip()):
            pair = _LABEL_PAIR.match(body, pos)
            if pair is None:
                raise ConfigurationError(f"metrics line {number} has malformed labels: {raw!r}")
            value = re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], pair.group(2))
            labels.append((pair.group(1), value))
            pos = pair.end()
        try:
            value_f = float(match.group("value"))
        except ValueError:
            raise ConfigurationError(
                f"metrics line {number} has a value that is not a number: {raw!r}"
            ) from None
        out.append(MetricSample(match.group("name"), tuple(sorted(labels)), value_f))
    return out


@dataclass(frozen=True, slots=True)
class MetricsView:
    """What the load model reads from replaysafe's own metrics (one dump, or the difference of
    two): handler latency count/sum, histogram buckets (cumulative, by upper bound) and summary
    quantiles, and first-pass deliveries."""

    latency_count: float
    latency_sum: float
    buckets: tuple[tuple[float, float], ...]
    quantiles: tuple[tuple[float, float], ...]
    deliveries: float

    @classmethod
    def read(cls, text: str, *, handler: str | None = None) -> MetricsView:
        from replaysafe import observe

        name = observe.HANDLER_SECONDS
        count = total = deliveries = 0.0
        buckets: dict[float, float] = {}
        quantiles: dict[float, float] = {}
        seen = False
        for s in parse_exposition(text):
            if handler is not None and s.label("handler") != handler:
                continue
            if s.name == observe.DELIVERIES:
                if s.label("outcome") in FIRST_OUTCOMES:
                    deliveries += s.value
            elif s.name == f"{name}_count":
                count += s.value
                seen = True
            elif s.name == f"{name}_sum":
                total += s.value
            elif s.name == f"{name}_bucket" and s.label("le") is not None:
                le = float(s.label("le") or "nan")
                buckets[le] = buckets.get(le, 0.0) + s.value
            elif s.name == name and s.label("quantile") is not None:
                # a summary: quantiles of different handlers cannot be merged; keep the largest
                q = float(s.label("quantile") or "nan")
                quantiles[q] = max(quantiles.get(q, 0.0), s.value)
        if not seen:
            which = f" for handler {handler!r}" if handler else ""
            raise ConfigurationError(
                f"no {name}_count sample{which} in the metrics: dump /metrics of a replaysafe "
                "worker that has run handlers (replaysafe run MODULE:APP --metrics-port P)"
            )
        return cls(count, total, tuple(sorted(buckets.items())), tuple(sorted(quantiles.items())),
                   deliveries)  # fmt: skip

    def minus(self, earlier: MetricsView) -> MetricsView:
        """The activity between two dumps of the same process (``self`` the later one)."""
        if self.latency_count < earlier.latency_count or self.deliveries < earlier.deliveries:
            raise ConfigurationError(
                "the second metrics dump has smaller counters than the first: give them in time "
                "order, from the same process (a restart resets counters)"
            )
        before = dict(earlier.buckets)
        return MetricsView(
            self.latency_count - earlier.latency_count,
            self.latency_sum - earlier.latency_sum,
            tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets),
            self.quantiles,
            self.deliveries - earlier.deliveries,
        )

    @property
    def mean(self) -> float:
        if self.latency_count <= 0:
            raise ConfigurationError("the metrics hold no handler executions to learn from")
        return self.latency_sum / self.latency_count

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile: from a summary when it has it, else from the histogram buckets
        (linear within the bucket, as PromQL ``histogram_quantile``); None when it lies beyond
        the largest finite bucket."""
        for qq, value in self.quantiles:
            if abs(qq - q) < 1e-9:
                return value
        finite = [(le, n) for le, n in self.buckets if math.isfinite(le)]
        if not finite or self.latency_count <= 0:
            return None
        rank = q * self.latency_count
        prev_le, prev_n = 0.0, 0.0
        for le, n in finite:
            if n >= rank:
                if n == prev_n:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
            prev_le, prev_n = le, n
        return None

    def share_beyond(self, x: float) -> float | None:
        """The share of executions longer than ``x`` seconds, from the buckets (linear between
        the bounds around ``x``); None when no finite bucket reaches ``x``."""
        if self.latency_count <= 0:
            return None
        prev_le, prev_n = 0.0, 0.0
        for le, n in self.buckets:
            if not math.isfinite(le):
                break
            if le >= x:
                below = prev_n + (n - prev_n) * (x - prev_le) / (le - prev_le)
                return max(0.0, 1.0 - below / self.latency_count)
            prev_le, prev_n = le, n
        return None


@dataclass(frozen=True, slots=True)
class MetricsFit:
    """A load model read from metrics, and what was read (for the report)."""

    model: LoadModel
    window: float
    measured_rate_per_s: float
    measured_mean: float
    measured_p99: float
    measured_share_beyond_visibility: float | None
    notes: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "window_s": self.window,
            "measured_rate_per_s": self.measured_rate_per_s,
            "measured_latency_mean": self.measured_mean,
            "measured_latency_p99": self.measured_p99,
            "measured_share_beyond_visibility": self.measured_share_beyond_visibility,
            "notes": list(self.notes),
        }


def model_from_metrics(
    base: LoadModel, view: MetricsView, *, window: float, p99: float | None = None
) -> MetricsFit:
    """``base`` with rate, latency mean, p99 and (when the buckets resolve it) the tail share
    beyond the visibility taken from ``view``, which covers ``window`` seconds of traffic."""
    _load()
    if not window > 0:
        raise ConfigurationError(
            "--window must be the seconds the counters cover: the process uptime for one dump, "
            "or the time between two dumps"
        )
    notes: list[str] = []
    rate = view.deliveries / window
    if rate <= 0:
        raise ConfigurationError(
            "no first-pass deliveries (replaysafe_deliveries_total with outcome applied, "
            "quarantined, failed or conflict) in the metrics: cannot measure a rate; give --rate"
        )
    mean = view.mean
    q99 = p99 if p99 is not None else view.quantile(0.99)
    if q99 is None:
        raise ConfigurationError(
            "the metrics do not resolve the p99 (it lies beyond the largest finite bucket): "
            "give --latency-p99"
        )
    v = base.visibility_timeout
    share = view.share_beyond(v)
    model = replace(base, rate_per_s=rate, latency_mean=mean, latency_p99=q99,
                    tail_beyond_visibility=None)  # fmt: skip
    if share is None:
        notes.append(f"the buckets do not reach {v:g}s: the tail beyond it is extrapolated")
    elif share > 0:
        try:
            fit_latency(mean, q99, visibility=v, tail_beyond_visibility=share,
                        slow_median=base.slow_median, slow_sigma=base.slow_sigma)  # fmt: skip
        except ConfigurationError as exc:
            notes.append(f"measured share beyond {v:g}s not used ({exc}); lognormal tail instead")
        else:
            model = replace(model, tail_beyond_visibility=share)
            notes.append(f"tail mixture fitted to the measured {share:.4%} beyond {v:g}s")
    else:
        notes.append(f"no execution beyond {v:g}s in the metrics: lognormal tail")
    if model.attempts_per_outlive is not None and model.tail_beyond_visibility is None:
        # the attempts target belonged to the preset's tail; without that tail it may not fit
        model = replace(model, attempts_per_outlive=None)
        notes.append("attempts_per_outlive dropped: it was fitted to another tail")
    return MetricsFit(model, window, rate, mean, q99, share, tuple(notes))
