"""The memory broker: the reference broker, with faithful redelivery on an injectable clock.

Each destination chooses one of three redelivery models (:meth:`MemoryBroker.declare`), so tests
and the demo can run the same pipeline against RabbitMQ-, SQS- and Kafka-shaped semantics without a
server:

``RedeliveryKind.NACK`` (RabbitMQ-like)
    ``ack`` removes. ``nack(delay)`` requeues after ``delay`` seconds on the clock (at once for
    ``None``/0) and the next copy has ``redelivered=True``. ``reject`` drops the message to the
    group's dead-letter list. Closing a subscription -- normally or as a crash -- requeues its
    unsettled deliveries at once, as a closed channel does. No ``extend``.
``RedeliveryKind.VISIBILITY_TIMEOUT`` (SQS-like)
    A receive hides the message until ``now + visibility_timeout`` (``settle_deadline``). When the
    timer expires the message is delivered again to any consumer of the group, *even while the
    first consumer is still working on it*: that overlap is the real SQS leak and it is kept on
    purpose. ``ack`` deletes (also from a stale receipt, as SQS does), ``nack(delay)`` and
    ``extend(seconds)`` move the timer, ``reject`` deletes and dead-letters. Closing a subscription
    never returns its messages early.
``RedeliveryKind.OFFSET_REWIND`` (Kafka-like)
    One log per partition (``zlib.crc32(key) % partitions``, partition 0 for ``key=None``). Each
    group commits, per partition, the highest *contiguous* settled offset + 1, so an out-of-order
    ack never commits past an unfinished record. ``nack(delay)`` rewinds the partition to the nacked
    offset after ``delay`` (that record and every later one is delivered again). Closing a
    subscription, or a rebalance that moves a partition to another consumer, rewinds the partition
    to the committed offset: the new owner re-reads everything uncommitted. ``reject`` skips the
    record (it counts as settled for the commit) and dead-letters it. No ``extend``.

Messages are stored in their wire form (body, ``Envelope.wire_headers()`` plus ``content-type``,
key, broker timestamp), so consumers decode them through :func:`~replaysafe.envelope.decode_wire`
exactly as they would a real broker's messages. Every consumer group sees every message ever
published to the destination (a group created late reads the whole history, as if its queue had
been declared up front); consumers within one group compete for them.

Nothing here is durable beyond the process; what it models faithfully is *when* a message comes
back, to whom, and with which attempt count.
"""

from __future__ import annotations

import asyncio
import itertools
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from heapq import heappop, heappush
from typing import Any

from replaysafe.brokers.base import (
    Broker,
    Capabilities,
    Delivery,
    GroupState,
    RedeliveryKind,
    SettleGranularity,
    SourceFacts,
    Subscription,
)
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.envelope import HEADER_OPERATION_ID, Envelope
from replaysafe.errors import BrokerUnavailable, CapabilityError, ConfigurationError
from replaysafe.failpoints import (
    FAILPOINTS,
    PUBLISH_AFTER_ACCEPT,
    PUBLISH_BEFORE_ACCEPT,
    Failpoints,
)

__all__ = ["DeadLetter", "MemoryBroker", "StoredMessage"]

