"""The quarantine role of the MySQL ledger: durable entries for messages set aside, listed,
redriven and purged by an operator.

``quarantine`` with a claim moves the operation to QUARANTINED under fencing and upserts the
entry in one transaction (both or neither). Entries are merged with the rule every backend
shares (:func:`~replaysafe.ledger.base.merge_quarantine`): the first detail, message copy and
publish time are kept, ``seen`` counts repeats. Free text is made storable first
(:meth:`~replaysafe.ledger.base.QuarantineRequest.storable`); message copies are ``LONGBLOB``,
byte for byte (capped at :data:`~replaysafe.ledger.base.MAX_QUARANTINE_COPY`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

from replaysafe.ledger.base import (
    Claim,
    QuarantineEntry,
    QuarantineRequest,
    State,
    check_fence,
    merge_quarantine,
    unknown_entry,
)
from replaysafe.quarantine import QuarantineReason
from replaysafe.stores.mysql.core import MySQLCore, db_now, execute
from replaysafe.stores.mysql.records import (
    ENTRY_COLUMNS,
    ENTRY_SELECT,
    entry,
    entry_params,
    key_bytes,
    upsert_sql,
)

if TYPE_CHECKING:
    from asyncmy.connection import Connection

#: rows deleted per statement by purge_quarantine (each statement commits on its own)
PURGE_BATCH: Final = 1000


class QuarantineMixin(MySQLCore):
    """The quarantine role (:class:`~replaysafe.ledger.base.QuarantineStore`) on MySQL."""

    async def quarantine(
        self, request: QuarantineRequest, claim: Claim | None = None
    ) -> QuarantineEntry:
        """Upsert the entry (``seen`` + 1 on a repeat) and, with ``claim``, move the operation to
        QUARANTINED under fencing (``LeaseLost`` if stale: nothing written), in one transaction:
        committed (durable) before this returns, so the caller may then complete at the
        broker."""
        self._guard("quarantine")
        req = request.storable()

        async def body(conn: Connection) -> QuarantineEntry:
            if claim is not None:
                locked = await self._lock_records(conn, [claim.key])
                rec = check_fence(locked.get(claim.key), claim)
            now = await db_now(conn)
            if claim is not None:
                rec = replace(
                    rec, state=State.QUARANTINED, lease_until=None, last_error=req.detail,
                    updated_at=now,
                )  # fmt: skip
                await self._write_records(conn, [rec], {rec.key})
            old = await self._lock_entry(conn, req.entry_id())
            new = merge_quarantine(old, req, now)
            await self._write_entry(conn, new, exists=old is not None)
            return new

        # a duplicate key: a concurrent quarantine of the same message inserted it first
        return await self._in_tx("quarantine", body, retry_duplicates=True)

    async def quarantined(
        self, *, reason: QuarantineReason | None = None, limit: int = 100
    ) -> list[QuarantineEntry]:
        """Entries oldest first (``(created_at, id)``, or ``(reason, created_at, id)``)."""
        if limit <= 0:
            return []
        q = self.table("quarantine")
        if reason is None:
            sql = f"SELECT {ENTRY_SELECT} FROM {q} ORDER BY created_at, id LIMIT %s"
            params: tuple[Any, ...] = (limit,)
        else:
            sql = (
                f"SELECT {ENTRY_SELECT} FROM {q} WHERE reason = %s ORDER BY created_at, id LIMIT %s"
            )
            params = (reason.value, limit)
        rows, _ = await self._run("quarantined", sql, params)
        return [entry(r) for r in rows]

    async def quarantine_entry(self, entry_id: str) -> QuarantineEntry | None:
        """One entry by id (primary key), or None. Reads only."""
        rows, _ = await self._run(
            "quarantine_entry",
            f"SELECT {ENTRY_SELECT} FROM {self.table('quarantine')} WHERE id = %s",
            (entry_id,),
        )
        return entry(rows[0]) if rows else None

    async def redrive(self, entry_id: str) -> QuarantineEntry:
        """Record a redrive (``redriven_at`` = server now, ``redrives`` + 1) and, if the entry's
        operation is QUARANTINED, release it with ``attempts`` reset, in one transaction. A
        completed, in-flight or released operation is left as it is. ``LedgerError`` for an
        unknown entry (nothing written). Publishes nothing: republishing is the caller's job."""
        self._guard("redrive")

        async def body(conn: Connection) -> QuarantineEntry:
            old = await self._lock_entry(conn, entry_id)
            if old is None:
                raise unknown_entry(entry_id)
            now = await db_now(conn)
            new = replace(old, redriven_at=now, redrives=old.redrives + 1, updated_at=now)
            await self._write_entry(conn, new, exists=True)
            if old.operation_id is not None:
                await execute(
                    conn,
                    f"UPDATE {self.table('operations')} SET state = 'released', attempts = 0, "
                    "updated_at = %s, unstarted_attempt = NULL "
                    "WHERE scope = %s AND operation_id = %s AND state = 'quarantined'",
                    (now, key_bytes(old.scope), key_bytes(old.operation_id)),
                )
            return new

        return await self._in_tx("redrive", body)

    async def purge_quarantine(
        self,
        entry_ids: Sequence[str] | None = None,
        *,
        reason: QuarantineReason | None = None,
        older_than: float | None = None,
        limit: int = 10_000,
    ) -> int:
        """Delete up to ``limit`` entries matching every given filter, oldest first, in
        statements of at most :data:`PURGE_BATCH` rows each committing on its own. An empty
        ``entry_ids`` matches nothing; operation records are not touched."""
        self._guard("purge_quarantine")
        if limit <= 0 or (entry_ids is not None and len(entry_ids) == 0):
            return 0
        where: list[str] = []
        params: list[Any] = []
        if entry_ids is not None:
            ids = list(dict.fromkeys(entry_ids))
            where.append(f"id IN ({', '.join(['%s'] * len(ids))})")
            params += ids
        if reason is not None:
            where.append("reason = %s")
            params.append(reason.value)
        if older_than is not None:
            where.append("created_at < %s")
            params.append(float(older_than))
        sql = (
            f"DELETE FROM {self.table('quarantine')} WHERE {' AND '.join(where) or 'TRUE'} "
            "ORDER BY created_at, id LIMIT %s"
        )
        deleted = 0
        while deleted < limit:
            n = min(PURGE_BATCH, limit - deleted)
            _, count = await self._run("purge_quarantine", sql, [*params, n])
            deleted += count
            if count < n:
                break
        return deleted

    async def _lock_entry(self, conn: Connection, entry_id: str) -> QuarantineEntry | None:
        rows, _ = await execute(
            conn,
            f"SELECT {ENTRY_SELECT} FROM {self.table('quarantine')} WHERE id = %s FOR UPDATE",
            (entry_id,),
        )
        return entry(rows[0]) if rows else None

    async def _write_entry(self, conn: Connection, e: QuarantineEntry, *, exists: bool) -> None:
        """Insert a new entry (a concurrent insert of the same id fails it: a race the
        transaction retries) or overwrite the one this transaction holds locked."""
        await execute(
            conn,
            upsert_sql(self.table("quarantine"), ENTRY_COLUMNS, 1, update=exists),
            entry_params(e),
        )


__all__ = ["PURGE_BATCH", "QuarantineMixin"]
