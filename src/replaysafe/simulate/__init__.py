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

Modules, one job each: ``latency`` (section 1 and the chain of section 2: ``LatencyModel``, its
fits, ``redelivery_chain``; numpy's lazy import), ``load`` (the inputs: ``LoadModel``, the
presets), ``model`` (sections 2-7: ``simulate()``, its results, the replay set, the sample),
``report`` (the findings in sentences), ``surface`` (``ambiguity_surface``), ``metrics`` (a load
model from replaysafe's own metrics: the exposition parser, ``MetricsView``,
``model_from_metrics``). The names below are this package's API; import them from here.
"""

# ruff: noqa: RUF002, RUF003 - the formulas are written in mathematical notation (λ, ρ, σ, −)

from replaysafe.simulate.latency import LatencyModel, fit_latency, redelivery_chain
from replaysafe.simulate.load import PRESETS, EffectModel, LoadModel, preset
from replaysafe.simulate.metrics import (
    MetricsFit,
    MetricsView,
    model_from_metrics,
    parse_exposition,
)
from replaysafe.simulate.model import SimulationResult, simulate
from replaysafe.simulate.surface import ambiguity_surface

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