_CAPABILITIES: dict[RedeliveryKind, Capabilities] = {
    RedeliveryKind.NACK: Capabilities(
        redelivery=RedeliveryKind.NACK,
        settle_granularity=SettleGranularity.MESSAGE,
        extend_visibility=False,
        # competing consumers and requeues reorder messages, as on a RabbitMQ queue
        ordered_within_key=False,
        delivery_count=True,
    ),
    RedeliveryKind.VISIBILITY_TIMEOUT: Capabilities(
        redelivery=RedeliveryKind.VISIBILITY_TIMEOUT,
        settle_granularity=SettleGranularity.MESSAGE,
        extend_visibility=True,
        ordered_within_key=False,
        delivery_count=True,
    ),
    RedeliveryKind.OFFSET_REWIND: Capabilities(
        redelivery=RedeliveryKind.OFFSET_REWIND,
        settle_granularity=SettleGranularity.CUMULATIVE_OFFSET,
        extend_visibility=False,
        ordered_within_key=True,
        delivery_count=True,
    ),
}


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One accepted publish, in wire form. ``seq`` orders the destination's whole history;
    ``offset`` is the position in ``partition``'s log."""

    seq: int
    #: the ``rs-operation-id`` header; None for a plain client's message without one
    operation_id: str | None
    body: bytes
    headers: Mapping[str, str]
    content_type: str | None
    key: str | None
    timestamp: float
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message a group rejected: it is never redelivered to that group."""

    operation_id: str | None
    reason: str
    #: how many times the group had received the message when it was rejected
    attempt: int
    dead_at: float
    message: StoredMessage


@dataclass(frozen=True, slots=True)
class _Config:
    mode: RedeliveryKind
    visibility_timeout: float
    partitions: int


def partition_for(key: str | None, partitions: int) -> int:
    """The partition of ``key``: stable across processes and runs (crc32, never ``hash()``,
    which is salted per process)."""
    if key is None:
        return 0
    return zlib.crc32(key.encode("utf-8")) % partitions


class _Destination:
    def __init__(self, name: str, config: _Config) -> None:
        self.name = name
        self.config = config
        self.log: list[StoredMessage] = []
        self.partition_logs: list[list[StoredMessage]] = [[] for _ in range(config.partitions)]
        self.groups: dict[str, _Group] = {}


# --------------------------------------------------------------------------- deliveries


class _MemoryDelivery(Delivery):
    """One transport copy. Its settle calls are forwarded to the group, which decides whether the
    copy is still the current one (a stale copy's settle is ignored or, for SQS-like deletes,
    accepted) -- so a late settle never corrupts the group's state."""

    def __init__(
        self,
        group: _Group,
        sub: _MemorySubscription,
        message: StoredMessage,
        *,
        delivery_id: str,
        attempt: int,
        received_at: float,
        settle_deadline: float | None,
    ) -> None:
        self.body = message.body
        # a copy per delivery: a consumer that mutates its headers cannot alter the stored message
        self.headers = dict(message.headers)
        self.content_type = message.content_type
        self.key = message.key
        self.broker_timestamp = message.timestamp
        self.delivery_id = delivery_id
        self.attempt = attempt
        self.redelivered = attempt > 1
        self.received_at = received_at
        self.settle_deadline = settle_deadline
        self.message = message
        self._group = group
        self._sub = sub
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def _settle(self) -> bool:
        """Mark settled; False when it already was (the second settle does nothing)."""
        if self._settled:
            return False
        self._settled = True
        self._sub._unsettled.discard(self)
        return True

    async def ack(self) -> None:
        """Complete at the broker (COMPLETED): ack / delete / mark the offset done."""
        if self._settle():
            self._group.ack(self)
            self._group.notify()

    async def ack_confirmed(self) -> None:
        """``ack()``; raises ``BrokerUnavailable`` when this copy was no longer the current one
        (its settle was ignored, or raced another receipt) or, on an offset destination, when the
        commit did not cover it within about 5 s (earlier records still unfinished)."""
        if not self._settle():
            raise BrokerUnavailable(
                f"memory broker: {self.delivery_id} was already settled, so this ack cannot be "
                "confirmed; do not run an at-most-once effect for it"
            )
        counted = self._group.ack(self)
        self._group.notify()
        for _ in range(5000) if counted else ():
            covered = self._group.covered(self)
            if covered:
                return
            if covered is False:
                break
            await asyncio.sleep(0.001)  # real time: the broker's clock may be a test's fake one
        raise BrokerUnavailable(
            f"memory broker: the completion of {self.delivery_id} is not confirmed (a stale "
            "copy, or no commit covered it); do not run an at-most-once effect for it"
        )

    async def nack(self, delay: float | None = None) -> None:
        """Redeliver after ``delay`` seconds on the broker's clock (at once for None or <= 0)."""
        if self._settle():
            self._group.nack(self, max(0.0, delay or 0.0))
            self._group.notify()

    async def reject(self, reason: str) -> None:
        """Settle without redelivery; the message goes to the group's dead-letter list."""
        if self._settle():
            self._group.reject(self, reason)
            self._group.notify()

    async def extend(self, seconds: float) -> None:
        """Hide the message until ``now + seconds`` (VISIBILITY_TIMEOUT destinations only; others
        raise ``CapabilityError``). A no-op once settled or once the message was received again
        elsewhere: a stale receipt must not move the current holder's timer."""
        self._group.check_extend()
        if seconds < 0:
            raise ValueError(f"extend(seconds) needs seconds >= 0, got {seconds}")
        if not self._settled:
            self._group.extend(self, seconds)
            self._group.notify()

    def __repr__(self) -> str:
        return (
            f"<MemoryDelivery {self.delivery_id} op={self.message.operation_id!r} "
            f"attempt={self.attempt} settled={self._settled}>"
        )


