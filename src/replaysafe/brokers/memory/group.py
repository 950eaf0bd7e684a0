"""One consumer group's bookkeeping on one destination: the abstract :class:`_Group` that a
delivery forwards its settles to. The three redelivery models implement it in :mod:`.queues`
(NACK, VISIBILITY_TIMEOUT) and :mod:`.offsets` (OFFSET_REWIND)."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING

from replaysafe.brokers.base import RedeliveryKind
from replaysafe.brokers.memory.store import DeadLetter, StoredMessage, _Destination
from replaysafe.clock import Clock
from replaysafe.errors import CapabilityError

if TYPE_CHECKING:
    from replaysafe.brokers.memory.consumer import _MemorySubscription
    from replaysafe.brokers.memory.delivery import _MemoryDelivery


class _Group(ABC):
    """One consumer group's view of a destination: which copies are out, what is done."""

    def __init__(self, dest: _Destination, name: str, *, clock: Clock, tags: Iterator[int]) -> None:
        #: the broker's clock and its delivery-tag counter (tags are unique broker-wide)
        self.clock = clock
        self.tags = tags
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
