"""DESIGN §5 through the real runtime: every bad input is quarantined with its reason on the first
attempt, the worker keeps running, the good messages around it are applied, and the original is
completed at the broker (nothing left to churn)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from replaysafe import Context, Effect, Envelope, Guarantee, QuarantineReason
from replaysafe.envelope import HEADER_OPERATION_ID, HEADER_PUBLISHED_AT, format_time
from replaysafe.ledger.base import MAX_QUARANTINE_COPY

from .runtime_harness import Harness

EO = Guarantee.EFFECTIVELY_ONCE
OP = HEADER_OPERATION_ID

Case = tuple[bytes, dict[str, str]]


def _cases(now: float) -> dict[str, tuple[Case, QuarantineReason]]:
    good_body = b'{"order": "x", "amount": 1}'
    deep = b"[" * 65 + b"]" * 65
    return {
        "missing operation id": ((good_body, {}), QuarantineReason.INVALID_OPERATION_ID),
        "empty operation id": ((good_body, {OP: ""}), QuarantineReason.INVALID_OPERATION_ID),
        "too long operation id": (
            (good_body, {OP: "x" * 256}), QuarantineReason.INVALID_OPERATION_ID),
        "control character in operation id": (
            (good_body, {OP: "charge:\x00evil"}), QuarantineReason.INVALID_OPERATION_ID),
        "undecodable bytes": ((b"\xff\xfe\x00garbage", {OP: "b:1"}),
                              QuarantineReason.MALFORMED_PAYLOAD),
        "truncated json": ((b'{"order": ', {OP: "b:2"}), QuarantineReason.MALFORMED_PAYLOAD),
        "pickle content type": (
            (b"\x80\x04\x95cos\nsystem\n",
             {OP: "b:3", "content-type": "application/x-python-pickle"}),
            QuarantineReason.UNSUPPORTED_CONTENT_TYPE),
        "oversize payload": ((b'"' + b"a" * (1024 * 1024) + b'"', {OP: "b:4"}),
                             QuarantineReason.PAYLOAD_TOO_LARGE),
        "deep nesting": ((deep, {OP: "b:5"}), QuarantineReason.LIMIT_EXCEEDED),
        "NaN": ((b'{"amount": NaN}', {OP: "b:6"}), QuarantineReason.MALFORMED_PAYLOAD),
        "Infinity literal overflow": ((b'{"amount": 1e999}', {OP: "b:7"}),
                                      QuarantineReason.MALFORMED_PAYLOAD),
        "duplicate keys": ((b'{"amount": 1, "amount": 2}', {OP: "b:8"}),
                           QuarantineReason.MALFORMED_PAYLOAD),
        "huge integer": ((b'{"amount": 99999999999999999999999}', {OP: "b:9"}),
                         QuarantineReason.LIMIT_EXCEEDED),
        "header flood": ((good_body, {OP: "b:10", **{f"h{i}": "v" for i in range(100)}}),
                         QuarantineReason.LIMIT_EXCEEDED),
        "header bytes flood": ((good_body, {OP: "b:11", "big": "v" * 20_000}),
                               QuarantineReason.LIMIT_EXCEEDED),
        "fingerprint mismatch": ((good_body, {OP: "b:12", "rs-fingerprint": "sha256:00"}),
                                 QuarantineReason.FINGERPRINT_MISMATCH),
        "garbage publish time": ((good_body, {OP: "b:13", HEADER_PUBLISHED_AT: "yesterday"}),
                                 QuarantineReason.MALFORMED_HEADER),
        "beyond the horizon": (
            (good_body, {OP: "b:14", HEADER_PUBLISHED_AT: format_time(now - 30 * 86_400)}),
            QuarantineReason.BEYOND_HORIZON),
        "future timestamp": (
            (good_body, {OP: "b:15", HEADER_PUBLISHED_AT: format_time(now + 86_400)}),
            QuarantineReason.FUTURE_TIMESTAMP),
    }  # fmt: skip


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
