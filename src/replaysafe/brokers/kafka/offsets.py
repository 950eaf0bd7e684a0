"""Offset bookkeeping: which fetched records of each assigned partition are done, and so which
offset may be committed (the highest *contiguous* completed one + 1)."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

#: (topic, partition)
TP = tuple[str, int]


@dataclass(slots=True)
class _Rec:
    token: int
    done: bool = False


class _Progress:
    """One partition's tracked records, in offset order."""

    __slots__ = ("committed", "frozen", "generation", "next_offset", "records", "start")

    def __init__(self, generation: int) -> None:
        #: the first offset tracked in this generation: where the group already stood
        self.start: int | None = None
        #: fetched records (buffered or handed out) from the lowest unfinished one on
        self.records: OrderedDict[int, _Rec] = OrderedDict()
        #: one past the last tracked record, or the rewind target; None before the first record
        self.next_offset: int | None = None
        self.committed: int | None = None
        self.generation = generation
        #: rewinding: new records are refused until the seek back has happened
        self.frozen = False

    def position(self) -> int | None:
        for offset in self.records:  # done heads are popped eagerly: the first is unfinished
            return offset
        return self.next_offset

    def pop_done(self) -> None:
        records = self.records
        while records:
            offset = next(iter(records))
            if not records[offset].done:
                return
            records.popitem(last=False)

    def truncate(self, offset: int) -> None:
        records = self.records
        while records:
            last = next(reversed(records))
            if last < offset:
                break
            records.popitem(last=True)
        self.next_offset = offset


class OffsetTracker:
    """Which offsets of each assigned partition are done, and so what may be committed.

    Pure bookkeeping (no I/O, not thread-safe: the subscription serializes calls). Each tracked
    record gets a token; a settle only counts when its token is still current, so a copy that a
    rewind or a revoke made stale can never move the commit position.

    The commit position of a partition is its lowest unfinished tracked offset, or one past the
    last tracked record when everything is done. Offsets need not be contiguous (compaction and
    transaction markers leave gaps): the *tracked* sequence is what counts.
    """

    def __init__(self) -> None:
        self._parts: dict[TP, _Progress] = {}
        self._tokens = itertools.count(1)
        self._generations = itertools.count(1)

    def assign(self, tp: TP) -> None:
        """Start ``tp`` afresh (a new generation: older tokens of it are stale)."""
        self._parts[tp] = _Progress(next(self._generations))

    def revoke(self, tp: TP) -> None:
        self._parts.pop(tp, None)

    def generation(self, tp: TP) -> int | None:
        part = self._parts.get(tp)
        return None if part is None else part.generation

    def commit_covers(self, tp: TP, offset: int, generation: int | None) -> bool | None:
        """True once a commit of ``generation`` covers ``offset``; False while it may still
        come; None when it never will here (revoked, or a newer generation)."""
        part = self._parts.get(tp)
        if part is None or generation is None or part.generation != generation:
            return None
        return part.committed is not None and part.committed > offset

    def assigned(self) -> list[TP]:
        return list(self._parts)

    def track(self, tp: TP, offset: int) -> int | None:
        """Register a fetched record (unfinished from now on, even before it is handed out);
        returns its token, or None when the record must be dropped (partition not assigned,
        rewinding, or an offset already tracked)."""
        part = self._parts.get(tp)
        if part is None or part.frozen:
            return None
        if part.next_offset is not None and offset < part.next_offset:
            return None
        token = next(self._tokens)
        if part.start is None:
            part.start = offset
        part.records[offset] = _Rec(token)
        part.next_offset = offset + 1
        return token

    def valid(self, tp: TP, offset: int, token: int) -> bool:
        part = self._parts.get(tp)
        rec = part.records.get(offset) if part is not None else None
        return rec is not None and rec.token == token and not rec.done

    def done(self, tp: TP, offset: int, token: int) -> bool:
        """Mark a record done (ack, or reject after the runtime quarantined it). Returns True when
        it counted (the commit position may have moved); False for a stale copy."""
        part = self._parts.get(tp)
        rec = part.records.get(offset) if part is not None else None
        if part is None or rec is None or rec.token != token:
            return False
        rec.done = True
        part.pop_done()
        return True

    def rewind(self, tp: TP, offset: int, token: int) -> bool:
        """Drop the record at ``offset`` and every later one of ``tp`` (they will be fetched again
        after the seek back) and refuse new records until :meth:`unfreeze`. False when stale."""
        part = self._parts.get(tp)
        rec = part.records.get(offset) if part is not None else None
        if part is None or rec is None or rec.token != token or rec.done:
            return False
        part.truncate(offset)
        part.frozen = True
        return True

    def unfreeze(self, tp: TP) -> None:
        part = self._parts.get(tp)
        if part is not None:
            part.frozen = False

    def position(self, tp: TP) -> int | None:
        """The offset to commit for ``tp`` (the next one a new owner reads), or None."""
        part = self._parts.get(tp)
        return part.position() if part is not None else None

    def to_commit(self, tps: Iterable[TP] | None = None) -> list[tuple[TP, int, int]]:
        """``(tp, position, generation)`` for every partition whose position moved since its last
        commit."""
        out = []
        for tp in self._parts if tps is None else tps:
            part = self._parts.get(tp)
            if part is None:
                continue
            pos = part.position()
            # nothing done yet (pos == start): the group already stands there
            if pos is not None and pos != part.committed and pos != part.start:
                out.append((tp, pos, part.generation))
        return out

    def committed(self, tp: TP, position: int, generation: int) -> None:
        part = self._parts.get(tp)
        # answers may come out of order (an asynchronous commit answered after a later
        # synchronous one): a committed position only moves forward
        if (
            part is not None
            and part.generation == generation
            and (part.committed is None or position > part.committed)
        ):
            part.committed = position
