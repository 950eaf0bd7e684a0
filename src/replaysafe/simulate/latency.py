"""Handler latency and the redelivery chain: sections 1-3 of the package docstring.

``LatencyModel`` (a mixture of lognormals) and its fits from a mean, a p99 and optionally the
share beyond the visibility (``fit_latency``); the chain ``p_j`` of redeliveries while an
execution still runs (``redelivery_chain``) and the retry slowness ρ fitted to it. numpy is the
optional extra "sim", imported on first use by ``_load()``: every module of the package that
computes with arrays calls it first, so a missing numpy is named once, here.
"""

# ruff: noqa: RUF002, RUF003 - the formulas are written in mathematical notation (λ, ρ, σ, −)

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

from replaysafe.errors import ConfigurationError, MissingExtra

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float64]
else:
    np = None  # bound by _load(): numpy is the optional extra "sim"


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
        """The lognormal with this mean and p99 (section 1 of the package docstring)."""
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
    that (section 1 of the package docstring). Raises ``ConfigurationError`` when no such
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
