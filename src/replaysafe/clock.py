"""Time, injectable. Leases, visibility timers, backoff and deadlines all read a ``Clock`` so tests
can drive time with ``replaysafe.testing.FakeClock`` instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock time as POSIX seconds (UTC). Used for leases, publish times, horizons."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clock: ``time.time()`` and ``asyncio.sleep``."""

    #: ``time.time`` itself: called several times per message, a wrapper would cost a frame
    now = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()
