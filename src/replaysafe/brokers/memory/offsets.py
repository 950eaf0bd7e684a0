"""The log-like group: OFFSET_REWIND (Kafka-like). It owns, per partition, the committed offset,
the consumer position, a delayed nack's pause and the partition's owner (the rebalance)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from replaysafe.brokers.memory.delivery import _MemoryDelivery
from replaysafe.brokers.memory.group import _Group
from replaysafe.brokers.memory.store import StoredMessage, _Destination
from replaysafe.clock import Clock

if TYPE_CHECKING:
    from replaysafe.brokers.memory.consumer import _MemorySubscription


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

    def __init__(self, dest: _Destination, name: str, *, clock: Clock, tags: Iterator[int]) -> None:
        super().__init__(dest, name, clock=clock, tags=tags)
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
