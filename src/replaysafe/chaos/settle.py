"""A chaos run in progress: its context, the bounded wait until it has settled, the second
phase of faults that act after the first drain, and how often the fault hit its window."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replaysafe.app import App
from replaysafe.brokers.base import Broker
from replaysafe.chaos.app import RunSpec, hits, mark_once, open_redrive_gate
from replaysafe.chaos.cells import ChaosConfig
from replaysafe.chaos.checker import Published
from replaysafe.chaos.ledgers import effect_rows, quarantine_flags, retrying
from replaysafe.chaos.sink import Attempt, EffectSink
from replaysafe.envelope import Envelope
from replaysafe.guarantees import Guarantee
from replaysafe.ledger.base import LedgerBackend, QuarantineEntry
from replaysafe.producer import Producer
from replaysafe.quarantine import QuarantineReason

log = logging.getLogger("replaysafe.chaos")


@dataclass(slots=True)
class RunContext:
    cfg: ChaosConfig
    sink: EffectSink
    spec: RunSpec
    ledger: LedgerBackend
    history: list[Published]
    rundir: Path
    #: how each settle wait ended (evidence when a run reports losses: did it end unsettled?)
    settles: list[str] = field(default_factory=list)


def count_hits(
    spec: RunSpec,
    records: list[dict[str, Any]],
    attempts: Sequence[Attempt],
    history: Sequence[Published],
) -> int:
    """How often the fault hit its window (not merely how often it was armed)."""
    fault = spec.fault
    targets = set(spec.targets)
    if fault == "pause_beyond_lease":
        # the window: another worker took the operation over while the paused one was stalled
        # (in one process every worker shares the pid, so the pause interval decides there)
        n = 0
        for op, pid, at in hits(spec.state_dir, fault):
            if any(
                r["e"] == "delivered"
                and r["op"] == op
                and r["t"] > at
                and (r.get("pid") != pid if not spec.in_process else r["t"] < at + spec.pause)
                for r in records
            ):
                n += 1
        return n
    if fault == "visibility_overlap":
        # the window: another copy was delivered while the first execution was still running
        first: dict[str, float] = {}
        n = 0
        for r in records:
            if r["e"] != "delivered" or r["op"] not in targets:
                continue
            t0 = first.setdefault(r["op"], r["t"])
            if 0 < r["t"] - t0 < spec.slow:
                n += 1
                first[r["op"]] = -1e18  # count each operation once
        return n
    if fault == "response_lost":
        return sum(1 for a in attempts if a.outcome == "applied_response_lost")
    if fault == "key_reuse":
        first_fp: dict[str, str] = {}
        for p in history:
            first_fp.setdefault(p.op, p.fingerprint)
        return sum(
            1
            for r in records
            if r["e"] == "delivered" and r["op"] in first_fp and r["fp"] != first_fp[r["op"]]
        )
    if fault == "beyond_horizon":
        return sum(1 for r in records if r["e"] == "delivered" and r["op"] in targets)
    if fault == "redrive_applied":
        redriven = {op for op, _, _ in hits(spec.state_dir, fault)}
        applied = {a.op for a in attempts if a.effect}
        return len(redriven & applied)
    return len(hits(spec.state_dir, fault))


def ambiguity_windows(
    attempts: Iterable[Attempt], completed: Iterable[tuple[str, float]]
) -> list[float]:
    """EFFECTED -> COMPLETED per operation: first effect's end to the first completion after it."""
    effected: dict[str, float] = {}
    for a in attempts:
        if a.effect and (a.op not in effected or a.ended < effected[a.op]):
            effected[a.op] = a.ended
    out: list[float] = []
    seen: set[str] = set()
    for op, t in sorted(completed, key=lambda x: x[1]):
        e = effected.get(op)
        if op in seen or e is None or t < e:
            continue
        seen.add(op)
        out.append(t - e)
    return out