# --------------------------------------------------------------------------- groups


class _Group(ABC):
    """One consumer group's view of a destination: which copies are out, what is done."""

    def __init__(self, broker: MemoryBroker, dest: _Destination, name: str) -> None:
        self.broker = broker
        self.dest = dest
        self.name = name
        self.subs: list[_MemorySubscription] = []
        self.dead: list[DeadLetter] = []
        # replaced on every notify: a waiter captures the current event *before* looking at the
        # state, so a change made after its look always sets the event it waits on (no lost
        # wake-up, no clearing, any number of waiters)
        self.changed = asyncio.Event()

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    @property
    def clock(self) -> Clock:
        return self.broker._clock

    def attach(self, sub: _MemorySubscription) -> None:
        self.subs.append(sub)

    def detach(self, sub: _MemorySubscription, abandon: bool) -> None:
        self.subs.remove(sub)

    def dead_letter(self, d: _MemoryDelivery, reason: str, attempt: int) -> None:
        msg = d.message
        self.dead.append(DeadLetter(msg.operation_id, reason, attempt, self.clock.now(), msg))

    def check_extend(self) -> None:
        mode = self.dest.config.mode
        if mode is RedeliveryKind.VISIBILITY_TIMEOUT:
            return
        how = (
            "nack (RabbitMQ-like)" if mode is RedeliveryKind.NACK else "offset rewind (Kafka-like)"
        )
        raise CapabilityError(
            f"MemoryBroker: destination {self.dest.name!r} redelivers by {how} and has no "
            "visibility timer to extend; use nack(delay=...) to postpone redelivery, or declare "
            "the destination with mode=RedeliveryKind.VISIBILITY_TIMEOUT"
        )

    @abstractmethod
    def add(self, msg: StoredMessage) -> None:
        """A message was accepted on the destination (also replays history for a new group)."""

    @abstractmethod
    def take(self, sub: _MemorySubscription, now: float) -> _MemoryDelivery | None:
        """Hand the next available message to ``sub``, or None."""

    @abstractmethod
    def next_timer(self, sub: _MemorySubscription, now: float) -> float | None:
        """The earliest future time at which ``take`` may find something new for ``sub``."""

    @abstractmethod
    def ack(self, d: _MemoryDelivery) -> bool:
        """Complete ``d``; True when ``d`` was the current copy (its completion holds), False
        when the settle of a stale copy was ignored or, SQS-like, raced another receipt."""

    def covered(self, d: _MemoryDelivery) -> bool | None:
        """After a counted ack: True once no crash can bring ``d`` back, False when it will come
        back anyway, None while that is not decided yet (an offset group's commit waits for the
        earlier records)."""
        return True

    @abstractmethod
    def nack(self, d: _MemoryDelivery, delay: float) -> None: ...

    @abstractmethod
    def reject(self, d: _MemoryDelivery, reason: str) -> None: ...

    def extend(self, d: _MemoryDelivery, seconds: float) -> None:  # noqa: B027 - capability
        """Only VISIBILITY_TIMEOUT groups override this; ``check_extend`` refuses the others."""

    @abstractmethod
    def depth(self, now: float) -> int: ...

    @abstractmethod
    def in_flight(self, now: float) -> int: ...

    @abstractmethod
    def delivery_count(self, operation_id: str | None) -> int: ...


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

    def __init__(self, broker: MemoryBroker, dest: _Destination, name: str) -> None:
        super().__init__(broker, dest, name)
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
            delivery_id=f"{self.dest.name}/{self.name}#{next(self.broker._tags)}",
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


