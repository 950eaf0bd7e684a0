"""The quarantine role of the PostgreSQL ledger (:class:`~replaysafe.ledger.base.QuarantineStore`):
entries written with (or without) the fenced move of their operation, read, redriven, purged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from replaysafe.ledger.base import (
    Claim,
    QuarantineEntry,
    QuarantineRequest,
    entry_from_row,
    unknown_entry,
)
from replaysafe.quarantine import QuarantineReason
from replaysafe.stores.postgres.codec import fence_params, pack_entry
from replaysafe.stores.postgres.core import PostgresCore
from replaysafe.stores.postgres.sql import PURGE_BATCH, purge_quarantine_name


class PostgresQuarantine(PostgresCore):
    """Quarantine entries in ``<prefix>quarantine``."""

    async def quarantine(
        self, request: QuarantineRequest, claim: Claim | None = None
    ) -> QuarantineEntry:
        """Upsert the entry (``seen`` + 1 on a repeat) and, with ``claim``, move the operation to
        QUARANTINED under fencing, in one transaction: committed (durable) before this returns,
        so the caller may then complete at the broker."""
        self._guard("quarantine")
        entry_params = pack_entry(request.storable())
        if claim is None:
            rows = await self._fetch("quarantine", self._sql("upsert_entry"), entry_params)
            return entry_from_row(rows[0])
        rows = await self._fetch(
            "quarantine",
            self._sql("quarantine_claimed"),
            {**entry_params, **fence_params(claim)},
        )
        if not rows:  # the fence refused: neither the record nor the entry was written
            raise await self._lease_lost(claim)
        return entry_from_row(rows[0])

    async def quarantined(
        self, *, reason: QuarantineReason | None = None, limit: int = 100
    ) -> list[QuarantineEntry]:
        if limit <= 0:
            return []
        if reason is None:
            rows = await self._fetch("quarantined", self._sql("list_all"), {"limit": limit})
        else:
            rows = await self._fetch(
                "quarantined", self._sql("list_reason"), {"limit": limit, "reason": reason.value}
            )
        return [entry_from_row(r) for r in rows]

    async def quarantine_entry(self, entry_id: str) -> QuarantineEntry | None:
        """One quarantine entry by id (primary key), or None. Reads only."""
        rows = await self._fetch("quarantine_entry", self._sql("get_entry"), {"id": entry_id})
        return entry_from_row(rows[0]) if rows else None

    async def redrive(self, entry_id: str) -> QuarantineEntry:
        """Record a redrive of the entry (``redriven_at`` = database now, ``redrives`` + 1) and,
        if its operation is QUARANTINED, release it with ``attempts`` reset to 0, in one statement
        (one transaction: both or neither).

        A COMPLETED, in-flight or released operation is left as it is: the republished copy of a
        completed one is answered ``AlreadyDone``, never re-run. Publishes nothing: republishing
        is the caller's job, after this returned. Raises ``LedgerError`` for an unknown entry
        (nothing written). If the connection dies mid-statement (``LedgerUnavailable``) the redrive
        may or may not have committed; ``quarantine_entry`` tells (``redrives``)."""
        self._guard("redrive")
        rows = await self._fetch("redrive", self._sql("redrive"), {"id": entry_id})
        if not rows:
            raise unknown_entry(entry_id)
        return entry_from_row(rows[0])

    async def purge_quarantine(
        self,
        entry_ids: Sequence[str] | None = None,
        *,
        reason: QuarantineReason | None = None,
        older_than: float | None = None,
        limit: int = 10_000,
    ) -> int:
        """Delete up to ``limit`` quarantine entries matching every given filter (``entry_ids``,
        ``reason``, ``created_at`` before ``older_than`` in POSIX seconds), oldest first.

        Deletes in statements of at most ``PURGE_BATCH`` rows, each walking an index
        (``(created_at, id)``, ``(reason, created_at, id)`` or the primary key) and committing on
        its own: interrupted midway, the batches already deleted stay deleted. An empty
        ``entry_ids`` matches nothing. Operation records are not touched: a QUARANTINED operation
        stays quarantined (redrive it first to make it claimable)."""
        self._guard("purge_quarantine")
        if limit <= 0 or (entry_ids is not None and len(entry_ids) == 0):
            return 0
        params: dict[str, Any] = {}
        if entry_ids is not None:
            params["ids"] = list(entry_ids)
        if reason is not None:
            params["reason"] = reason.value
        if older_than is not None:
            params["before"] = float(older_than)
        query = self._sql(purge_quarantine_name(params))
        deleted = 0
        while deleted < limit:
            n = min(PURGE_BATCH, limit - deleted)
            count = await self._rowcount("purge_quarantine", query, {**params, "n": n})
            deleted += count
            if count < n:
                break
        return deleted
