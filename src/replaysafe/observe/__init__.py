"""Signals: the one place that names them, and an in-process recorder.

Exporters (Prometheus, OpenTelemetry) read a :class:`Stats`; they never invent names of their own.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# ---- counters (labels in brackets)
RECEIVED = "replaysafe_received_total"  # [handler] copies that reached a handler (DELIVERED)
DELIVERIES = "replaysafe_deliveries_total"  # [handler, outcome] copies settled, by outcome
DUPLICATE_HITS = "replaysafe_duplicate_hits_total"  # [handler, cause=completed|in_flight]
OVERLAPS_PREVENTED = "replaysafe_overlaps_prevented_total"  # [handler]
LEASE_LOST = "replaysafe_lease_lost_total"  # [handler]
QUARANTINED = "replaysafe_quarantined_total"  # [handler, reason]
RETRIES = "replaysafe_retries_total"  # [handler]
RETRY_BUDGET_EXHAUSTED = "replaysafe_retry_budget_exhausted_total"  # [handler]
HANDLER_ERRORS = "replaysafe_handler_errors_total"  # [handler]
LEASE_EXTENSIONS = "replaysafe_lease_extensions_total"  # [handler]
VISIBILITY_EXTENSIONS = "replaysafe_visibility_extensions_total"  # [handler]
LEDGER_UNAVAILABLE = "replaysafe_ledger_unavailable_total"  # [handler]
PUBLISH_AMBIGUOUS = "replaysafe_publish_ambiguous_total"  # [destination]
OUTBOX_PUBLISHED = "replaysafe_outbox_published_total"  # [destination] rows a relay marked
OUTBOX_PUBLISH_FAILED = "replaysafe_outbox_publish_failed_total"  # [destination] batches given up
OUTBOX_BLOCKED = "replaysafe_outbox_blocked_total"  # [destination] rows that no longer decode
REDELIVERIES = "replaysafe_redeliveries_total"  # [handler] deliveries with attempt > 1
#: [handler] failures read as an unknown outcome: OutcomeUnknown, or any failure of an unkeyed
#: effect under effectively-once but EffectNotApplied / its not_applied_on
OUTCOME_UNKNOWN = "replaysafe_outcome_unknown_total"
# ---- histograms
AMBIGUITY_WINDOW = "replaysafe_ambiguity_window_seconds"  # [handler] EFFECTED -> COMPLETED
HANDLER_SECONDS = "replaysafe_handler_seconds"  # [handler]
REPLAY_AGE = "replaysafe_replay_age_seconds"  # [handler] publish -> delivery (vs the horizon)
DUPLICATE_AGE = "replaysafe_duplicate_age_seconds"  # [handler] EFFECTED -> a duplicate's arrival
# ---- computed gauges (Stats.track)
OPEN_AMBIGUITY = "replaysafe_open_ambiguity"  # [handler] effects done, completion not recorded
OPEN_AMBIGUITY_AGE = "replaysafe_open_ambiguity_oldest_seconds"  # [handler]
HORIZON_SECONDS = "replaysafe_replay_horizon_seconds"  # [] the ledger's retention
# ---- top-k (Stats.hit)
#: [handler] hot operation keys; exported by rank only, never with the key (an operation id)
REDELIVERED_KEYS = "replaysafe_redelivered_keys"
# ---- gauges (Stats.set)
OUTBOX_PENDING = "replaysafe_outbox_pending"  # [] committed outbox rows not yet published
OUTBOX_PUBLISH_LAG = "replaysafe_outbox_publish_lag_seconds"  # [] age of the oldest pending row
HANDLER_PAUSED = "replaysafe_handler_paused"  # [handler] 1 while paused (handler pause CLI)

# delivery outcomes (label values of DELIVERIES)
APPLIED = "applied"
DUPLICATE = "duplicate"
IN_FLIGHT = "in_flight"
CONFLICT = "conflict"
QUARANTINE = "quarantined"
RETRIED = "retried"
FAILED = "failed"
LEASE_LOST_OUTCOME = "lease_lost"
UNAVAILABLE = "ledger_unavailable"
#: at-most-once: the broker did not confirm the completion, so the effect was not run
UNCONFIRMED = "completion_unconfirmed"

Labels = tuple[tuple[str, str], ...]


#: histogram bucket upper bounds (seconds): from a fast ledger round trip to a slow provider
BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 900.0, 3600.0,
)  # fmt: skip


_NBUCKETS = len(BUCKETS)


@dataclass(slots=True)
class Summary:
    """A histogram: count, sum, max and cumulative-ready counts per ``BUCKETS`` bound."""

    count: int = 0
    total: float = 0.0
    max: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value
        i = bisect.bisect_left(BUCKETS, value)
        if i < _NBUCKETS:
            self.buckets[i] += 1

    def merge(self, other: Summary) -> None:
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        for i, n in enumerate(other.buckets):
            self.buckets[i] += n


class TopK:
    """Approximate heavy hitters in bounded memory (the space-saving algorithm): the keys seen
    most often, with counts that overestimate by at most the smallest tracked count."""

    def __init__(self, capacity: int = 100) -> None:
        self.capacity = capacity
        self.counts: dict[str, int] = {}

    def add(self, key: str, amount: int = 1) -> None:
        if key in self.counts or len(self.counts) < self.capacity:
            self.counts[key] = self.counts.get(key, 0) + amount
            return
        victim = min(self.counts, key=self.counts.__getitem__)
        self.counts[key] = self.counts.pop(victim) + amount

    def top(self, k: int = 10) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


class Stats:
    """Thread-safe counters, summaries and gauges keyed by (name, labels)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: Counter[tuple[str, Labels]] = Counter()
        self.summaries: dict[tuple[str, Labels], Summary] = {}
        #: last value set per gauge (a level, not a count: outbox pending, publish lag)
        self.gauges: dict[tuple[str, Labels], float] = {}
        #: gauges computed when read (open ambiguity and its age change with time, not events)
        self.callbacks: dict[tuple[str, Labels], Callable[[], float]] = {}
        #: bounded heavy-hitter counters (redeliveries by operation key)
        self.topk: dict[tuple[str, Labels], TopK] = {}

    @staticmethod
    def key(name: str, **labels: str) -> tuple[str, Labels]:
        """The key of metric ``name`` with ``labels``: built once by a hot path, then given to
        :meth:`add` / :meth:`record` per event."""
        return (name, tuple(sorted(labels.items())))

    def add(self, key: tuple[str, Labels], amount: int = 1) -> None:
        """:meth:`inc` by a key from :meth:`key`."""
        with self._lock:
            self.counters[key] += amount

    def record(self, key: tuple[str, Labels], value: float) -> None:
        """:meth:`observe` by a key from :meth:`key`."""
        with self._lock:
            summary = self.summaries.get(key)
            if summary is None:
                summary = self.summaries[key] = Summary()
            summary.add(value)

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        items = tuple(labels.items())
        key = (name, items if len(items) < 2 else tuple(sorted(items)))
        with self._lock:
            self.counters[key] += amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        items = tuple(labels.items())
        key = (name, items if len(items) < 2 else tuple(sorted(items)))
        with self._lock:
            summary = self.summaries.get(key)
            if summary is None:
                summary = self.summaries[key] = Summary()
            summary.add(value)

    def observe_many(self, name: str, values: Iterable[float], **labels: str) -> None:
        """``observe`` each of ``values`` (one key and one lock for a whole fetched batch)."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            summary = self.summaries.get(key)
            if summary is None:
                summary = self.summaries[key] = Summary()
            for value in values:
                summary.add(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge to ``value``."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.gauges[key] = value

    def gauge(self, name: str, **labels: str) -> float | None:
        """A gauge's last value for exactly ``labels``, or None if it was never set."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            return self.gauges.get(key)

    def total(self, name: str, **labels: str) -> int:
        """Sum of a counter over every label set that includes ``labels``."""
        want = set(labels.items())
        with self._lock:
            return sum(v for (n, lbl), v in self.counters.items() if n == name and want <= set(lbl))

    def summary(self, name: str, **labels: str) -> Summary:
        want = set(labels.items())
        out = Summary()
        with self._lock:
            for (n, lbl), s in self.summaries.items():
                if n == name and want <= set(lbl):
                    out.merge(s)
        return out

    def track(self, name: str, fn: Callable[[], float], **labels: str) -> None:
        """Register a gauge whose value ``fn()`` computes when it is read."""
        with self._lock:
            self.callbacks[(name, tuple(sorted(labels.items())))] = fn

    def hit(self, name: str, key: str, *, capacity: int = 100, **labels: str) -> None:
        """Count ``key`` in a bounded top-k (memory stays flat however many keys there are)."""
        lk = (name, tuple(sorted(labels.items())))
        with self._lock:
            top = self.topk.get(lk)
            if top is None:
                top = self.topk[lk] = TopK(capacity)
            top.add(key)

    def top(self, name: str, k: int = 10, **labels: str) -> list[tuple[str, int]]:
        with self._lock:
            top = self.topk.get((name, tuple(sorted(labels.items()))))
            return top.top(k) if top else []

    def read_gauges(self) -> dict[tuple[str, Labels], float]:
        """Set gauges and computed ones, as of now."""
        with self._lock:
            out = dict(self.gauges)
            fns = list(self.callbacks.items())
        for key, fn in fns:
            out[key] = float(fn())
        return out