class _Record:
    __slots__ = ("attempts", "done", "holder")

    def __init__(self) -> None:
        self.attempts = 0
        self.done = False
        self.holder: _MemoryDelivery | None = None


class _Partition:
    __slots__ = ("committed", "owner", "paused_until", "position", "records")

    def __init__(self) -> None:
        #: highest contiguous settled offset + 1: what survives a crash
        self.committed = 0
        #: next offset to deliver (consumer-local in Kafka; reset to ``committed`` on revoke)
        self.position = 0
        #: a delayed nack pauses the partition until then
        self.paused_until = 0.0
        self.records: list[_Record] = []
        self.owner: _MemorySubscription | None = None


class _OffsetGroup(_Group):
    """Kafka-like: per-partition logs, a committed offset per partition, partitions assigned to the
    group's live consumers.

    Invariant: every record at or after ``position`` is undelivered (not done, no holder), so a
    rewind or a reset only has to clear ``records[new_position:]``.
    """

    def __init__(self, broker: MemoryBroker, dest: _Destination, name: str) -> None:
        super().__init__(broker, dest, name)
        self.parts = [_Partition() for _ in range(dest.config.partitions)]

    def add(self, msg: StoredMessage) -> None:
        self.parts[msg.partition].records.append(_Record())

    def _rewind(self, ps: _Partition, offset: int) -> None:
        # Kafka forgets the consumer's uncommitted progress on a seek or a revoke: every record
        # from ``offset`` on is read again, and settles of the copies already out are ignored
        ps.position = offset
        for rec in ps.records[offset:]:
            rec.done = False
            rec.holder = None

    def attach(self, sub: _MemorySubscription) -> None:
        super().attach(sub)
        self._rebalance()

    def detach(self, sub: _MemorySubscription, abandon: bool) -> None:
        # clean close and crash end alike: commits happen on every ack, so there is nothing more
        # to commit; what is uncommitted is re-read by the partition's next owner
        super().detach(sub, abandon)
        for ps in self.parts:
            if ps.owner is sub:
                self._rewind(ps, ps.committed)
                ps.paused_until = 0.0
                ps.owner = None
        self._rebalance()

    def _rebalance(self) -> None:
        """Round-robin partitions over live consumers in join order. A partition that changes
        owner is revoked from the old one: rewound to its committed offset."""
        n = len(self.subs)
        for p, ps in enumerate(self.parts):
            new = self.subs[p % n] if n else None
            if ps.owner is not new:
                if ps.owner is not None:
                    self._rewind(ps, ps.committed)
                    ps.paused_until = 0.0
                ps.owner = new

    def assignment(self) -> dict[int, _MemorySubscription | None]:
        return {p: ps.owner for p, ps in enumerate(self.parts)}

    def take(self, sub: _MemorySubscription, now: float) -> _MemoryDelivery | None:
        log = self.dest.partition_logs
        best: tuple[int, int] | None = None  # (seq, partition): oldest publish first across parts
        for p, ps in enumerate(self.parts):
            if ps.owner is sub and ps.paused_until <= now and ps.position < len(ps.records):
                seq = log[p][ps.position].seq
                if best is None or seq < best[0]:
                    best = (seq, p)
        if best is None:
            return None
        p = best[1]
        ps = self.parts[p]
        offset = ps.position
        ps.position += 1
        rec = ps.records[offset]
        rec.attempts += 1
        d = _MemoryDelivery(
            self,
            sub,
            log[p][offset],
            delivery_id=f"{self.dest.name}/{p}@{offset}",
            attempt=rec.attempts,
            received_at=now,
            settle_deadline=None,
        )
        rec.holder = d
        return d

    def next_timer(self, sub: _MemorySubscription, now: float) -> float | None:
        due = [
            ps.paused_until
            for ps in self.parts
            if ps.owner is sub and ps.paused_until > now and ps.position < len(ps.records)
        ]
        return min(due, default=None)

    def _current(self, d: _MemoryDelivery) -> tuple[_Partition, _Record] | None:
        ps = self.parts[d.message.partition]
        rec = ps.records[d.message.offset]
        return (ps, rec) if rec.holder is d else None

    def _commit(self, ps: _Partition) -> None:
        # never past an unfinished record: stop at the first offset not settled
        while ps.committed < len(ps.records) and ps.records[ps.committed].done:
            ps.committed += 1

    def ack(self, d: _MemoryDelivery) -> bool:
        if (cur := self._current(d)) is None:
            return False
        ps, rec = cur
        rec.done, rec.holder = True, None
        self._commit(ps)
        return True

    def covered(self, d: _MemoryDelivery) -> bool | None:
        ps = self.parts[d.message.partition]
        if ps.committed > d.message.offset:
            return True
        # rewound meanwhile (an earlier record was nacked): it comes back
        return None if ps.records[d.message.offset].done else False

    def nack(self, d: _MemoryDelivery, delay: float) -> None:
        if (cur := self._current(d)) is None:
            return
        ps, _ = cur
        self._rewind(ps, d.message.offset)
        if delay > 0:
            # the longest requested delay wins, so a later nack never cuts an earlier one short
            ps.paused_until = max(ps.paused_until, self.clock.now() + delay)

    def reject(self, d: _MemoryDelivery, reason: str) -> None:
        if (cur := self._current(d)) is not None:
            ps, rec = cur
            rec.done, rec.holder = True, None
            self.dead_letter(d, reason, rec.attempts)
            self._commit(ps)

    def depth(self, now: float) -> int:
        # consumer lag: a record acked out of order is still not COMPLETED until committed
        return sum(len(ps.records) - ps.committed for ps in self.parts)

    def in_flight(self, now: float) -> int:
        return sum(1 for ps in self.parts for rec in ps.records if rec.holder is not None)

    def delivery_count(self, operation_id: str | None) -> int:
        return sum(
            ps.records[m.offset].attempts
            for ps, log in zip(self.parts, self.dest.partition_logs, strict=True)
            for m in log
            if m.operation_id == operation_id
        )


