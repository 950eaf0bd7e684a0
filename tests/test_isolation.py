"""SuspectLock: ordinary executions share it, a suspect (a recovered claim) runs alone."""

from __future__ import annotations

import asyncio

import pytest

from replaysafe.runtime._isolation import SuspectLock


async def test_a_suspect_waits_for_running_executions_and_holds_new_ones_back() -> None:
    lock = SuspectLock()
    log: list[str] = []
    first_in = asyncio.Event()
    release_first = asyncio.Event()

    async def ordinary(name: str, hold: asyncio.Event | None = None) -> None:
        await lock.shared_acquire()
        try:
            log.append(f"{name}+")
            if hold is not None:
                first_in.set()
                await hold.wait()
            await asyncio.sleep(0)
            log.append(f"{name}-")
        finally:
            lock.shared_release()

    async def suspect() -> None:
        await lock.exclusive_acquire()
        try:
            log.append("S+")
            await asyncio.sleep(0.01)
            log.append("S-")
        finally:
            lock.exclusive_release()

    a = asyncio.create_task(ordinary("a", release_first))
    await first_in.wait()
    s = asyncio.create_task(suspect())
    await asyncio.sleep(0.01)
    b = asyncio.create_task(ordinary("b"))  # arrives while the suspect waits: held back
    await asyncio.sleep(0.01)
    assert log == ["a+"], "the suspect must wait for a, and b for the suspect"
    release_first.set()
    await asyncio.gather(a, s, b)
    assert log == ["a+", "a-", "S+", "S-", "b+", "b-"]


async def test_suspects_run_one_at_a_time() -> None:
    lock = SuspectLock()
    inside = 0
    most = 0

    async def suspect() -> None:
        nonlocal inside, most
        await lock.exclusive_acquire()
        try:
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.001)
            inside -= 1
        finally:
            lock.exclusive_release()

    await asyncio.gather(*(suspect() for _ in range(5)))
    assert most == 1


async def test_a_cancelled_suspect_lets_the_held_back_executions_start() -> None:
    lock = SuspectLock()
    hold = asyncio.Event()

    async def long_ordinary() -> None:
        await lock.shared_acquire()
        try:
            await hold.wait()
        finally:
            lock.shared_release()

    running = asyncio.create_task(long_ordinary())
    await asyncio.sleep(0)
    waiting_suspect = asyncio.create_task(lock.exclusive_acquire())
    await asyncio.sleep(0)
    assert lock.busy
    started = asyncio.Event()

    async def later() -> None:
        await lock.shared_acquire()
        started.set()
        lock.shared_release()

    late = asyncio.create_task(later())
    await asyncio.sleep(0.01)
    assert not started.is_set()
    waiting_suspect.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting_suspect
    await asyncio.wait_for(started.wait(), 1)
    hold.set()
    await asyncio.gather(running, late)
    assert not lock.busy
