"""A memory broker subscription: one consumer in a group, taking deliveries from the group within
``prefetch`` and waiting, without polling, on the group's changes and the broker's clock."""

from __future__ import annotations

import asyncio

from replaysafe.brokers.base import Delivery, Subscription
from replaysafe.brokers.memory.delivery import _MemoryDelivery
from replaysafe.brokers.memory.group import _Group
from replaysafe.clock import Clock


async def _sleep_until(clock: Clock, deadline: float) -> None:
    # re-read the clock in the sleeping task itself: if time moved between scheduling and
    # starting, sleeping a precomputed duration would overshoot the deadline
    while (left := deadline - clock.now()) > 0:
        await clock.sleep(left)


async def _wait(event: asyncio.Event, clock: Clock, deadline: float | None) -> None:
    """Until ``event`` is set or the clock reaches ``deadline``: no polling, no busy loop."""
    if deadline is None:
        await event.wait()
        return
    waiter = asyncio.ensure_future(event.wait())
    sleeper = asyncio.ensure_future(_sleep_until(clock, deadline))
    try:
        await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        sleeper.cancel()


class _MemorySubscription(Subscription):
    def __init__(self, group: _Group, prefetch: int, registry: set[_MemorySubscription]) -> None:
        #: the broker's open subscriptions: this one leaves it on close
        self._registry = registry
        self._group = group
        self._prefetch = prefetch
        self._closed = False
        self._unsettled: set[_MemoryDelivery] = set()

    async def __anext__(self) -> Delivery:
        """The next delivery; waits on publishes, settles and the broker's clock (timers), and
        while ``prefetch`` deliveries are unsettled. Raises ``StopAsyncIteration`` once closed."""
        # one yield per delivery: competing consumers of a group take turns, as a real broker's
        # round-robin dispatch would, instead of the first one draining the queue synchronously
        await asyncio.sleep(0)
        clock = self._group.clock
        while True:
            if self._closed:
                raise StopAsyncIteration
            changed = self._group.changed  # capture before looking (see _Group.changed)
            now = clock.now()
            deadline = None
            if len(self._unsettled) < self._prefetch:
                d = self._group.take(self, now)
                if d is not None:
                    self._unsettled.add(d)
                    return d
                deadline = self._group.next_timer(self, now)
            await _wait(changed, clock, deadline)

    async def next_batch(self, max_items: int) -> list[Delivery]:
        """One delivery (waiting for it), plus every other one ready now, within ``prefetch``."""
        batch = [await self.__anext__()]
        now = self._group.clock.now()
        while len(batch) < max_items and len(self._unsettled) < self._prefetch:
            d = self._group.take(self, now)
            if d is None:
                break
            self._unsettled.add(d)
            batch.append(d)
        return batch

    async def close(self, *, abandon: bool = False) -> None:
        """Stop consuming and wake a pending ``__anext__`` (it raises ``StopAsyncIteration``).

        NACK: unsettled deliveries are requeued at once (clean close or crash alike).
        VISIBILITY_TIMEOUT: nothing returns early; unsettled messages wait for their timers.
        OFFSET_REWIND: this consumer's partitions rewind to their committed offsets and are
        reassigned; settles of its outstanding copies are ignored from now on.
        """
        if self._closed:
            return
        self._closed = True
        self._group.detach(self, abandon)
        self._registry.discard(self)
        self._group.notify()

    def __repr__(self) -> str:
        return (
            f"<MemorySubscription {self._group.dest.name}/{self._group.name} "
            f"unsettled={len(self._unsettled)} closed={self._closed}>"
        )
