"""An unkeyed effect records that it is about to start (issue 13, item 11a).

A worker killed between the claim and the handler's start left an in-flight claim that the next
delivery quarantined as ``outcome_unknown`` though the effect never ran. Unkeyed effects under
effectively-once now claim with ``marks_start`` and call ``Ledger.mark_started`` (coalesced: one
round trip per batch) right before the handler: a recovered claim whose previous attempt never
marked is re-run; one that marked stays ``outcome_unknown``. Keyed, transactional and
at-least-once handlers never mark. Memory broker, fake clock (tests/runtime_harness.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from replaysafe import (
    Context,
    Effect,
    EffectRisk,
    Guarantee,
    LeaseLost,
    LedgerUnavailable,
    QuarantineReason,
    RetryPolicy,
)
from replaysafe import failpoints as fp
from replaysafe import observe as o
from replaysafe.ledger import MemoryLedger, OpKey, State
from replaysafe.ledger.base import Claim, ClaimOutcome, ClaimRequest, Ledger
from replaysafe.testing import FakeClock

from .runtime_harness import Harness, once_for, order, run

EO, ALO = Guarantee.EFFECTIVELY_ONCE, Guarantee.AT_LEAST_ONCE
RETRY = RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=0.3)


class CountingLedger(MemoryLedger):
    """A memory ledger that counts claim and mark round trips (and can fail the marks)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.claims: list[list[ClaimRequest]] = []
        self.marks: list[int] = []
        #: what the next mark_started calls do instead of marking: an exception or "stale"
        self.mark_faults: list[BaseException | str] = []

    async def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        self.claims.append([ClaimRequest(key, fingerprint, owner, lease)])
        return await super().claim(key, fingerprint, owner, lease)

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        self.claims.append(list(requests))
        return await super().claim_many(requests)

    async def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        self.marks.append(len(claims))
        if self.mark_faults:
            fault = self.mark_faults.pop(0)
            if isinstance(fault, BaseException):
                raise fault
            return [LeaseLost(f"{c.key} was taken over (test)") for c in claims]
        return await super().mark_started(claims)


def charging(h: Harness, **kwargs: Any) -> list[str]:
    runs: list[str] = []

    async def charge(ctx: Context) -> str:
        runs.append(ctx.operation_id)
        return await h.probe.apply(ctx.payload["order"], 10, ctx.idempotency_key)

    h.app.handler("orders", name="charge", lease=5, retry=RETRY, **kwargs)(charge)
    return runs


@pytest.mark.parametrize("point", [fp.AFTER_CLAIM, fp.BEFORE_EFFECT])
async def test_a_claim_killed_before_its_effect_started_is_rerun_not_quarantined(
    point: str,
) -> None:
    h = Harness(honour_keys=False)
    charging(h, guarantee=EO, effect=Effect.unkeyed("smtp"))
    h.failpoints.enable(point, "kill", when=once_for("charge:order-1"))
    await run(h, order(1), order(2))
    assert h.failpoints.fired[point] == 1 and h.crashes == 1
    assert h.probe.per_subject() == {"order-1": 1, "order-2": 1}
    assert await h.ledger.quarantined() == []
    rec = await h.ledger.get(OpKey("charge", "charge:order-1"))
    assert rec is not None and rec.state is State.COMPLETED and rec.attempts == 2


async def test_a_claim_killed_after_its_effect_started_stays_outcome_unknown() -> None:
    h = Harness(honour_keys=False)
    runs = charging(h, guarantee=EO, effect=Effect.unkeyed("smtp"))
    h.failpoints.enable(fp.AFTER_EFFECT_BEFORE_LEDGER, "kill", when=once_for("charge:order-1"))
    await run(h, order(1))
    assert runs == ["charge:order-1"]  # marked started, then killed: never re-run
    [entry] = await h.ledger.quarantined()
    assert (entry.reason, entry.risk) == (QuarantineReason.OUTCOME_UNKNOWN,
                                          EffectRisk.OUTCOME_UNKNOWN)  # fmt: skip


async def test_a_started_effect_is_not_forgotten_when_the_next_attempt_dies_early() -> None:
    """Attempt 1 starts its effect and dies; attempt 2 takes over and dies right after its claim
    (before it could quarantine). Attempt 3 must not read attempt 2's "never started" alone: the
    chaos harness found exactly this as a silent second charge.

    A guard of the start-mark design, not of the issue's bug: the pre-issue code (no marks, every
    recovered unkeyed claim quarantined) passes it too. It failed on the first version of the
    mark design (8873c80), which judged a recovered claim by the last attempt's mark only."""
    h = Harness(honour_keys=False)
    runs = charging(h, guarantee=EO, effect=Effect.unkeyed("smtp"))
    op = "charge:order-1"

    def on(attempt: int) -> Any:
        return lambda ctx: ctx.get("operation_id") == op and ctx.get("attempt") == attempt

    h.failpoints.enable(fp.AFTER_EFFECT_BEFORE_LEDGER, "kill", when=on(1))
    h.failpoints.enable(fp.AFTER_CLAIM, "kill", when=on(2))
    await run(h, order(1))
    assert h.crashes == 2
    assert runs == [op] and h.probe.per_subject() == {"order-1": 1}
    [entry] = await h.ledger.quarantined()
    assert (entry.reason, entry.risk, entry.attempts) == (
        QuarantineReason.OUTCOME_UNKNOWN, EffectRisk.OUTCOME_UNKNOWN, 3
    )  # fmt: skip


