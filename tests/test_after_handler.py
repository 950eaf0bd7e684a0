"""A failure of replaysafe's own code after the handler body returned never runs the effect a
second time (issue 13, item 1b).

Each test injects one failure at one step of the pipeline after the handler returned, under each
guarantee and effect where that step exists, and counts the effects at the downstream:

- ``not_awaitable``: the handler ran as a plain function (a sync wrapper over an ``async def``,
  which registration accepts) and returned a ``str``; awaiting it would raise ``TypeError``;
- ``effect_span_end``: a tracing hook (an OpenTelemetry span processor) raises when the handler's
  span ends;
- ``duration_metric``: the metrics hook recording the handler's duration raises;
- ``result_encoding``: the handler's result cannot be encoded for the ledger (its ``__str__``
  raises); effectively-once only (no other guarantee stores a result);
- ``ledger_complete``: the ledger raises an unexpected error (not ``LedgerUnavailable``) when the
  effect is recorded; effectively-once only.

The SimulatedCrash of a failpoint is a crash, not a failure of ours: tests/test_runtime.py covers
it. Memory broker, fake clock (tests/runtime_harness.py); SQLite for the transactional effect.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from replaysafe import (
    Context,
    Effect,
    EffectRisk,
    Envelope,
    Guarantee,
    QuarantineReason,
    RetryPolicy,
)
from replaysafe import observe as o
from replaysafe.ledger import MemoryLedger, OpKey, SQLiteLedger, State
from replaysafe.observe import otel
from replaysafe.testing import FakeClock

from .runtime_harness import Harness

EO, ALO, AMO = Guarantee.EFFECTIVELY_ONCE, Guarantee.AT_LEAST_ONCE, Guarantee.AT_MOST_ONCE
RETRY = RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=0.3)
OP = "charge:order-1"
KEY = OpKey("charge", OP)

#: (case, guarantee, effect kind or None)
CASES = [
    ("eo-keyed", EO, "keyed"),
    ("eo-unkeyed", EO, "unkeyed"),
    ("eo-transactional", EO, "transactional"),
    ("at-least-once", ALO, None),
    ("at-most-once", AMO, None),
]
STEPS = ["not_awaitable", "effect_span_end", "duration_metric", "result_encoding",
         "ledger_complete"]  # fmt: skip


def applies(step: str, guarantee: Guarantee, kind: str | None) -> bool:
    if step == "not_awaitable":
        return kind != "transactional"  # a plain function cannot write through ctx.tx
    if step in ("result_encoding", "ledger_complete"):
        return guarantee is EO
    return True


MATRIX = [
    pytest.param(step, g, kind, id=f"{case}-{step}")
    for case, g, kind in CASES
    for step in STEPS
    if applies(step, g, kind)
]


class Unencodable:
    """A result whose text form raises (``json.dumps(..., default=str)`` calls ``str``)."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ of the result raised")


class CompleteFailsOnce(MemoryLedger):
    """A ledger whose first completion raises an error of its own (a bug, not an outage)."""

    failed = 0

    async def complete_many(self, items: Any) -> Any:
        if self.failed == 0:
            self.failed += 1
            raise RuntimeError("ledger bug while recording the effect")
        return await super().complete_many(items)


class CompleteInFailsOnce(SQLiteLedger):
    failed = 0

    async def complete_in(self, tx: Any, claim: Any, result: str | None = None) -> None:
        if self.failed == 0:
            self.failed += 1
            raise RuntimeError("ledger bug while recording the effect")
        await super().complete_in(tx, claim, result)


def failing_span_processor() -> Any:
    """An OpenTelemetry tracer provider whose span processor raises when the handler's span
    ends (the SDK calls processors synchronously and lets their errors through)."""
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    class Broken(SpanProcessor):
        def on_end(self, span: Any) -> None:
            if span.name == otel.EFFECT:
                raise RuntimeError("span exporter hook raised")

    provider = TracerProvider()
    provider.add_span_processor(Broken())
    return provider


