"""Public test kit: a fake clock, a fake downstream, a bounded worker run, and the conformance
suites every backend passes."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from replaysafe.runtime.worker import Worker


class FakeClock:
    """A clock that only moves when told to.

    ``sleep`` parks the caller until :meth:`advance` moves time past its deadline. ``now`` starts at
    a fixed, realistic POSIX time so formatted timestamps look like real ones.
    """

    def __init__(self, start: float = 1_790_000_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has passed."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards; use jump() to model a clock step")
        self._now += seconds
        self._wake()

    def jump(self, seconds: float) -> None:
        """Step the clock by ``seconds`` (may be negative: an NTP step). Wakes due sleepers."""
        self._now += seconds
        self._wake()

    async def run_for(self, seconds: float, step: float = 0.1) -> None:
        """Advance ``seconds`` in ``step`` increments, letting tasks run between steps."""
        steps = max(1, round(seconds / step))
        for _ in range(steps):
            for _ in range(5):
                await asyncio.sleep(0)
            self.advance(seconds / steps)
        for _ in range(5):
            await asyncio.sleep(0)

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def _wake(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now})"


class KeyReuse(Exception):
    """The downstream's 409: an idempotency key came back with a different request."""


class EffectProbe:
    """A fake downstream that records every business effect it applies.

    ``honour_keys=True`` makes it behave like a keyed API (payments with an idempotency key): a
    repeated key with the same request returns the first result without a new effect, a repeated
    key with a different request raises ``KeyReuse``. ``honour_keys=False`` is an unkeyed
    downstream (plain SMTP): every call is a new effect. Count with :meth:`per_subject`,
    :meth:`duplicates` and :meth:`missing` — the ground truth tests assert against.
    """

    def __init__(self, *, honour_keys: bool) -> None:
        self.honour_keys = honour_keys
        #: (effect id, subject, request) per applied effect, in order
        self.effects: list[tuple[str, str, Any]] = []
        #: calls answered from a remembered idempotency key (no new effect)
        self.replays_answered = 0
        self.calls = 0
        self._by_key: dict[str, tuple[str, str, Any]] = {}

    async def apply(
        self, subject: str, request: Any = None, idempotency_key: str | None = None
    ) -> str:
        """Apply one effect on ``subject`` (e.g. an order id); returns the effect id."""
        self.calls += 1
        await asyncio.sleep(0)  # the network hop: other tasks interleave here, as they would
        if self.honour_keys and idempotency_key is not None:
            prev = self._by_key.get(idempotency_key)
            if prev is not None:
                if prev[1:] != (subject, request):
                    raise KeyReuse(f"409: idempotency key {idempotency_key!r} reused")
                self.replays_answered += 1
                return prev[0]
        effect = (f"fx_{len(self.effects) + 1}", subject, request)
        self.effects.append(effect)
        if idempotency_key is not None:
            self._by_key[idempotency_key] = effect
        return effect[0]

    def per_subject(self) -> Counter[str]:
        return Counter(subject for _, subject, _ in self.effects)

    def duplicates(self) -> int:
        """Subjects with more than one effect."""
        return sum(1 for n in self.per_subject().values() if n > 1)

    def missing(self, subjects: Any) -> set[str]:
        """Subjects from ``subjects`` with no effect at all."""
        seen = self.per_subject()
        return {s for s in subjects if seen[s] == 0}


@dataclass(frozen=True, slots=True)
class Settled:
    """What a worker completed at the broker, by outcome (``replaysafe_deliveries_total``)."""

    applied: int
    #: answered from the ledger without running the handler
    duplicates: int
    quarantined: int

    @property
    def total(self) -> int:
        return self.applied + self.duplicates + self.quarantined


async def run_until_settled(worker: Worker, copies: int, *, drain_timeout: float = 5.0) -> Settled:
    """Run ``worker`` until it has completed ``copies`` deliveries at the broker (applied,
    answered from the ledger, or quarantined), then stop it gracefully and say how they ended.
    For tests and examples, which must end by themselves (bound it with ``asyncio.timeout``: on
    expiry the worker is still stopped and drained); a service runs until SIGTERM (``replaysafe
    run``). Raises what ``worker.run()`` raised if it ended on its own."""
    from replaysafe import observe as o

    def settled() -> Settled:
        def total(outcome: str) -> int:
            return worker.stats.total(o.DELIVERIES, outcome=outcome)

        return Settled(total(o.APPLIED), total(o.DUPLICATE), total(o.QUARANTINE))

    run = asyncio.create_task(worker.run(drain_timeout=drain_timeout))
    try:
        # the counters have no change notification: poll them
        while settled().total < copies and not run.done():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    finally:
        worker.stop()
        await run
    return settled()


__all__ = ["EffectProbe", "FakeClock", "KeyReuse", "Settled", "run_until_settled"]
