"""Bounded waits in real time, for tests that drive real servers and processes: one place, so
that every such wait polls, fails and names what it waited for the same way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest


async def until(
    cond: Callable[[], Any], *, seconds: float, what: str, interval: float = 0.2
) -> Any:
    """Poll ``cond`` (sync, or returning an awaitable) every ``interval`` seconds until it gives
    something truthy, and return that; fail the test naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached within {seconds}s")
        await asyncio.sleep(interval)
