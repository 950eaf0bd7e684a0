"""The quarantine role of the Redis ledger
(:class:`~replaysafe.ledger.base.QuarantineStore`): entries as hashes under ``<prefix>q:``,
indexed by creation time in ``<prefix>qidx`` and per reason; quarantine, redrive and purge are
scripts, the reads plain pipelined commands."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from replaysafe.ledger.base import (
    Claim,
    OpKey,
    QuarantineEntry,
    QuarantineRequest,
    QuarantineStore,
    unknown_entry,
)
from replaysafe.quarantine import QuarantineReason
from replaysafe.stores.redis.base import RedisBase
from replaysafe.stores.redis.decode import _US, _b, _entry, _pairs, _s
from replaysafe.stores.redis.scripts import _SCRIPTS, PURGE_CHUNK


class RedisQuarantine(RedisBase, QuarantineStore):
    """The :class:`~replaysafe.ledger.base.QuarantineStore` role on a :class:`.RedisBase`."""

    async def quarantine(
        self, request: QuarantineRequest, claim: Claim | None = None
    ) -> QuarantineEntry:
        """Record the entry (idempotent per ``request.entry_id()``) and, with ``claim``, move the
        record to QUARANTINED under fencing, in one script. Durable before the caller completes at
        the broker only as far as the server's persistence is (see :meth:`persistence_report`)."""
        return await self._one(self._codec.quarantine(request, claim))

    async def quarantined(
        self, *, reason: QuarantineReason | None = None, limit: int = 100
    ) -> list[QuarantineEntry]:
        """Quarantine entries, oldest first (two round trips: the index, then the entries)."""
        if limit <= 0:
            return []
        index = self._codec.index(reason)
        ids = await self._command("quarantined", lambda: self._client.zrange(index, 0, limit - 1))
        if not ids:
            return []

        async def fetch() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for eid in ids:
                pipe.hgetall(self._p + b"q:" + eid)
            return list(await pipe.execute())

        hashes = await self._command("quarantined", fetch)
        # an entry deleted by hand between the two trips is skipped, not reported half-empty
        return [_entry(h) for h in hashes if h]

    async def quarantine_entry(self, entry_id: str) -> QuarantineEntry | None:
        """One quarantine entry by id (one ``HGETALL``), or None when there is none."""
        h = await self._command(
            "quarantine_entry", lambda: self._client.hgetall(self._codec.entry_key(entry_id))
        )
        return _entry(h) if h else None

    async def redrive(self, entry_id: str) -> QuarantineEntry:
        """Record a redrive of the entry (``redriven_at`` = Redis ``TIME``, ``redrives + 1``) and,
        if its operation is QUARANTINED, release it with attempts 0, in one script (atomic).

        A COMPLETED operation stays completed (the republished copy is answered as a duplicate,
        never re-run); in-flight and released operations are left alone. Publishing the copy is
        the caller's job: redrive moves no boundary. Two round trips: the entry's scope and
        operation id are read first to name the record. Raises ``LedgerError`` (changing nothing)
        for an unknown entry; a lost reply raises ``LedgerUnavailable`` and the redrive may or may
        not have been recorded (repeating it only counts one more redrive).
        """
        entry_key = self._codec.entry_key(entry_id)
        scope, op_id = await self._command(
            "redrive", lambda: self._client.hmget(entry_key, ["scope", "operation_id"])
        )
        if scope is None:
            raise unknown_entry(entry_id)
        keys = [entry_key]
        if op_id is not None:
            keys.append(self.key_for(OpKey(_s(scope), _s(op_id))))
        reply = await self._eval(_SCRIPTS["redrive"], keys, [], what="redrive")
        if reply[0] == b"unknown":  # purged between the read and the script
            raise unknown_entry(entry_id)
        return _entry(_pairs(reply[2:]))

    async def purge_quarantine(
        self,
        entry_ids: Sequence[str] | None = None,
        *,
        reason: QuarantineReason | None = None,
        older_than: float | None = None,
        limit: int = 10_000,
    ) -> int:
        """Delete up to ``limit`` quarantine entries matching every given filter (``entry_ids``;
        ``reason``; created before ``older_than``), oldest first. Operation records are left
        alone (a quarantined operation stays quarantined: redrive it to make it claimable).

        Each script deletes at most :data:`PURGE_CHUNK` entries (Redis is never blocked long)
        and removes each entry from the overall and per-reason indexes together with its hash.
        Without ids, the scripts walk the (per-reason) index from its oldest member. With ids,
        their creation times are read first (pipelined ``ZSCORE``) to order them oldest first;
        the script checks every filter again before deleting. ``entry_ids=[]`` deletes nothing.
        The purge as a whole is not atomic; a lost reply leaves a chunk deleted or not.
        """
        if limit <= 0 or (entry_ids is not None and not entry_ids):
            return 0
        index = self._codec.index(reason)
        keys = [index, self._p + b"qidx"]
        # the highest creation time purged, exclusive: created_at (integer us) < older_than
        high = "+inf" if older_than is None else "(" + str(math.ceil(older_than * _US))
        total = 0
        if entry_ids is None:
            while total < limit:
                want = min(PURGE_CHUNK, limit - total)
                reply = await self._eval(
                    _SCRIPTS["purge_quarantine"],
                    keys,
                    [self._p, high, str(want), "0"],
                    what="purge_quarantine",
                    now_at=2,
                )
                total += int(reply[0])
                if int(reply[1]) < want:  # the index has no older members left
                    break
            return total
        ids = list(dict.fromkeys(entry_ids))
        cutoff = math.inf if older_than is None else int(high[1:])
        found: list[tuple[int, str]] = []
        for lo in range(0, len(ids), PURGE_CHUNK):
            chunk = ids[lo : lo + PURGE_CHUNK]

            async def scores(chunk: list[str] = chunk) -> list[Any]:
                pipe = self._client.pipeline(transaction=False)
                for eid in chunk:
                    pipe.zscore(index, _b(eid))
                return list(await pipe.execute())

            for eid, score in zip(
                chunk, await self._command("purge_quarantine", scores), strict=True
            ):
                if score is not None and score < cutoff:
                    found.append((int(score), eid))
        found.sort()  # oldest first, ties by id: the order of the index itself
        for lo in range(0, len(found), PURGE_CHUNK):
            if total >= limit:
                break
            reply = await self._eval(
                _SCRIPTS["purge_quarantine"],
                keys,
                [
                    self._p,
                    high,
                    str(limit - total),
                    "1",
                    *(_b(e) for _, e in found[lo : lo + PURGE_CHUNK]),
                ],
                what="purge_quarantine",
                now_at=2,
            )
            total += int(reply[0])
        return total
