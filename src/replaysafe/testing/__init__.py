"""Public test kit: a fake clock and the conformance suites every backend passes."""

from __future__ import annotations

import asyncio
import heapq
import itertools


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


__all__ = ["FakeClock"]
