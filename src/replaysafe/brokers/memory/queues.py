"""The queue-like groups: NACK (RabbitMQ-like) and VISIBILITY_TIMEOUT (SQS-like). They own each
message's state in the group (ready, held, delayed, done, dead), the ready heap and the timer heap.
"""

from __future__ import annotations

from collections.abc import Iterator
from heapq import heappop, heappush
from typing import TYPE_CHECKING

from replaysafe.brokers.memory.delivery import _MemoryDelivery
from replaysafe.brokers.memory.group import _Group
from replaysafe.brokers.memory.store import StoredMessage, _Destination
from replaysafe.clock import Clock

if TYPE_CHECKING:
    from replaysafe.brokers.memory.consumer import _MemorySubscription

# States of a message in a NACK or VISIBILITY_TIMEOUT group.
_READY = 0  # NACK: queued · VISIBILITY: visible
_HELD = 1  # NACK: delivered, unacked · VISIBILITY: invisible (received or delayed)
_DELAYED = 2  # NACK only: nacked with a delay, requeued when its timer fires
_DONE = 3  # acked / deleted
_DEAD = 4  # rejected


class _QState:
    """A message's state in one queue-like group. ``gen`` changes on every transition; heap
    entries carry the ``gen`` they were pushed with, so outdated entries are skipped lazily."""

    __slots__ = ("deliveries", "due", "gen", "holder", "msg", "state")

    def __init__(self, msg: StoredMessage) -> None:
        self.msg = msg
        self.state = _READY
        self.gen = 0
        self.deliveries = 0
        self.holder: _MemoryDelivery | None = None
        self.due = 0.0


class _QueueGroup(_Group):
    """Shared machinery of the NACK and VISIBILITY_TIMEOUT models: a ready heap ordered by publish
    sequence (a requeued message goes back to its original place, as RabbitMQ does when it can)
    and a timer heap (delayed requeue, visibility expiry)."""

    #: the state a message leaves when its timer fires
    _TIMED: int

    def __init__(self, dest: _Destination, name: str, *, clock: Clock, tags: Iterator[int]) -> None:
        super().__init__(dest, name, clock=clock, tags=tags)
        self.items: list[_QState] = []
        self.ready: list[tuple[int, int]] = []
        self.timers: list[tuple[float, int, int]] = []

    def add(self, msg: StoredMessage) -> None:
        st = _QState(msg)
        self.items.append(st)
        heappush(self.ready, (msg.seq, st.gen))

    def _make_ready(self, st: _QState) -> None:
        st.state = _READY
        st.gen += 1
        st.holder = None
        heappush(self.ready, (st.msg.seq, st.gen))

    def _set_timer(self, st: _QState, state: int, due: float) -> None:
        st.state = state
        st.gen += 1
        st.due = due
        heappush(self.timers, (due, st.msg.seq, st.gen))

    def _promote(self, now: float) -> None:
        """Apply every timer that is due (lazily: state is brought up to date before each use)."""
        while self.timers and self.timers[0][0] <= now:
            _, seq, gen = heappop(self.timers)
            st = self.items[seq]
            if st.gen == gen and st.state == self._TIMED:
                self._make_ready(st)

    def _deliver(self, sub: _MemorySubscription, now: float) -> _QState | None:
        self._promote(now)
        while self.ready:
            seq, gen = heappop(self.ready)
            st = self.items[seq]
            if st.gen == gen and st.state == _READY:
                st.deliveries += 1
                return st
        return None

    def next_timer(self, sub: _MemorySubscription, now: float) -> float | None:
        self._promote(now)
        while self.timers:
            _, seq, gen = self.timers[0]
            st = self.items[seq]
            if st.gen == gen and st.state == self._TIMED:
                return self.timers[0][0]
            heappop(self.timers)
        return None

    def depth(self, now: float) -> int:
        return sum(1 for st in self.items if st.state not in (_DONE, _DEAD))

    def in_flight(self, now: float) -> int:
        self._promote(now)
        return sum(1 for st in self.items if st.state == _HELD)

    def delivery_count(self, operation_id: str | None) -> int:
        return sum(st.deliveries for st in self.items if st.msg.operation_id == operation_id)