async def test_a_batch_marks_its_effects_in_one_round_trip() -> None:
    clock = FakeClock()
    ledger = CountingLedger(clock)
    h = Harness(ledger=ledger, clock=clock, honour_keys=False)
    charging(h, guarantee=EO, effect=Effect.unkeyed("smtp"), concurrency=16)
    await run(h, *(order(i) for i in range(16)))
    assert h.probe.per_subject() == {f"order-{i}": 1 for i in range(16)}
    assert sum(ledger.marks) == 16
    assert all(r.marks_start for batch in ledger.claims for r in batch)
    # one mark per claimed batch, not one per message
    assert len(ledger.marks) == len(ledger.claims) < 16


@pytest.mark.parametrize(
    ("guarantee", "effect"),
    [
        (EO, Effect.keyed("payments")),
        (EO, Effect.unkeyed("smtp", on_unknown="retry")),
        (ALO, None),
    ],
    ids=["keyed", "unkeyed-retry", "at-least-once"],
)
async def test_handlers_that_rerun_anyway_never_mark(guarantee: Guarantee, effect: Any) -> None:
    clock = FakeClock()
    ledger = CountingLedger(clock)
    h = Harness(ledger=ledger, clock=clock)
    charging(h, guarantee=guarantee, effect=effect)
    await run(h, *(order(i) for i in range(4)))
    assert sum(h.probe.per_subject().values()) == 4
    assert ledger.marks == []
    assert not any(r.marks_start for batch in ledger.claims for r in batch)


@pytest.mark.parametrize(
    "fault",
    [LedgerUnavailable("ledger down (test)"), "stale"],
    ids=["ledger-unavailable", "lease-lost"],
)
async def test_no_effect_starts_when_the_mark_cannot_be_written(
    fault: BaseException | str,
) -> None:
    clock = FakeClock()
    ledger = CountingLedger(clock)
    ledger.mark_faults = [fault]
    h = Harness(ledger=ledger, clock=clock, honour_keys=False)
    runs = charging(h, guarantee=EO, effect=Effect.unkeyed("smtp"))
    await run(h, order(1))
    # the first attempt never started; its lease ran out and the recovered claim, knowing that,
    # ran it once
    assert runs == ["charge:order-1"]
    assert h.probe.per_subject() == {"order-1": 1}
    assert await h.ledger.quarantined() == []
    assert len(ledger.marks) == 2
    counter = o.LEDGER_UNAVAILABLE if isinstance(fault, BaseException) else o.LEASE_LOST
    assert h.total(counter) >= 1
    rec = await h.ledger.get(OpKey("charge", "charge:order-1"))
    assert rec is not None and rec.state is State.COMPLETED and rec.attempts == 2


async def test_a_poison_that_kills_before_every_start_is_quarantined_as_never_started() -> None:
    h = Harness(honour_keys=False)
    charging(h, guarantee=EO, effect=Effect.unkeyed("smtp"))
    h.failpoints.enable(
        fp.BEFORE_EFFECT, "kill", when=lambda ctx: ctx["operation_id"] == "charge:order-1"
    )
    await run(h, order(1), order(2))
    assert h.crashes == RETRY.max_attempts
    assert h.probe.per_subject() == {"order-2": 1}
    [entry] = await h.ledger.quarantined()
    # no attempt ever started the effect: the quarantine says so (a human can redrive it)
    assert (entry.reason, entry.risk) == (QuarantineReason.MAX_ATTEMPTS,
                                          EffectRisk.RELEASED_CLEANLY)  # fmt: skip


async def test_the_default_mark_started_checks_the_fence_only() -> None:
    """A backend that records nothing inherits a mark that only checks each fence (its
    recovered claims report previous_started=True: conservative)."""
    ledger = MemoryLedger(FakeClock())
    key = OpKey("s", "op")
    outcome = await ledger.claim(key, "fp", "w1", 5)
    claim = outcome.claim  # type: ignore[union-attr]
    assert await Ledger.mark_started(ledger, [claim]) == [claim]
    await ledger.complete(claim)
    [lost] = await Ledger.mark_started(ledger, [claim])
    assert isinstance(lost, LeaseLost)


async def test_a_mark_whose_waiter_was_cancelled_before_it_went_out_is_not_written() -> None:
    """A handler cancelled while it waits for its mark (a drain timeout, a stop) never starts:
    its mark is left out of the batch if the batch has not gone out yet, so that a later
    takeover re-runs it instead of quarantining it."""
    import asyncio

    from replaysafe.runtime.batch import Coalescer as _Coalescer

    sent: list[list[str]] = []

    async def many(items: Sequence[str]) -> list[str]:
        sent.append(list(items))
        return list(items)

    starter: _Coalescer[str, str] = _Coalescer(many, drop_cancelled=True)
    kept = asyncio.ensure_future(starter.submit("kept"))
    dropped = asyncio.ensure_future(starter.submit("dropped"))
    await asyncio.sleep(0)  # both queued; the flush waits one tick for more
    dropped.cancel()
    assert await kept == "kept"
    assert sent == [["kept"]]
    # the default (completions) still sends a cancelled caller's item
    completer: _Coalescer[str, str] = _Coalescer(many)
    gone = asyncio.ensure_future(completer.submit("done anyway"))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0.01)
    assert sent[-1] == ["done anyway"]
