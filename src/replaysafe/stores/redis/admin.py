"""The admin role of the Redis ledger (:class:`~replaysafe.ledger.base.LedgerAdmin`): the
``inspect`` summary (a SCAN of every record), the horizon purge (the completion log, in
chunked scripts) and durability (the server's persistence settings, read live)."""

from __future__ import annotations

import heapq
import math
from typing import Any, Final

from replaysafe.ledger.base import LedgerAdmin, LedgerSummary, OpKey, State
from replaysafe.ledger.durability import Durability, RedisPersistence, assess_persistence
from replaysafe.quarantine import QuarantineReason
from replaysafe.stores.redis.base import RedisBase
from replaysafe.stores.redis.decode import _US, _s
from replaysafe.stores.redis.scripts import _SCRIPTS, PURGE_CHUNK

#: summary(): keys asked of one SCAN call, and record hashes read per pipelined round trip
SUMMARY_CHUNK: Final = 1_000
#: summary(): record hashes whose MEMORY USAGE is measured to estimate ``approx_bytes``
MEMORY_SAMPLE: Final = 64
#: the record fields summary() reads (HMGET, in this order)
_SUMMARY_FIELDS: Final = (
    "state", "attempts", "lease_until", "updated_at", "completed_at", "scope", "operation_id",
)  # fmt: skip


def _glob_escape(raw: bytes) -> bytes:
    """``raw`` as a literal in a ``SCAN MATCH`` pattern (a prefix may contain glob characters)."""
    out = bytearray()
    for c in raw:
        if c in b"*?[]\\":
            out += b"\\"
        out.append(c)
    return bytes(out)


