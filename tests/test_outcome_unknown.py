"""A handler that cannot tell whether its downstream applied the effect raises OutcomeUnknown;
under effectively-once an unkeyed effect reads ANY exception that way unless the handler proves
the effect did not happen (EffectNotApplied, the effect's not_applied_on: issue 13, item 10).

Keyed and transactional effects are retried (the key, or the rolled-back transaction, makes the
re-run safe); an unkeyed effect is quarantined as outcome_unknown, never blindly re-run, unless
it opted into on_unknown="retry"; at-least-once retries it (duplicates are its sentence);
at-most-once never retries. Memory broker and fake clock (tests/runtime_harness.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from replaysafe import (
    ConfigurationError,
    Context,
    Effect,
    EffectNotApplied,
    EffectRisk,
    Guarantee,
    OutcomeUnknown,
    QuarantineReason,
    RetryPolicy,
)
from replaysafe import observe as o
from replaysafe.ledger import OpKey, State

from .runtime_harness import Harness, order, run

EO = Guarantee.EFFECTIVELY_ONCE
RETRY = RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=0.5)


def timing_out(h: Harness, times: int) -> tuple[list[str], Any]:
    """A charge that sends the request (the effect happens downstream) and then, ``times`` times
    per operation, loses the answer: it raises OutcomeUnknown."""
    runs: list[str] = []

    async def charge(ctx: Context) -> str:
        runs.append(ctx.operation_id)
        fx = await h.probe.apply(ctx.payload["order"], 10, ctx.idempotency_key)
        if runs.count(ctx.operation_id) <= times:
            raise OutcomeUnknown(f"payments-api did not answer within 5s for {ctx.operation_id}")
        return fx

    return runs, charge


async def test_keyed_effect_is_retried_and_the_key_makes_the_retry_safe() -> None:
    h = Harness()
    runs, charge = timing_out(h, times=1)
    h.handler(EO, effect=Effect.keyed("payments"), lease=5, retry=RETRY)(charge)
    await run(h, order(1), order(2))
    assert sorted(runs) == ["charge:order-1"] * 2 + ["charge:order-2"] * 2  # each retried once
    assert h.probe.per_subject() == {"order-1": 1, "order-2": 1}  # the key answered the re-run
    assert h.probe.replays_answered == 2
    assert await h.ledger.quarantined() == []
    assert h.total(o.OUTCOME_UNKNOWN) == 2 and h.total(o.RETRIES) == 2
    rec = await h.ledger.get(OpKey("charge", "charge:order-1"))
    assert rec is not None and rec.state is State.COMPLETED and rec.attempts == 2


async def test_unkeyed_effect_is_quarantined_as_outcome_unknown_never_rerun() -> None:
    h = Harness()
    runs, charge = timing_out(h, times=1)
    h.handler(EO, effect=Effect.unkeyed("smtp"), lease=5, retry=RETRY)(charge)
    await run(h, order(1), order(2))
    assert sorted(runs) == ["charge:order-1", "charge:order-2"]  # never run again
    assert h.probe.per_subject() == {"order-1": 1, "order-2": 1}
    entries = sorted(await h.ledger.quarantined(), key=lambda e: e.operation_id or "")
    assert [(e.operation_id, e.reason, e.risk, e.attempts) for e in entries] == [
        (f"charge:order-{i}", QuarantineReason.OUTCOME_UNKNOWN, EffectRisk.OUTCOME_UNKNOWN, 1)
        for i in (1, 2)
    ]
    assert "payments-api did not answer" in entries[0].last_detail
    rec = await h.ledger.get(OpKey("charge", "charge:order-1"))
    assert rec is not None and rec.state is State.QUARANTINED  # later copies are not run either
    assert h.total(o.OUTCOME_UNKNOWN) == 2 and h.total(o.RETRIES) == 0


async def test_unkeyed_effect_that_opted_into_retry_is_rerun_at_least_once() -> None:
    h = Harness()
    runs, charge = timing_out(h, times=1)
    h.handler(EO, effect=Effect.unkeyed("smtp", on_unknown="retry"), lease=5, retry=RETRY)(charge)
    await run(h, order(1))
    assert runs == ["charge:order-1"] * 2
    assert h.probe.per_subject() == {"order-1": 2}  # honestly at-least-once at smtp
    assert await h.ledger.quarantined() == []


async def test_transactional_effect_rolls_back_and_is_retried(tmp_path: Path) -> None:
    from replaysafe.ledger.sqlite import SQLiteLedger
    from replaysafe.testing import FakeClock

    clock = FakeClock()
    ledger = SQLiteLedger(tmp_path / "l.db", clock=clock)
    h = Harness(ledger=ledger, clock=clock)
    async with ledger.transaction() as tx:
        await tx.execute("CREATE TABLE charges (order_id TEXT)")
    runs: list[str] = []

    async def book(ctx: Context) -> None:
        assert ctx.tx is not None
        runs.append(ctx.operation_id)
        await ctx.tx.execute("INSERT INTO charges VALUES (?)", (ctx.payload["order"],))
        if len(runs) == 1:
            raise OutcomeUnknown("lost the answer of a side call")

    h.handler(EO, effect=Effect.transactional(), lease=5, retry=RETRY)(book)
    await run(h, order(1))
    async with ledger.transaction() as tx:
        rows = await tx.fetchall("SELECT order_id, COUNT(*) FROM charges GROUP BY order_id")
    await ledger.close()
    assert runs == ["charge:order-1"] * 2
    assert rows == [("order-1", 1)]  # the first attempt's row rolled back with it


async def test_a_retry_budget_spent_on_unknown_outcomes_says_outcome_unknown() -> None:
    h = Harness()
    runs, charge = timing_out(h, times=99)
    h.handler(EO, effect=Effect.keyed("payments"), lease=5, retry=RETRY)(charge)
    await run(h, order(1))
    assert len(runs) == RETRY.max_attempts
    [entry] = await h.ledger.quarantined()
    # a DLQ could not tell: the effect may have happened (the downstream holds it under the key)
    assert (entry.reason, entry.risk) == (QuarantineReason.MAX_ATTEMPTS, EffectRisk.OUTCOME_UNKNOWN)
    assert h.total(o.OUTCOME_UNKNOWN) == RETRY.max_attempts


async def test_a_policy_that_gives_up_on_it_quarantines_with_outcome_unknown_risk() -> None:
    h = Harness()
    runs, charge = timing_out(h, times=1)
    policy = RetryPolicy(max_attempts=3, base_delay=0.1, give_up_on=(OutcomeUnknown,))
    h.handler(EO, effect=Effect.keyed("payments"), lease=5, retry=policy)(charge)
    await run(h, order(1))
    assert runs == ["charge:order-1"]
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.NON_RETRYABLE_ERROR
    assert entry.risk is EffectRisk.OUTCOME_UNKNOWN


async def test_at_least_once_retries_and_counts_it() -> None:
    h = Harness()
    runs, charge = timing_out(h, times=1)
    h.handler(Guarantee.AT_LEAST_ONCE, lease=5, retry=RETRY)(charge)
    await run(h, order(1))
    assert runs == ["charge:order-1"] * 2
    assert h.probe.per_subject() == {"order-1": 2}  # the duplicate at-least-once allows
    assert h.total(o.OUTCOME_UNKNOWN) == 1 and h.total(o.RETRIES) == 1


async def test_at_most_once_counts_it_and_never_retries() -> None:
    h = Harness()
    runs, charge = timing_out(h, times=1)
    h.handler(Guarantee.AT_MOST_ONCE, lease=5, retry=RETRY)(charge)
    await run(h, order(1))
    assert runs == ["charge:order-1"]
    assert h.total(o.OUTCOME_UNKNOWN) == 1 and h.total(o.RETRIES) == 0


def test_reruns_when_unknown_follows_the_effect() -> None:
    assert Effect.keyed("p").reruns_when_unknown
    assert Effect.transactional().reruns_when_unknown
    assert not Effect.unkeyed("smtp").reruns_when_unknown
    assert Effect.unkeyed("smtp", on_unknown="retry").reruns_when_unknown


# ---------------------------------------------------------------- item 10: unkeyed, plain errors


def failing(h: Harness, *errors: BaseException) -> tuple[list[str], Any]:
    """A charge that sends (the effect happens, unless the error says it cannot have) and then
    raises ``errors[n]`` on its n-th run, succeeding once they are used up."""
    runs: list[str] = []

    async def charge(ctx: Context) -> str:
        runs.append(ctx.operation_id)
        n = len(runs) - 1
        error = errors[n] if n < len(errors) else None
        if isinstance(error, ConnectionRefusedError | EffectNotApplied):
            raise error  # refused before anything was sent
        fx = await h.probe.apply(ctx.payload["order"], 10, ctx.idempotency_key)
        if error is not None:
            raise error  # the request left, then the connection dropped
        return fx

    return runs, charge


async def test_unkeyed_plain_exception_is_an_unknown_outcome_quarantined_never_rerun() -> None:
    """A disconnect after sending used to count as a clean failure and be retried: a silent
    second charge. It is quarantined with the exception as evidence."""
    h = Harness(honour_keys=False)
    runs, charge = failing(h, ConnectionResetError("peer reset the connection after the send"))
    h.handler(EO, effect=Effect.unkeyed("smtp"), lease=5, retry=RETRY)(charge)
    await run(h, order(1))
    assert runs == ["charge:order-1"]
    assert h.probe.per_subject() == {"order-1": 1}
    [entry] = await h.ledger.quarantined()
    assert (entry.reason, entry.risk, entry.attempts) == (
        QuarantineReason.OUTCOME_UNKNOWN, EffectRisk.OUTCOME_UNKNOWN, 1
    )  # fmt: skip
    assert "attempt 1 failed with ConnectionResetError: peer reset" in entry.first_detail
    assert h.total(o.OUTCOME_UNKNOWN) == 1 and h.total(o.RETRIES) == 0


async def test_unkeyed_effect_not_applied_is_retried_and_applied_once() -> None:
    h = Harness(honour_keys=False)
    refused = EffectNotApplied("smtp refused the connection")
    runs, charge = failing(h, refused, refused)
    h.handler(EO, effect=Effect.unkeyed("smtp"), lease=5, retry=RETRY)(charge)
    await run(h, order(1))
    assert runs == ["charge:order-1"] * 3
    assert h.probe.per_subject() == {"order-1": 1}
    assert await h.ledger.quarantined() == []
    assert h.total(o.RETRIES) == 2 and h.total(o.OUTCOME_UNKNOWN) == 0
    rec = await h.ledger.get(OpKey("charge", "charge:order-1"))
    assert rec is not None and rec.state is State.COMPLETED and rec.attempts == 3


async def test_unkeyed_not_applied_on_lists_what_proves_no_effect() -> None:
    h = Harness(honour_keys=False)
    effect = Effect.unkeyed("smtp", not_applied_on=(ConnectionRefusedError,))
    runs, charge = failing(h, ConnectionRefusedError("nothing listens"), TimeoutError("no reply"))
    h.handler(EO, effect=effect, lease=5, retry=RETRY)(charge)
    await run(h, order(1))
    # refused: retried; the timeout after the send is not on the list: quarantined, not re-run
    assert runs == ["charge:order-1"] * 2
    assert h.probe.per_subject() == {"order-1": 1}
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.OUTCOME_UNKNOWN and entry.attempts == 2
    assert "TimeoutError: no reply" in entry.first_detail


async def test_a_budget_spent_on_effect_not_applied_is_released_cleanly() -> None:
    h = Harness(honour_keys=False)
    runs, charge = failing(h, *[EffectNotApplied("down")] * 9)
    h.handler(EO, effect=Effect.unkeyed("smtp"), lease=5, retry=RETRY)(charge)
    await run(h, order(1))
    assert len(runs) == RETRY.max_attempts and h.probe.effects == []
    [entry] = await h.ledger.quarantined()
    assert (entry.reason, entry.risk) == (QuarantineReason.MAX_ATTEMPTS,
                                          EffectRisk.RELEASED_CLEANLY)  # fmt: skip


async def test_unkeyed_opted_into_retry_reruns_a_plain_exception() -> None:
    h = Harness(honour_keys=False)
    runs, charge = failing(h, ConnectionResetError("after the send"))
    effect = Effect.unkeyed("smtp", on_unknown="retry")
    h.handler(EO, effect=effect, lease=5, retry=RETRY)(charge)
    await run(h, order(1))
    assert runs == ["charge:order-1"] * 2
    assert h.probe.per_subject() == {"order-1": 2}  # at-least-once at smtp, as declared


async def test_at_least_once_unkeyed_retries_a_plain_exception() -> None:
    h = Harness(honour_keys=False)
    runs, charge = failing(h, ConnectionResetError("after the send"))
    h.handler(Guarantee.AT_LEAST_ONCE, lease=5, retry=RETRY)(charge)
    await run(h, order(1))
    assert runs == ["charge:order-1"] * 2
    assert h.probe.per_subject() == {"order-1": 2}  # its sentence: may duplicate


async def test_keyed_effect_retries_a_plain_exception() -> None:
    h = Harness()
    runs, charge = failing(h, ConnectionResetError("after the send"))
    h.handler(EO, effect=Effect.keyed("payments"), lease=5, retry=RETRY)(charge)
    await run(h, order(1))
    assert runs == ["charge:order-1"] * 2
    assert h.probe.per_subject() == {"order-1": 1}  # the key answered the re-run


def test_not_applied_on_takes_exception_classes() -> None:
    assert Effect.unkeyed("s", not_applied_on=OSError).not_applied_on == (OSError,)
    effect = Effect.unkeyed("s", not_applied_on=(ConnectionRefusedError,))
    assert effect.not_applied(ConnectionRefusedError()) and effect.not_applied(EffectNotApplied())
    assert not effect.not_applied(ConnectionResetError())
    for bad in (("OSError",), (OSError, 3), [OSError]):
        with pytest.raises(ConfigurationError, match="tuple of exception classes"):
            Effect.unkeyed("s", not_applied_on=bad)  # type: ignore[arg-type]