async def make(
    step: str, guarantee: Guarantee, kind: str | None, tmp_path: Path, monkeypatch: Any
) -> tuple[Harness, list[str], list[str]]:
    """A harness with one handler charging ``order-1`` and ``step``'s failure injected. Returns
    (harness, body runs, effects): the downstream records an effect per call, except that a
    keyed call repeating a key it has seen is answered from that key."""
    clock = FakeClock()
    ledger: Any = None
    if kind == "transactional":
        cls = CompleteInFailsOnce if step == "ledger_complete" else SQLiteLedger
        ledger = cls(tmp_path / "ledger.db", clock=clock, synchronous="NORMAL")
        async with ledger.transaction() as tx:
            await tx.execute("CREATE TABLE charges (op TEXT)")
    elif step == "ledger_complete":
        ledger = CompleteFailsOnce(clock)
    h = Harness(ledger=ledger, clock=clock)
    runs: list[str] = []
    effects: list[str] = []
    keys: set[str] = set()

    def downstream(ctx: Context) -> None:
        runs.append(ctx.operation_id)
        if ctx.idempotency_key is not None:
            if ctx.idempotency_key in keys:
                return
            keys.add(ctx.idempotency_key)
        effects.append(ctx.operation_id)

    async def charge(ctx: Context) -> Any:
        if kind == "transactional":
            assert ctx.tx is not None
            runs.append(ctx.operation_id)
            await ctx.tx.execute("INSERT INTO charges (op) VALUES (?)", (ctx.operation_id,))
        else:
            downstream(ctx)
        return Unencodable() if step == "result_encoding" else {"charged": 100}

    handler: Any = charge
    if step == "not_awaitable":

        @functools.wraps(charge)
        def plain(ctx: Context) -> str:  # a sync wrapper: its body is the effect
            downstream(ctx)
            return "sent"

        handler = plain
    elif step == "effect_span_end":
        h.app.tracer_provider = failing_span_processor()
    elif step == "duration_metric":
        real = o.Stats.observe

        def observe(self: o.Stats, name: str, value: float, **labels: str) -> None:
            if name == o.HANDLER_SECONDS:
                raise RuntimeError("metrics hook raised")
            real(self, name, value, **labels)

        monkeypatch.setattr(o.Stats, "observe", observe)
    effect = {
        "keyed": Effect.keyed("payments"),
        "unkeyed": Effect.unkeyed("smtp"),
        "transactional": Effect.transactional(),
        None: None,
    }[kind]
    h.app.handler("orders", guarantee=guarantee, effect=effect, name="charge", lease=5,
                  retry=RETRY)(handler)  # fmt: skip
    return h, runs, effects


async def committed(h: Harness) -> int:
    assert isinstance(h.ledger, SQLiteLedger)
    async with h.ledger.transaction() as tx:
        return len(await tx.fetchall("SELECT op FROM charges"))


@pytest.mark.parametrize(("step", "guarantee", "kind"), MATRIX)
async def test_a_failure_of_ours_after_the_handler_returned_never_runs_the_effect_again(
    step: str, guarantee: Guarantee, kind: str | None, tmp_path: Path, monkeypatch: Any
) -> None:
    h, runs, effects = await make(step, guarantee, kind, tmp_path, monkeypatch)
    await h.publish(Envelope.of(OP, {"order": "order-1", "amount": 100}))
    h.start()
    await h.drain(seconds=60)
    await h.stop()
    if kind == "transactional":
        assert await committed(h) == 1
    else:
        assert effects == [OP], f"runs: {runs}"
    if guarantee is not EO:
        # the effect is done: completed at the broker, never nacked for a second run
        assert runs == [OP]
        return
    rec = await h.ledger.get(KEY)
    assert rec is not None
    entries = await h.ledger.quarantined()
    if step == "not_awaitable":
        # the body ran but replaysafe could not tell how it ended: an unknown outcome
        if kind == "unkeyed":
            assert runs == [OP]
            assert rec.state is State.QUARANTINED
            [entry] = entries
            assert entry.reason is QuarantineReason.OUTCOME_UNKNOWN
        else:  # keyed: re-run only under the key, then set aside saying it may have happened
            assert rec.state is State.QUARANTINED
            [entry] = entries
            assert entry.reason is QuarantineReason.MAX_ATTEMPTS
        assert entry.risk is EffectRisk.OUTCOME_UNKNOWN
    elif step == "ledger_complete" and kind == "unkeyed":
        # the effect could not be recorded: its lease ran out and the recovered claim cannot
        # tell whether the effect happened; never re-run on a downstream without a key
        assert runs == [OP]
        assert rec.state is State.QUARANTINED
        [entry] = entries
        assert entry.reason is QuarantineReason.OUTCOME_UNKNOWN
    else:
        # tracing, metrics and result encoding never decide the outcome; a keyed or
        # transactional effect whose recording failed re-ran harmlessly (key, rollback)
        assert rec.state is State.COMPLETED, entries
        assert entries == []
        if step != "ledger_complete":
            assert runs == [OP]
    if isinstance(h.ledger, SQLiteLedger):
        await h.ledger.close()
