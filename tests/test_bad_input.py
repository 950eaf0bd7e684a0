"""DESIGN §5 through the real runtime: every bad input is quarantined with its reason on the first
attempt, the worker keeps running, the good messages around it are applied, and the original is
completed at the broker (nothing left to churn)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from replaysafe import Context, Effect, Envelope, Guarantee, QuarantineReason
from replaysafe.ledger.base import MAX_QUARANTINE_COPY

from .bad_inputs import _cases
from .runtime_harness import Harness

EO = Guarantee.EFFECTIVELY_ONCE

CASES = sorted(_cases(0.0))


def charging(h: Harness) -> None:
    async def charge(ctx: Context) -> str:
        return await h.probe.apply(ctx.payload["order"], ctx.payload["amount"], ctx.idempotency_key)

    h.handler(EO, effect=Effect.keyed("payments"), lease=5)(charge)


def good(i: int) -> Envelope:
    return Envelope.of(f"charge:good-{i}", {"order": f"good-{i}", "amount": 10})


@pytest.mark.parametrize("case", CASES)
async def test_bad_input_is_quarantined_on_first_attempt(case: str) -> None:
    h = Harness()
    charging(h)
    (body, headers), reason = _cases(h.clock.now())[case]
    await h.publish(good(1))
    await h.publish_raw(body, headers)
    await h.publish(good(2))
    h.start()
    await h.drain()
    await h.stop()
    assert h.crashes == 0  # the worker kept running
    assert h.probe.per_subject() == {"good-1": 1, "good-2": 1}  # the neighbours were applied
    [entry] = await h.ledger.quarantined()
    assert entry.reason is reason, entry
    assert entry.attempts == 1  # decided on the first attempt, never retried
    assert entry.message is not None and len(entry.message) <= MAX_QUARANTINE_COPY  # bounded
    assert h.depth() == 0  # the original was completed after the quarantine


async def test_mixed_batch_applies_the_good_and_quarantines_each_bad_one() -> None:
    h = Harness()
    charging(h)
    cases = _cases(h.clock.now())
    for i, name in enumerate(CASES):
        await h.publish(good(i))
        body, headers = cases[name][0]
        await h.publish_raw(body, headers)
    h.start()
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {f"good-{i}": 1 for i in range(len(CASES))}
    got = sorted(e.reason.value for e in await h.ledger.quarantined(limit=100))
    # two cases share bytes-identical bodies but differ in headers only; each is its own entry
    assert got == sorted(cases[name][1].value for name in CASES)


def _reuse(amount: int) -> Envelope:
    return Envelope.of("charge:reused", {"order": "reused", "amount": amount})


async def test_key_reuse_in_one_batch_first_path() -> None:
    h = Harness()
    charging(h)
    await h.publish(_reuse(1), _reuse(2))  # both copies fetched in one batch, claimed together
    h.start()
    await h.drain()
    await h.stop()
    assert h.probe.effects == [("fx_1", "reused", 1)]
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.KEY_REUSE_CONFLICT


async def test_key_reuse_while_in_flight() -> None:
    h = Harness()
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def slow(ctx: Context) -> None:
        entered.set()
        await gate.wait()
        await h.probe.apply("reused", ctx.payload["amount"], ctx.idempotency_key)

    h.handler(EO, effect=Effect.keyed("payments"), lease=30, timeout=60)(slow)
    await h.publish(_reuse(1))
    h.start()
    await h.run_until(entered.is_set)
    await h.publish(_reuse(2))
    await h.run_until(lambda: h.total("replaysafe_quarantined_total") >= 1)
    gate.set()
    await h.drain()
    await h.stop()
    assert h.probe.effects == [("fx_1", "reused", 1)]
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.KEY_REUSE_CONFLICT


async def test_key_reuse_after_completion_is_never_answered_with_the_first_result() -> None:
    h = Harness()
    charging(h)
    await h.publish(_reuse(1))
    h.start()
    await h.drain()
    await h.publish(_reuse(2))
    await h.drain()
    await h.stop()
    assert h.probe.effects == [("fx_1", "reused", 1)]
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.KEY_REUSE_CONFLICT
    assert json.loads(entry.message or b"{}")["amount"] == 2


async def test_a_handler_that_hangs_is_cut_and_ends_in_quarantine() -> None:
    h = Harness()

    async def hangs(ctx: Context) -> Any:
        await asyncio.Event().wait()

    from replaysafe import RetryPolicy

    h.handler(EO, effect=Effect.keyed("payments"), lease=3,
              retry=RetryPolicy(max_attempts=2, base_delay=0.1))(hangs)  # fmt: skip
    await h.publish(good(1))
    h.start()
    await h.drain(seconds=120)
    await h.stop()
    assert h.crashes == 0
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.MAX_ATTEMPTS and entry.attempts == 2
    assert "deadline" in entry.last_detail
