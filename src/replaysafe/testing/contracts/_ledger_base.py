"""What every ledger role suite shares: the fixtures (a new, empty store per test; time moved
only through :meth:`LedgerFixtures.advance`), the constants and the helpers. See
:mod:`replaysafe.testing.contracts.ledger` for how a backend's tests use the suites."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
import pytest_asyncio

from replaysafe.errors import (
    LeaseLost,
)
from replaysafe.ledger.base import (
    Acquired,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    LedgerBackend,
    OpKey,
    QuarantineEntry,
    QuarantineRequest,
    Record,
)
from replaysafe.quarantine import EffectRisk, QuarantineReason
from replaysafe.testing import FakeClock

KEY = OpKey("orders", "capture-payment:order-1")
FP = "fp-a"
OTHER_FP = "fp-b"
#: text from outside that no store can hold verbatim: a NUL, a byte that was not UTF-8 (decoded
#: with surrogateescape, as the Kafka adapter decodes headers) and a lone surrogate
HOSTILE = "a\x00b\udcff\ud800c"
#: how every ledger stores it (``storable_text``): readable, and valid in every store
HOSTILE_STORED = "a\\x00b\\xff\\ud800c"
#: a message body with a NUL and bytes that are not UTF-8 (stored as bytes, exactly)
HOSTILE_BODY = b'\x00\xff\xfe{"a": "\x00"}'
#: a producer's publish time (exact in binary and in microseconds, so every store keeps it as is)
PUBLISHED_AT = 1_789_999_000.25


async def acquire(
    ledger: LedgerBackend, key: OpKey, lease: float, owner: str = "w1", fingerprint: str = FP
) -> Claim:
    """Claim ``key`` and insist that it is acquired."""
    outcome = await ledger.claim(key, fingerprint, owner, lease)
    assert isinstance(outcome, Acquired), f"expected Acquired for {key}, got {outcome!r}"
    return outcome.claim


async def must_get(ledger: LedgerBackend, key: OpKey) -> Record:
    record = await ledger.get(key)
    assert record is not None, f"no record for {key}"
    return record


def shape(item: ClaimOutcome | Record | LeaseLost) -> tuple[Any, ...]:
    """An outcome without its backend-specific values (token numbers, timestamps), so a batch
    form can be compared with the single form run on another scope."""
    if isinstance(item, LeaseLost):
        return ("LeaseLost",)
    if isinstance(item, Record):
        return ("Record", item.state, item.attempts, item.fingerprint, item.owner, item.result)
    if isinstance(item, Acquired):
        c = item.claim
        return ("Acquired", c.attempt, c.recovered, c.owner, c.fingerprint)
    r = item.record
    return (type(item).__name__, r.state, r.attempts, r.fingerprint, r.result)


class LedgerFixtures:
    """The store under test and its clock, for every ledger role suite. The suites run on a
    :class:`~replaysafe.ledger.base.LedgerBackend` (one store playing every role): quarantining
    with a claim is a transition of the claim state machine, and the summary counts its records,
    so the roles are checked on one store, each by its own suite."""

    #: lease used throughout, seconds: short, because a real-clock backend really waits for it
    lease: ClassVar[float] = 1.0
    #: how far past a lease the suite moves time to let it expire
    margin: ClassVar[float] = 0.25

    async def make_ledger(self, clock: FakeClock) -> LedgerBackend:
        """Return a new, empty ledger whose leases are judged by ``clock`` (or by the database's
        clock, together with an :meth:`advance` that really waits)."""
        raise NotImplementedError

    async def advance(self, clock: FakeClock, seconds: float) -> None:
        """Move the ledger's time forward by ``seconds``."""
        clock.advance(seconds)

    async def expire(self, clock: FakeClock, lease: float | None = None) -> None:
        await self.advance(clock, (self.lease if lease is None else lease) + self.margin)

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest_asyncio.fixture
    async def ledger(self, clock: FakeClock) -> AsyncIterator[LedgerBackend]:
        ledger = await self.make_ledger(clock)
        try:
            yield ledger
        finally:
            await ledger.close()

    @staticmethod
    def _request(
        reason: QuarantineReason,
        *,
        operation_id: str | None = KEY.operation_id,
        fingerprint: str | None = FP,
        risk: EffectRisk = EffectRisk.RELEASED_CLEANLY,
        attempts: int = 1,
        detail: str = "",
        message: bytes | None = b'{"amount": 10}',
        content_type: str | None = None,
        published_at: float | None = None,
    ) -> QuarantineRequest:
        return QuarantineRequest(
            scope=KEY.scope,
            reason=reason,
            operation_id=operation_id,
            fingerprint=fingerprint,
            risk=risk,
            attempts=attempts,
            detail=detail,
            message=message,
            content_type=content_type,
            published_at=published_at,
        )

    async def _quarantine_some(
        self,
        ledger: LedgerBackend,
        clock: FakeClock,
        reasons: list[QuarantineReason],
        prefix: str = "op",
    ) -> list[QuarantineEntry]:
        """One entry per reason (operations ``{prefix}-0`` …), created in this order."""
        entries = []
        for i, reason in enumerate(reasons):
            entries.append(
                await ledger.quarantine(self._request(reason, operation_id=f"{prefix}-{i}"))
            )
            await self.advance(clock, 0.01)
        return entries

    async def _call(self, ledger: LedgerBackend, call: str, claim: Claim) -> None:
        """Run one of the fenced calls with ``claim``."""
        if call == "extend":
            await ledger.extend(claim, self.lease)
        elif call == "complete":
            await ledger.complete(claim, "result")
        elif call == "release":
            await ledger.release(claim, "error")
        elif call == "quarantine":
            await ledger.quarantine(self._request(QuarantineReason.OUTCOME_UNKNOWN), claim)
        else:  # pragma: no cover - a typo in the suite
            raise AssertionError(call)

    async def _claim_marking(self, ledger: LedgerBackend, key: OpKey, owner: str = "w1") -> Claim:
        """Claim ``key`` with ``marks_start`` (how the runtime claims for unkeyed effects)."""
        [outcome] = await ledger.claim_many([ClaimRequest(key, FP, owner, self.lease, True)])
        assert isinstance(outcome, Acquired), f"expected Acquired for {key}, got {outcome!r}"
        return outcome.claim
