"""Batch machinery of the runtime: bounded concurrency per handler, coalesced ledger calls, and
running one fetched batch's steps at once. No decision lives here (see ``runtime.policy``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: how long a busy consumer waits for half its slots before fetching (see Slots.gather_room)
FETCH_LINGER = 0.002


def retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a task's exception as seen (a batch that ended early does not await the rest)."""
    if not task.cancelled():
        task.exception()


class Slots:
    """In-flight deliveries per handler: a fetch never takes more than there is room for."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._changed = asyncio.Event()

    async def wait_free(self) -> int:
        while self._free <= 0:
            self._changed.clear()
            await self._changed.wait()
        return self._free

    async def gather_room(self, want: int, linger: float) -> int:
        """Free slots, waiting up to ``linger`` seconds (loop time) for at least ``want`` of
        them: under load, fetching as soon as ONE slot frees gives one-message batches and a
        ledger round trip per message; a short linger lets the batch (and its claim) grow."""
        if self._free >= want:
            return self._free
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(linger):
                while self._free < want:
                    self._changed.clear()
                    await self._changed.wait()
        return self._free

    def take(self, n: int) -> None:
        self._free -= n

    def give(self) -> None:
        self._free += 1
        self._changed.set()


class Coalescer(Generic[T, R]):
    """Turns concurrent single calls into batch calls: everything submitted while a batch is in
    flight goes out together in the next one (one ledger round trip per batch, not per message).
    """

    def __init__(
        self,
        many: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        limit: int = 500,
        *,
        drop_cancelled: bool = False,
    ):
        self._many = many
        self._limit = limit
        #: leave out the items whose caller was cancelled before their batch went out (a mark
        #: of an effect that will never start); by default they still go out (a completion)
        self._drop_cancelled = drop_cancelled
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        # no shield (an outer future per item): a cancelled caller's item still goes out with
        # its batch, the flush just finds its future done and skips it
        return await fut

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other handlers that finished this tick join the batch
        while self._queue:
            batch, self._queue = self._queue[: self._limit], self._queue[self._limit :]
            if self._drop_cancelled:
                batch = [(item, fut) for item, fut in batch if not fut.cancelled()]
                if not batch:
                    continue
            try:
                results = await self._many([item for item, _ in batch])
            except BaseException as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)


async def run_all(steps: Sequence[Callable[[], Coroutine[Any, Any, None]]]) -> None:
    """Run every step in its own task, all at once (the handler's concurrency: the batch never
    exceeds its free slots), and return when all have finished.

    What ``asyncio.gather`` does, for about half its cost per message: the tasks are awaited in
    order, and a task already finished costs no wake-up. A step's crash does not wait for that
    order: the step reports it to the worker itself. Cancelled (a drain timeout, a crash), this
    cancels every task of the batch and returns once they have all finished, as ``gather``
    would. Any other exception (a crash) is raised at once and leaves the other steps running, as
    ``gather`` would; their own exceptions are retrieved, never logged as lost."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(step()) for step in steps]
    try:
        for task in tasks:
            await task
    except BaseException:
        this = asyncio.current_task()
        if this is not None and this.cancelling():
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        for task in tasks:
            task.add_done_callback(retrieve)
        raise
