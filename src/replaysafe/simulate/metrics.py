"""A load model from replaysafe's own metrics: the Prometheus text exposition parser,
``MetricsView`` (handler latency, buckets, quantiles and first-pass deliveries, from one dump or
the difference of two) and ``model_from_metrics`` (rate, latency and tail share measured)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from replaysafe.errors import ConfigurationError
from replaysafe.simulate.latency import _load, fit_latency
from replaysafe.simulate.load import LoadModel

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