class RedisAdmin(RedisBase, LedgerAdmin):
    """The :class:`~replaysafe.ledger.base.LedgerAdmin` role on a :class:`.RedisBase`."""

    async def summary(self, *, top: int = 10) -> LedgerSummary:
        """Counts for ``replaysafe inspect``. An admin call, **O(records)**: it ``SCAN``s every
        record key under the prefix (at most :data:`SUMMARY_CHUNK` per call) and reads the needed
        fields with pipelined ``HMGET``s, one round trip per chunk, so Redis is never blocked
        long but a large ledger takes a while. Do not call it on a hot path.

        ``now`` and expired leases are judged by Redis ``TIME`` (read once, before the scan).
        ``oldest_in_flight_at`` is the ``updated_at`` of the oldest in-flight record: its claim
        time (an extend moves only ``lease_until``). ``completed_last_hour`` counts
        ``completed_at`` fields in the hour before ``now`` (records purged or expired are not
        counted). Quarantine counts are the per-reason indexes' ``ZCARD``. ``approx_bytes`` is an
        estimate: the mean ``MEMORY USAGE`` of up to :data:`MEMORY_SAMPLE` record hashes times the
        record count, plus the completion log; quarantine entries are not included; None when
        ``MEMORY USAGE`` is not permitted.
        The scan is not a snapshot: records changing during it may be counted in either state.
        """
        reasons = list(QuarantineReason)

        async def head() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.time()
            for r in reasons:
                pipe.zcard(self._codec.index(r))
            return list(await pipe.execute())

        first = await self._command("summary", head)
        sec, usec = first[0]
        now = int(sec) * _US + int(usec)
        by_reason = {r.value: int(n) for r, n in zip(reasons, first[1:], strict=True) if n}
        by_state: dict[str, int] = {}
        expired, oldest, recent = 0, None, 0
        hot: list[tuple[int, str, str]] = []  # (-attempts, scope, operation_id), best `top`
        sample: list[bytes] = []
        seen: set[bytes] = set()  # SCAN may return a key twice (while Redis rehashes)
        pattern = _glob_escape(self._p + b"op:") + b"*"
        cursor: int = 0
        while True:

            async def scan(at: int = cursor) -> tuple[int, list[Any]]:
                return await self._client.scan(at, match=pattern, count=SUMMARY_CHUNK)

            cursor, found = await self._command("summary (SCAN)", scan)
            keys = [k for k in found if k not in seen]
            seen.update(keys)
            if keys:

                async def rows(keys: list[bytes] = keys) -> list[Any]:
                    pipe = self._client.pipeline(transaction=False)
                    for k in keys:
                        pipe.hmget(k, _SUMMARY_FIELDS)
                    return list(await pipe.execute())

                candidates = []
                for key, row in zip(keys, await self._command("summary", rows), strict=True):
                    state, attempts, lease_until, updated, completed, scope, op_id = row
                    if state is None:  # expired or purged since SCAN saw it
                        continue
                    st = _s(state)
                    by_state[st] = by_state.get(st, 0) + 1
                    if len(sample) < MEMORY_SAMPLE:
                        sample.append(key)
                    if st == State.IN_FLIGHT.value:
                        if int(lease_until or 0) <= now:
                            expired += 1
                        at = int(updated)
                        oldest = at if oldest is None else min(oldest, at)
                    if completed is not None and int(completed) >= now - 3600 * _US:
                        recent += 1
                    n = int(attempts or 0)
                    if n > 1 and top > 0:
                        candidates.append((-n, _s(scope), _s(op_id)))
                if candidates:
                    hot = heapq.nsmallest(top, hot + candidates)
            if cursor == 0:
                break
        records = sum(by_state.values())
        return LedgerSummary(
            now=now / _US,
            by_state=by_state,
            expired_leases=expired,
            oldest_in_flight_at=None if oldest is None else oldest / _US,
            hot_operations=[(OpKey(sc, op), -n) for n, sc, op in hot],
            quarantined_by_reason=by_reason,
            completed_last_hour=recent,
            approx_bytes=await self._approx_bytes(sample, records),
        )

    async def _approx_bytes(self, sample: list[bytes], records: int) -> int | None:
        """Estimate the records' memory from ``MEMORY USAGE`` of ``sample`` (see summary)."""

        async def usage() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for k in [self._p + b"completions", *sample]:
                pipe.memory_usage(k)
            return list(await pipe.execute())

        try:
            log, *sizes = await usage()
        except self._errors.ResponseError:  # MEMORY not permitted (ACL) or renamed away
            return None
        except self._errors.RedisError as exc:
            raise self._codec.unavailable(exc, "summary (MEMORY USAGE)", sent=False) from exc
        measured = [int(b) for b in sizes if b is not None]  # None: gone since the scan
        mean = sum(measured) / len(measured) if measured else 0
        return int(log or 0) + round(mean * records)

    async def purge(self, older_than: float, *, limit: int = 10_000) -> int:
        """Forget up to ``limit`` COMPLETED records completed before ``older_than``, oldest first.

        Completed records already expire by TTL at ``retention``; purge forgets them earlier. It
        walks the completion log in scripts of at most :data:`PURGE_CHUNK` deletions (so Redis is
        never blocked long) and drops stale index entries on the way. A purged operation is new
        again to the ledger: purge only what lies beyond the replay horizon.
        """
        if limit <= 0:
            return 0
        cutoff = str(math.ceil(older_than * _US))
        total = 0
        while total < limit:
            want = min(PURGE_CHUNK, limit - total)
            reply = await self._eval(
                _SCRIPTS["purge"],
                [self._p + b"completions"],
                [cutoff, str(want), str(2 * want)],
                what="purge",
                now_at=2,
            )
            total += int(reply[0])
            if reply[1] == b"1":
                break
        return total

    async def persistence_report(self) -> RedisPersistence:
        """Read the server's persistence settings (``CONFIG GET``) and say whether they can back a
        claim. A server that disables ``CONFIG`` gives an "unknown" report, not an error."""
        self._check_open()
        config: dict[str, str] = {}
        for name in ("appendonly", "appendfsync", "save", "maxmemory-policy"):
            try:
                reply = await self._client.config_get(name)
            except self._errors.ResponseError:  # CONFIG renamed away, or not allowed by ACL
                return assess_persistence(None)
            except self._errors.RedisError as exc:
                raise self._codec.unavailable(
                    exc, "persistence_report (CONFIG GET)", sent=False
                ) from exc
            for k, v in dict(reply).items():
                if k is not None:
                    config[_s(k)] = "" if v is None else _s(v)
        return assess_persistence(config)

    async def durability(self) -> Durability:
        """The server's persistence settings, read live (:meth:`persistence_report`), as the
        ledger's durability: ``appendfsync always`` durable, ``everysec``/``no`` loses recent
        writes on a machine crash, RDB-only or no persistence (or an evicting
        ``maxmemory-policy``) not durable, ``CONFIG`` not permitted unknown."""
        report = await self.persistence_report()
        return Durability.of(
            report.level, f"redis {self._display} prefix {self._prefix!r}", report.setting,
            report.sentence,
        )  # fmt: skip
