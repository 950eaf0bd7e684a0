"""The :class:`~replaysafe.ledger.base.Ledger` role of the SQLite ledger: claim, extend,
complete, release and read operation records, each call one ``BEGIN IMMEDIATE`` job on the
connection thread (see :mod:`replaysafe.stores.sqlite` for what a call can lose or see twice)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from replaysafe.errors import LeaseLost
from replaysafe.ledger.base import Claim, ClaimOutcome, ClaimRequest, Ledger, OpKey, Record
from replaysafe.stores.sqlite.base import SQLiteLedgerBase
from replaysafe.stores.sqlite.rows import load
from replaysafe.stores.sqlite.sync import SyncSQLiteLedger


class SQLiteClaims(SQLiteLedgerBase, Ledger):
    """The claim path: every call is one job on the connection thread, a write inside
    ``BEGIN IMMEDIATE`` (fsynced when it returns, with the default ``synchronous="FULL"``)."""

    async def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        """Try to take the operation for ``lease`` seconds (judged by the injected clock).

        Loses nothing and duplicates nothing by itself; if the caller never learns the outcome
        (cancelled, ``LedgerUnavailable`` after the commit), the claim simply expires and the next
        claim takes over with ``recovered=True``.
        """
        req = ClaimRequest(key, fingerprint, owner, lease)
        return (await self._write(partial(self._core.claim_rows, [req])))[0]

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        """Claim a batch in one transaction (one fsync). Same outcomes as calling :meth:`claim` for
        each request in order, including repeated keys within the batch."""
        if not requests:
            return []
        return await self._write(partial(self._core.claim_rows, list(requests)))

    async def extend(self, claim: Claim, lease: float) -> Claim:
        return await self._write(partial(self._core.extend_rows, claim, lease))

    async def complete(self, claim: Claim, result: str | None = None) -> Record:
        return await self._write(partial(self._core.complete_rows, claim, result))

    async def complete_many(
        self, items: Sequence[tuple[Claim, str | None]]
    ) -> list[Record | LeaseLost]:
        """Complete a batch in one transaction (one fsync). A stale claim yields its ``LeaseLost``
        in place and does not stop the others."""
        if not items:
            return []
        return await self._write(partial(self._core.complete_many_rows, list(items)))

    async def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        """Mark a batch started in one transaction (one fsync): fenced per claim, a stale one
        yields its ``LeaseLost`` in place and writes nothing."""
        if not claims:
            return []
        return await self._write(partial(self._core.mark_started_rows, list(claims)))

    async def release(self, claim: Claim, error: str | None = None) -> None:
        await self._write(partial(self._core.release_rows, claim, error))

    async def get(self, key: OpKey) -> Record | None:
        return await self._read(partial(load, key=key))

    def sync(self) -> SyncSQLiteLedger:
        """The sync twin: a :class:`SyncSQLiteLedger` on the same file with the same options
        (clock, ``synchronous``, ``busy_timeout``) and its own connection, for plain threads.
        Each call returns a new one; close it (closing this ledger does not)."""
        core = self._core
        return SyncSQLiteLedger(
            core.path, clock=core.clock, synchronous=core.synchronous,
            busy_timeout=core.busy_timeout,
        )  # fmt: skip