async def _resolved(ctx: RunContext) -> tuple[int, int]:
    """(unresolved confirmed operations, activity counter) for the quiet-and-done wait."""
    attempts = (
        await effect_rows(
            ctx.ledger, ctx.spec.run, ctx.spec.ledger["kind"], ctx.spec.ledger.get("schema")
        )
        if ctx.spec.effect == "transactional"
        else ctx.sink.attempts(ctx.spec.run)
    )
    applied = {a.op for a in attempts if a.effect}
    quarantined = {f.op for f in await quarantine_flags(ctx.ledger)}
    confirmed = {p.op for p in ctx.history if p.confirmed}
    unresolved = len(confirmed - applied - quarantined)
    activity = len(attempts) + len(quarantined)
    return unresolved, activity


async def wait_settled(
    ctx: RunContext,
    *,
    depth: Callable[[], Awaitable[int]] | None = None,
    authoritative: bool = False,
    quiet: float | None = None,
) -> None:
    """Wait until the run has settled, bounded by the run timeout.

    ``depth()`` is what the broker still holds for the group. ``authoritative`` (the memory
    broker: unsettled deliveries included) means depth 0 is the end once nothing moved for
    ``quiet`` seconds. Otherwise (real brokers report ready messages, not those held by a
    consumer) the run has settled when the broker holds nothing and every confirmed operation is
    applied or quarantined with ``quiet`` seconds without movement — or, when some stay
    unresolved (losses are a possible outcome), three times as long."""
    quiet = quiet if quiet is not None else max(1.0, ctx.spec.lease, ctx.spec.pause + 0.5)
    deadline = time.monotonic() + ctx.cfg.run_timeout
    last_change = time.monotonic()
    last: tuple[int, int, int] | None = None
    while time.monotonic() < deadline:
        unresolved, activity = await _resolved(ctx)
        held = 0
        if depth is not None:
            try:
                held = await depth()
            except Exception as exc:  # a depth probe failing must not end the run early
                log.warning("chaos run %s: broker depth unavailable: %r", ctx.spec.run, exc)
                held = -1
        state = (activity, held, _record_count(ctx.spec.record_dir))
        if state != last:
            last = state
            last_change = time.monotonic()
        idle = time.monotonic() - last_change
        log.debug("chaos run %s: unresolved=%d held=%d idle=%.1f", ctx.spec.run, unresolved,
                  held, idle)  # fmt: skip
        if held == 0 and authoritative and idle >= quiet:
            ctx.settles.append(f"settled ({unresolved} unresolved)")
            return
        if (
            held == 0
            and not authoritative
            and ((unresolved == 0 and idle >= quiet) or idle >= quiet * 3)
        ):
            ctx.settles.append(
                "settled" if unresolved == 0 else f"quiet {idle:.1f}s, {unresolved} unresolved"
            )
            return
        await asyncio.sleep(0.2)
    ctx.settles.append(f"timed out after {ctx.cfg.run_timeout:.0f}s")
    log.warning("chaos run %s did not settle within %.0fs", ctx.spec.run, ctx.cfg.run_timeout)


def _record_count(record_dir: str) -> int:
    d = Path(record_dir)
    return sum(f.stat().st_size for f in d.glob("*.jsonl")) if d.is_dir() else 0


async def second_phase(ctx: RunContext, publisher: Broker, app: App) -> bool:
    """Faults that act after the first drain. Returns True when something was published."""
    spec = ctx.spec
    if spec.fault == "key_reuse":
        reused = [
            Envelope.of(op, {"i": -1, "amount": 1, "reused": True}, key="reuse")
            for op in spec.targets
        ]
        producer = Producer(publisher, Guarantee(spec.guarantee))
        await producer.publish(spec.source, reused)
        ctx.history.extend(Published(e.operation_id, e.fingerprint, True, time.time())
                           for e in reused)  # fmt: skip
        return True
    if spec.fault == "redrive_applied":
        from replaysafe.redrive import redrive

        open_redrive_gate(spec.state_dir)
        targets = set(spec.targets)
        everything: list[QuarantineEntry] = await retrying(
            lambda: ctx.ledger.quarantined(limit=100_000)
        )
        entries = [
            e
            for e in everything
            if e.operation_id in targets and e.reason is QuarantineReason.NON_RETRYABLE_ERROR
        ]
        for r in await redrive(app, entries):
            if r.redriven and r.operation_id is not None:
                mark_once(spec.state_dir, spec.fault, r.operation_id)
        return bool(entries)
    return False
