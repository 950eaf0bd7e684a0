"""The checker: counts what went wrong from ground truth, not from the runtime's opinion of itself.

Inputs: the sink journal (every attempt the downstream saw; for a transactional effect, the
committed effect rows), the producer's history (every publish call and whether the broker
confirmed it), the ledger's quarantine, and the broker completions the workers recorded. Each
counter has exactly the issue's meaning:

- ``lost``: operations with an acknowledged (confirmed) publish, never applied, not quarantined.
- ``duplicates``: effects beyond the first per operation.
- ``acked_unapplied``: operations completed at the broker with no effect and no quarantine.
- ``unexpected``: effects for operations nobody published, or with a payload other than the
  operation's first one.
- ``overlaps``: pairs of executions of one operation in flight at the sink at the same time
  where neither was refused by fencing.
- ``fenced``: attempts the sink refused for a stale fencing token.
- ``flagged``: operations the library marked at risk (quarantined as ``outcome_unknown`` or with
  risk ``outcome_unknown``).
- ``quarantined``: quarantine entries (distinct operations, or messages without one).
- ``fault_hits``: how often the fault actually hit its window. A run whose fault never hit is
  ``valid: false``: it proves nothing.

``silent_duplicates`` (not in the JSON; the pass bar of unkeyed effects uses it): operations with
a duplicate effect that was not flagged *before* the re-attempt started.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from replaysafe.chaos.sink import FENCED, Attempt
from replaysafe.quarantine import EffectRisk, QuarantineReason

NO_FAULT = "none"


@dataclass(frozen=True, slots=True)
class Published:
    """One publish of an operation as the producer saw it."""

    op: str
    fingerprint: str
    #: the broker confirmed it (boundary PUBLISHED); False when the outcome stayed ambiguous
    confirmed: bool
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class Flag:
    """A quarantine entry, reduced to what the checker needs."""

    op: str | None
    reason: str
    risk: str
    at: float

    @property
    def at_risk(self) -> bool:
        return (
            self.reason == QuarantineReason.OUTCOME_UNKNOWN.value
            or self.risk == EffectRisk.OUTCOME_UNKNOWN.value
        )


@dataclass(slots=True)
class RunResult:
    """One cell of the matrix; ``as_json`` is exactly the issue's row."""

    guarantee: str
    effect: str
    fault: str
    lost: int = 0
    duplicates: int = 0
    acked_unapplied: int = 0
    unexpected: int = 0
    overlaps: int = 0
    fenced: int = 0
    flagged: int = 0
    quarantined: int = 0
    fault_hits: int = 0
    valid: bool = False
    # --- not in the JSON: evidence for the pass bar and the report
    silent_duplicates: int = 0
    ops: int = 0
    seconds: float = 0.0
    #: per operation: the attempts of the first duplicated operation (for the timeline)
    duplicate_chain: list[Attempt] = field(default_factory=list)
    #: EFFECTED -> COMPLETED seconds per completed operation (the ambiguity window)
    windows: list[float] = field(default_factory=list)
    #: every attempt of the run (for the report's timelines)
    attempts: list[Attempt] = field(default_factory=list)
    #: the operations counted in ``lost`` (sorted)
    lost_ops: list[str] = field(default_factory=list)
    #: lines that explain a failing count (set by the harness: settle ends, record traces)
    evidence: list[str] = field(default_factory=list)

    def attempts_of(self, op: str) -> list[Attempt]:
        return [a for a in self.attempts if a.op == op]

    def as_json(self) -> dict[str, Any]:
        return {
            "guarantee": self.guarantee,
            "effect": self.effect,
            "fault": self.fault,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "acked_unapplied": self.acked_unapplied,
            "unexpected": self.unexpected,
            "overlaps": self.overlaps,
            "fenced": self.fenced,
            "flagged": self.flagged,
            "quarantined": self.quarantined,
            "fault_hits": self.fault_hits,
            "valid": self.valid,
        }


