"""Issue 13 items 14 and 16, where they meet the runtime: a ledger that refuses a message's DATA
(``LedgerDataError``) is never an outage and never a nack loop, and the redaction hook covers what
the runtime writes outside a quarantine (a retry's stored error, its log lines) and cannot stall
the worker.

- A quarantine entry the ledger refuses is stored without the message's own bytes and text (the
  copy, its content type) instead of being nacked every second forever.
- A claim the ledger refuses quarantines that one copy; the rest of its batch runs.
- ``release(claim, error)`` stores the error as the record's ``last_error``: it passes through
  the hook like a quarantine detail.
- The runtime's other log lines that name an operation pass through the hook.
- A hook slower than ``REDACT_TIMEOUT`` counts as failed: no copy is kept, the quarantine and
  every other handler go on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

import pytest

from replaysafe import Context, Effect, Envelope, Guarantee, QuarantineReason, RetryPolicy
from replaysafe import observe as o
from replaysafe.errors import LedgerDataError
from replaysafe.ledger.base import Claim, ClaimOutcome, ClaimRequest, OpKey, QuarantineEntry
from replaysafe.ledger.base import QuarantineRequest as Request
from replaysafe.ledger.memory import MemoryLedger
from replaysafe.runtime import settle as settle_module

from .runtime_harness import EMAIL, Harness, mask_emails

EO = Guarantee.EFFECTIVELY_ONCE


class RefusingLedger(MemoryLedger):
    """A ledger that refuses, as data (never as an outage), quarantine entries that carry a
    message copy and claims of the operation ``refused_op``."""

    refused_op = "op-refused"
    refusals = 0

    async def quarantine(self, request: Request, claim: Claim | None = None) -> QuarantineEntry:
        if request.message is not None:
            self.refusals += 1
            raise LedgerDataError("the store cannot hold this message copy")
        return await super().quarantine(request, claim)

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        if any(r.key.operation_id == self.refused_op for r in requests):
            self.refusals += 1
            raise LedgerDataError(f"the store cannot hold {self.refused_op!r}")
        return await super().claim_many(requests)

    async def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        if key.operation_id == self.refused_op:
            self.refusals += 1
            raise LedgerDataError(f"the store cannot hold {self.refused_op!r}")
        return await super().claim(key, fingerprint, owner, lease)


def _charge(h: Harness) -> None:
    @h.handler(EO, effect=Effect.keyed("payments"), lease=5, concurrency=8)
    async def charge(ctx: Context) -> str:
        return await h.probe.apply(ctx.operation_id, 1, ctx.idempotency_key)


async def test_a_quarantine_the_ledger_refuses_is_stored_bare_not_nacked_forever() -> None:
    h = Harness()
    h.ledger = h.app.ledger = RefusingLedger(h.clock)
    _charge(h)
    await h.publish_raw(b'{"truncated": ', {"rs-operation-id": "op-bad"})
    await h.publish(Envelope.of("op-good", {"n": 1}))
    h.start()
    await h.drain(seconds=30)
    await h.stop()
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.MALFORMED_PAYLOAD
    assert entry.message is None and entry.content_type is None
    assert "the ledger refused this entry's data (LedgerDataError)" in entry.first_detail
    assert len(h.probe.effects) == 1
    # refused once, stored bare at once: no nack, no outage counted
    assert h.ledger.refusals == 1
    assert h.total(o.LEDGER_UNAVAILABLE) == 0
    assert h.total(o.DELIVERIES, outcome=o.FAILED) == 0


async def test_a_claim_the_ledger_refuses_quarantines_that_copy_and_runs_the_rest() -> None:
    h = Harness()
    h.ledger = h.app.ledger = RefusingLedger(h.clock)
    _charge(h)
    ops = ["op-1", RefusingLedger.refused_op, "op-2", "op-3"]
    await h.publish(*(Envelope.of(op, {"op": op}) for op in ops))  # one batch
    h.start()
    await h.drain(seconds=30)
    await h.stop()
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.INVALID_OPERATION_ID
    assert entry.operation_id == RefusingLedger.refused_op
    assert "the ledger refused to claim" in entry.first_detail
    assert h.probe.per_subject() == {"op-1": 1, "op-2": 1, "op-3": 1}
    assert len(h.probe.effects) == 3
    assert h.total(o.LEDGER_UNAVAILABLE) == 0
    assert h.total(o.DELIVERIES, outcome=o.FAILED) == 0


async def test_the_error_a_retry_stores_passes_through_the_redaction_hook() -> None:
    h = Harness()
    h.app.redact = mask_emails
    failed: list[str] = []

    @h.handler(EO, effect=Effect.keyed("mailer"), lease=5,
               retry=RetryPolicy(base_delay=0.1))  # fmt: skip
    async def signup(ctx: Context) -> None:
        if not failed:
            failed.append(ctx.operation_id)
            raise RuntimeError(f"mailer timeout for {ctx.payload['email']}")  # retried

    await h.publish(Envelope.of("signup:1", {"email": EMAIL.decode()}))
    h.start()
    await h.drain(seconds=30)
    await h.stop()
    rec = await h.ledger.get(OpKey("signup", "signup:1"))
    assert rec is not None and rec.last_error is not None
    assert "<email>" in rec.last_error and EMAIL.decode() not in rec.last_error


async def test_log_lines_that_name_an_operation_pass_through_the_redaction_hook(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness()
    h.app.redact = mask_emails

    @h.handler(Guarantee.AT_MOST_ONCE, key=lambda p: ("notify", p["email"]))
    async def notify(ctx: Context) -> None:
        raise RuntimeError(f"cannot reach {ctx.payload['email']}")

    caplog.set_level(logging.WARNING, logger="replaysafe.runtime")
    await h.publish_raw(b'{"email": "ann@example.com"}', {})
    h.start()
    await h.drain(seconds=30)
    await h.stop()
    lines = [r.getMessage() for r in caplog.records]
    assert any("at-most-once handler failed on notify:<email>" in line for line in lines), lines
    assert all(EMAIL.decode() not in line for line in lines), lines


async def test_a_slow_redaction_hook_is_cut_and_the_worker_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settle_module, "REDACT_TIMEOUT", 0.05)
    h = Harness()
    release = threading.Event()

    def stuck_hook(body: bytes) -> bytes:
        release.wait(10)  # a hook stuck on a large body (bounded: the test releases it)
        return body

    h.app.redact = stuck_hook
    _charge(h)
    await h.publish_raw(b'{"truncated": ', {"rs-operation-id": "op-bad"})
    await h.publish(*(Envelope.of(f"op-{i}", {"n": i}) for i in range(3)))
    h.start()
    try:
        # real time: the hook runs on a thread and is cut by a real-time deadline
        for _ in range(1000):
            if h.depth() == 0:
                break
            h.clock.advance(0.1)
            await asyncio.sleep(0.01)
        assert h.depth() == 0
    finally:
        release.set()
        await h.stop()
    [entry] = await h.ledger.quarantined()
    assert entry.reason is QuarantineReason.MALFORMED_PAYLOAD
    assert entry.message is None
    assert "the redaction hook took longer than 0.05s" in entry.first_detail
    assert len(h.probe.effects) == 3
