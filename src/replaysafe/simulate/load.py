"""The inputs of the load model: ``LoadModel`` (validated on construction) and the presets."""

# ruff: noqa: RUF002, RUF003 - the formulas are written in mathematical notation (λ, ρ, σ, −)

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from replaysafe.errors import ConfigurationError

EffectModel = Literal["keyed", "transactional", "unkeyed", "unkeyed-retry"]
EFFECT_MODELS: tuple[str, ...] = ("keyed", "transactional", "unkeyed", "unkeyed-retry")
#: seconds per hour (crash rates and duplicates are counted per hour)
HOUR = 3600.0


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