class _NackGroup(_QueueGroup):
    """RabbitMQ-like: a delivery stays held until settled or until its subscription closes."""

    _TIMED = _DELAYED

    def take(self, sub: _MemorySubscription, now: float) -> _MemoryDelivery | None:
        st = self._deliver(sub, now)
        if st is None:
            return None
        st.state = _HELD
        st.gen += 1
        d = _MemoryDelivery(
            self,
            sub,
            st.msg,
            delivery_id=f"{self.dest.name}/{self.name}#{next(self.tags)}",
            attempt=st.deliveries,
            received_at=now,
            settle_deadline=None,
        )
        st.holder = d
        return d

    def _current(self, d: _MemoryDelivery) -> _QState | None:
        # after a requeue the message belongs to whoever receives it next: the old copy's settle
        # is ignored (RabbitMQ refuses an unknown delivery tag on a new channel)
        st = self.items[d.message.seq]
        return st if st.holder is d and st.state == _HELD else None

    def ack(self, d: _MemoryDelivery) -> bool:
        if (st := self._current(d)) is None:
            return False
        st.state, st.holder = _DONE, None
        st.gen += 1
        return True

    def nack(self, d: _MemoryDelivery, delay: float) -> None:
        if (st := self._current(d)) is None:
            return
        st.holder = None
        if delay <= 0:
            self._make_ready(st)
        else:
            self._set_timer(st, _DELAYED, self.clock.now() + delay)

    def reject(self, d: _MemoryDelivery, reason: str) -> None:
        if (st := self._current(d)) is not None:
            st.state, st.holder = _DEAD, None
            st.gen += 1
            self.dead_letter(d, reason, st.deliveries)

    def detach(self, sub: _MemorySubscription, abandon: bool) -> None:
        # a closed channel -- clean or crashed -- returns its unacked messages at once
        super().detach(sub, abandon)
        for d in sub._unsettled:
            if (st := self._current(d)) is not None:
                self._make_ready(st)


class _VisibilityGroup(_QueueGroup):
    """SQS-like: a receive starts a visibility timer; nothing but the timer returns a message."""

    _TIMED = _HELD

    def take(self, sub: _MemorySubscription, now: float) -> _MemoryDelivery | None:
        st = self._deliver(sub, now)
        if st is None:
            return None
        due = now + self.dest.config.visibility_timeout
        self._set_timer(st, _HELD, due)
        d = _MemoryDelivery(
            self,
            sub,
            st.msg,
            # like a receipt handle: a new one per receive
            delivery_id=f"{self.dest.name}/{self.name}/{st.msg.seq}:r{st.deliveries}",
            attempt=st.deliveries,
            received_at=now,
            settle_deadline=due,
        )
        st.holder = d
        return d

    def _latest(self, d: _MemoryDelivery) -> _QState | None:
        """The state if ``d`` is the latest receipt of a message that still exists."""
        self._promote(self.clock.now())
        st = self.items[d.message.seq]
        return st if st.holder is d and st.state not in (_DONE, _DEAD) else None

    def ack(self, d: _MemoryDelivery) -> bool:
        # SQS deletes with any receipt of the message, even one whose visibility expired and was
        # received again elsewhere: the late ack wins and the other copy's work becomes a duplicate
        latest = self._latest(d) is not None
        st = self.items[d.message.seq]
        if st.state not in (_DONE, _DEAD):
            st.state, st.holder = _DONE, None
            st.gen += 1
        return latest

    def nack(self, d: _MemoryDelivery, delay: float) -> None:
        # ChangeMessageVisibility: only the latest receipt may move the timer
        if (st := self._latest(d)) is None:
            return
        if delay <= 0:
            self._make_ready(st)
        else:
            self._set_timer(st, _HELD, self.clock.now() + delay)

    def extend(self, d: _MemoryDelivery, seconds: float) -> None:
        if (st := self._latest(d)) is None:
            return
        due = self.clock.now() + seconds
        self._set_timer(st, _HELD, due)
        d.settle_deadline = due

    def reject(self, d: _MemoryDelivery, reason: str) -> None:
        # like ack, accepted from any receipt: the adapter's "send to DLQ, then delete" succeeds
        st = self.items[d.message.seq]
        if st.state not in (_DONE, _DEAD):
            st.state, st.holder = _DEAD, None
            st.gen += 1
            self.dead_letter(d, reason, st.deliveries)
