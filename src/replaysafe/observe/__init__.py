"""Signals: the one place that names them, and an in-process recorder.

Exporters (Prometheus, OpenTelemetry) read a :class:`Stats`; they never invent names of their own.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

# ---- counters (labels in brackets)
DELIVERIES = "replaysafe_deliveries_total"  # [handler, outcome]
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
# ---- histograms
AMBIGUITY_WINDOW = "replaysafe_ambiguity_window_seconds"  # [handler] EFFECTED -> COMPLETED
HANDLER_SECONDS = "replaysafe_handler_seconds"  # [handler]

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

Labels = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class Summary:
    count: int = 0
    total: float = 0.0
    max: float = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.max = max(self.max, value)


class Stats:
    """Thread-safe counters and summaries keyed by (name, labels)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: Counter[tuple[str, Labels]] = Counter()
        self.summaries: dict[tuple[str, Labels], Summary] = {}

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.counters[key] += amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.summaries.setdefault(key, Summary()).add(value)

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
                    out.count += s.count
                    out.total += s.total
                    out.max = max(out.max, s.max)
        return out