_GROUP_TYPES: dict[RedeliveryKind, type[_Group]] = {
    RedeliveryKind.NACK: _NackGroup,
    RedeliveryKind.VISIBILITY_TIMEOUT: _VisibilityGroup,
    RedeliveryKind.OFFSET_REWIND: _OffsetGroup,
}


# --------------------------------------------------------------------------- subscription


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
    def __init__(self, broker: MemoryBroker, group: _Group, prefetch: int) -> None:
        self._broker = broker
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
        clock = self._broker._clock
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
        now = self._broker._clock.now()
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
        self._broker._subs.discard(self)
        self._group.notify()

    def __repr__(self) -> str:
        return (
            f"<MemorySubscription {self._group.dest.name}/{self._group.name} "
            f"unsettled={len(self._unsettled)} closed={self._closed}>"
        )


# --------------------------------------------------------------------------- the broker


class MemoryBroker(Broker):
    """The reference broker (see the module docstring for the three redelivery models).

    ``clock`` drives every timer (delayed nack, visibility expiry, broker timestamps): with
    ``replaysafe.testing.FakeClock`` nothing is redelivered until the test advances time.
    ``failpoints`` (default: the process-wide registry) is hit around each envelope's publish:
    ``PUBLISH_BEFORE_ACCEPT`` (raising there stores nothing) and ``PUBLISH_AFTER_ACCEPT`` (raising
    there leaves the message stored: an ambiguous publish), with ctx ``operation_id``,
    ``destination`` and ``sleep`` (the broker clock's sleep).
    """

    def __init__(
        self,
        *,
        clock: Clock = SYSTEM_CLOCK,
        failpoints: Failpoints | None = None,
        default_mode: RedeliveryKind = RedeliveryKind.NACK,
    ) -> None:
        self._clock = clock
        self._failpoints = FAILPOINTS if failpoints is None else failpoints
        self._default = _Config(RedeliveryKind(default_mode), 30.0, 1)
        self._dests: dict[str, _Destination] = {}
        self._subs: set[_MemorySubscription] = set()
        self._tags = itertools.count(1)
        self._closed = False

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def failpoints(self) -> Failpoints:
        return self._failpoints

    # ---------------------------------------------------------------- configuration

    def declare(
        self,
        name: str,
        *,
        mode: RedeliveryKind,
        visibility_timeout: float = 30.0,
        partitions: int = 1,
    ) -> None:
        """Choose ``name``'s redelivery model. Undeclared destinations get ``default_mode``
        (30 s visibility, 1 partition). Declaring again with the same settings is a no-op; with
        different ones it raises ``ConfigurationError`` (as a RabbitMQ redeclare does)."""
        _check_name("destination", name)
        if visibility_timeout <= 0:
            raise ConfigurationError(
                f"visibility_timeout must be > 0 seconds, got {visibility_timeout}"
            )
        if partitions < 1:
            raise ConfigurationError(f"partitions must be >= 1, got {partitions}")
        config = _Config(RedeliveryKind(mode), float(visibility_timeout), partitions)
        existing = self._dests.get(name)
        if existing is None:
            self._dests[name] = _Destination(name, config)
        elif existing.config != config:
            raise ConfigurationError(
                f"MemoryBroker: destination {name!r} already exists with {existing.config}; "
                f"cannot redeclare it with {config}. Use a new name or declare it before first use"
            )

    def _dest(self, name: str) -> _Destination:
        dest = self._dests.get(name)
        if dest is None:
            _check_name("destination", name)
            dest = self._dests[name] = _Destination(name, self._default)
        return dest

    def _group(self, name: str, group: str) -> _Group:
        dest = self._dest(name)
        grp = dest.groups.get(group)
        if grp is None:
            _check_name("group", group)
            grp = dest.groups[group] = _GROUP_TYPES[dest.config.mode](self, dest, group)
            # a late group reads the whole history, as if its queue had existed all along
            for msg in dest.log:
                grp.add(msg)
        return grp

    def capabilities(self, source: str) -> Capabilities:
        dest = self._dests.get(source)
        return _CAPABILITIES[(dest.config if dest is not None else self._default).mode]

    async def prepare_source(
        self,
        source: str,
        groups: Sequence[str] = (),
        *,
        visibility_timeout: float | None = None,
        partitions: int | None = None,
    ) -> None:
        """Declare ``source`` with the broker's default mode (groups see the whole history)."""
        if source in self._dests:
            return
        self.declare(source, mode=self._default.mode,
                     visibility_timeout=visibility_timeout or self._default.visibility_timeout,
                     partitions=partitions or 1)  # fmt: skip

    async def describe(self, source: str) -> SourceFacts:
        dest = self._dests.get(source)
        config = dest.config if dest is not None else self._default
        vis = config.visibility_timeout
        return SourceFacts(
            broker="memory",
            visibility_timeout=vis if config.mode is RedeliveryKind.VISIBILITY_TIMEOUT else None,
            notes=("messages live only as long as the process",),
        )

    def group_name(self, source: str, group: str) -> str:
        return f"{source}/{group}"

    async def group_state(self, source: str, group: str) -> GroupState:
        """Messages the group has neither completed nor out with a consumer, and its live
        subscriptions. A group that does not exist yet would read the whole history."""
        name = self.group_name(source, group)
        dest = self._dests.get(source)
        grp = dest.groups.get(group) if dest is not None else None
        if grp is None:
            waiting = len(dest.log) if dest is not None else 0
            return GroupState(source, group, name, messages=waiting, consumers=0, exists=False)
        now = self._clock.now()
        waiting = grp.depth(now) - grp.in_flight(now)
        return GroupState(source, group, name, waiting, len(grp.subs), exists=True)

    async def stray_groups(self, source: str, prefix: str) -> list[GroupState]:
        dest = self._dests.get(source)
        names = sorted(g for g in (dest.groups if dest is not None else {}) if g.startswith(prefix))
        return [await self.group_state(source, g) for g in names]

    # ---------------------------------------------------------------- publish / subscribe

    async def publish(self, destination: str, envelopes: Sequence[Envelope]) -> None:
        """Store each envelope in wire form (boundary PUBLISHED when this returns).

        Envelopes are accepted one by one: if a failpoint raises, the earlier ones are stored, and
        with ``PUBLISH_AFTER_ACCEPT`` the failing one is stored too -- the caller sees the error
        (e.g. ``PublishAmbiguous``) and must retry with the SAME envelopes, which stores copies.
        Nothing is stamped here: ``rs-published-at`` is the producer's business.
        """
        if self._closed:
            raise BrokerUnavailable("MemoryBroker is closed; create a new one to publish")
        dest = self._dest(destination)
        for env in envelopes:
            ctx: dict[str, Any] = {
                "operation_id": env.operation_id,
                "destination": destination,
                "sleep": self._clock.sleep,
            }
            await self._failpoints.hit(PUBLISH_BEFORE_ACCEPT, ctx)
            self._store(dest, env)
            await self._failpoints.hit(PUBLISH_AFTER_ACCEPT, ctx)

    async def publish_raw(
        self,
        destination: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        key: str | None = None,
        content_type: str | None = None,
    ) -> None:
        """Store a message as a plain client would send it: exactly these bytes and headers, no
        envelope, no validation (bad input is the consumer's decision). The same failpoints run,
        with ``operation_id`` taken from the ``rs-operation-id`` header when present."""
        if self._closed:
            raise BrokerUnavailable("MemoryBroker is closed; create a new one to publish")
        dest = self._dest(destination)
        hdrs = dict(headers)
        ctype = content_type or hdrs.get("content-type")
        if ctype is not None:
            hdrs["content-type"] = ctype
        ctx: dict[str, Any] = {
            "operation_id": hdrs.get(HEADER_OPERATION_ID),
            "destination": destination,
            "sleep": self._clock.sleep,
        }
        await self._failpoints.hit(PUBLISH_BEFORE_ACCEPT, ctx)
        self._append(dest, bytes(body), hdrs, ctype, key)
        await self._failpoints.hit(PUBLISH_AFTER_ACCEPT, ctx)

    def _store(self, dest: _Destination, env: Envelope) -> None:
        headers = env.wire_headers()
        headers["content-type"] = env.content_type
        self._append(dest, env.payload, headers, env.content_type, env.key)

    def _append(
        self,
        dest: _Destination,
        body: bytes,
        headers: dict[str, str],
        content_type: str | None,
        key: str | None,
    ) -> None:
        part = partition_for(key, dest.config.partitions)
        msg = StoredMessage(
            seq=len(dest.log),
            operation_id=headers.get(HEADER_OPERATION_ID),
            body=body,
            headers=headers,
            content_type=content_type,
            key=key,
            timestamp=self._clock.now(),
            partition=part,
            offset=len(dest.partition_logs[part]),
        )
        dest.log.append(msg)
        dest.partition_logs[part].append(msg)
        for grp in dest.groups.values():
            grp.add(msg)
            grp.notify()

    async def subscribe(self, source: str, group: str, *, prefetch: int = 16) -> Subscription:
        """Join ``group`` on ``source``; at most ``prefetch`` deliveries are unsettled at a time.
        On OFFSET_REWIND destinations joining rebalances the group's partitions."""
        if self._closed:
            raise BrokerUnavailable("MemoryBroker is closed; create a new one to subscribe")
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be >= 1, got {prefetch}")
        grp = self._group(source, group)
        sub = _MemorySubscription(self, grp, prefetch)
        grp.attach(sub)
        self._subs.add(sub)
        grp.notify()
        return sub

    async def close(self) -> None:
        """Close every open subscription (cleanly) and refuse further publishes. Idempotent.
        The stored state stays inspectable."""
        self._closed = True
        for sub in list(self._subs):
            await sub.close()

    # ---------------------------------------------------------------- introspection (tests)

    def depth(self, name: str, group: str) -> int:
        """Messages the group has not completed: NACK/VISIBILITY not yet acked or rejected;
        OFFSET_REWIND the lag, records at or after the committed offset."""
        return self._group(name, group).depth(self._clock.now())

    def in_flight(self, name: str, group: str) -> int:
        """Messages out with a consumer: NACK unacked; VISIBILITY invisible (received or delayed,
        timer not expired); OFFSET_REWIND delivered and not yet settled."""
        return self._group(name, group).in_flight(self._clock.now())

    def delivery_count(self, name: str, group: str, operation_id: str | None) -> int:
        """How many copies of ``operation_id`` the group has received (all published copies)."""
        return self._group(name, group).delivery_count(operation_id)

    def dead_letters(self, name: str, group: str) -> list[DeadLetter]:
        """What the group rejected, in rejection order."""
        return list(self._group(name, group).dead)

    def published(self, name: str) -> list[str | None]:
        """Operation ids of every accepted publish, in order (retries appear once per copy; None
        for a raw message without ``rs-operation-id``)."""
        dest = self._dests.get(name)
        return [] if dest is None else [m.operation_id for m in dest.log]

    def messages(self, name: str) -> list[StoredMessage]:
        """Every accepted publish in wire form, in order."""
        dest = self._dests.get(name)
        return [] if dest is None else list(dest.log)

    def committed(self, name: str, group: str) -> dict[int, int]:
        """OFFSET_REWIND: the committed offset per partition (next offset a new owner reads)."""
        grp = self._group(name, group)
        if not isinstance(grp, _OffsetGroup):
            raise CapabilityError(
                f"MemoryBroker: destination {name!r} is not OFFSET_REWIND; it has no offsets"
            )
        return {p: ps.committed for p, ps in enumerate(grp.parts)}

    def assignment(self, name: str, group: str) -> dict[int, Subscription | None]:
        """OFFSET_REWIND: which live subscription owns each partition."""
        grp = self._group(name, group)
        if not isinstance(grp, _OffsetGroup):
            raise CapabilityError(
                f"MemoryBroker: destination {name!r} is not OFFSET_REWIND; it has no partitions"
            )
        return dict(grp.assignment())

    def __repr__(self) -> str:
        return f"MemoryBroker(clock={self._clock!r}, destinations={sorted(self._dests)})"


def _check_name(what: str, name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{what} name must be a non-empty string, got {name!r}")