def check(
    *,
    guarantee: str,
    effect: str,
    fault: str,
    history: Iterable[Published],
    attempts: Iterable[Attempt],
    quarantine: Iterable[Flag],
    completed: Iterable[tuple[str, float]] = (),
    fault_hits: int = 0,
) -> RunResult:
    """Count one run (see the module docstring for each counter's definition)."""
    history = list(history)
    attempts = sorted(attempts, key=lambda a: (a.started, a.ended))
    flags = list(quarantine)
    first_fp: dict[str, str] = {}
    confirmed: set[str] = set()
    for p in history:
        first_fp.setdefault(p.op, p.fingerprint)
        if p.confirmed:
            confirmed.add(p.op)
    effects: dict[str, list[Attempt]] = defaultdict(list)
    by_op: dict[str, list[Attempt]] = defaultdict(list)
    for a in attempts:
        by_op[a.op].append(a)
        if a.effect:
            effects[a.op].append(a)
    quarantined_ops = {f.op for f in flags if f.op is not None}
    flagged_at: dict[str, float] = {}
    for f in flags:
        if f.op is not None and f.at_risk:
            flagged_at[f.op] = min(flagged_at.get(f.op, f.at), f.at)

    r = RunResult(guarantee, effect, fault, ops=len(first_fp))
    r.lost_ops = sorted(op for op in confirmed if op not in effects and op not in quarantined_ops)
    r.lost = len(r.lost_ops)
    r.duplicates = sum(len(v) - 1 for v in effects.values() if len(v) > 1)
    done_at_broker = {op for op, _ in completed}
    r.acked_unapplied = sum(
        1 for op in done_at_broker if op not in effects and op not in quarantined_ops
    )
    r.unexpected = sum(
        1
        for op, v in effects.items()
        for a in v
        if op not in first_fp or a.fingerprint != first_fp[op]
    )
    r.fenced = sum(1 for a in attempts if a.outcome == FENCED)
    r.overlaps = sum(_overlaps(v) for v in by_op.values() if len(v) > 1)
    r.flagged = len(flagged_at)
    r.quarantined = len(quarantined_ops) + sum(1 for f in flags if f.op is None)
    for op, v in effects.items():
        if len(v) < 2:
            continue
        if not r.duplicate_chain:
            r.duplicate_chain = list(by_op[op])
        flag = flagged_at.get(op)
        if flag is None or any(a.started < flag for a in v[1:]):
            r.silent_duplicates += 1
    r.attempts = attempts
    r.fault_hits = fault_hits
    r.valid = fault == NO_FAULT or fault_hits > 0
    return r


def _overlaps(attempts: list[Attempt]) -> int:
    """Pairs of attempts whose [started, ended] intervals intersect, neither fenced."""
    live = [a for a in attempts if a.outcome != FENCED]
    n = 0
    for i, a in enumerate(live):
        for b in live[i + 1 :]:
            if b.started < a.ended and a.started < b.ended:
                n += 1
    return n


def pass_bar(r: RunResult) -> list[str]:
    """The issue's pass bar for one run: the list of violations (empty when it passes).

    The bar that compares guarantees (at-least-once duplicates, at-most-once loses under
    ``crash_after_effect``) is :func:`contrast_bar`, over the whole matrix.
    """
    out: list[str] = []
    where = f"{r.guarantee}/{r.effect}/{r.fault}"
    if not r.valid:
        out.append(f"{where}: invalid (the fault never hit its window)")
    # DESIGN's sentences: at-most-once loses but never duplicates, at-least-once duplicates but
    # never loses
    if r.guarantee == "at-most-once" and r.duplicates:
        out.append(f"{where}: duplicates = {r.duplicates}, at-most-once must never duplicate")
    if r.guarantee == "at-least-once":
        for name in ("lost", "acked_unapplied"):
            if getattr(r, name):
                out.append(f"{where}: {name} = {getattr(r, name)}, at-least-once must never lose")
    if r.guarantee == "effectively-once":
        if r.effect in ("keyed", "transactional"):
            for name in ("lost", "duplicates", "acked_unapplied", "unexpected", "overlaps"):
                if getattr(r, name):
                    out.append(f"{where}: {name} = {getattr(r, name)}, must be 0")
        else:
            for name in ("lost", "acked_unapplied"):
                if getattr(r, name):
                    out.append(f"{where}: {name} = {getattr(r, name)}, must be 0")
            if r.silent_duplicates:
                out.append(f"{where}: {r.silent_duplicates} duplicate(s) not flagged first")
    if out and r.evidence:
        out.extend(f"{where}: {line}" for line in r.evidence)
    return out


def contrast_bar(runs: Iterable[RunResult]) -> list[str]:
    """The matrix-level bar: under ``crash_after_effect`` an unkeyed effect duplicates under
    at-least-once and loses under at-most-once, and a keyed one does not duplicate under
    at-least-once. Cells that were not run are not judged."""
    out: list[str] = []
    for r in runs:
        if r.fault != "crash_after_effect":
            continue
        if r.guarantee == "at-least-once" and r.effect == "unkeyed" and r.duplicates == 0:
            out.append("at-least-once/unkeyed/crash_after_effect shows no duplicates")
        if r.guarantee == "at-least-once" and r.effect == "keyed" and r.duplicates != 0:
            out.append(f"at-least-once/keyed/crash_after_effect shows {r.duplicates} duplicates")
        if r.guarantee == "at-most-once" and r.effect == "unkeyed" and r.lost == 0:
            out.append("at-most-once/unkeyed/crash_after_effect shows no loss")
    return out
