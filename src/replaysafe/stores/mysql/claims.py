"""The claim role of the MySQL ledger: claim, mark_started, extend, complete, release, get.

Every write is one short transaction of the same shape: lock the records concerned
(``SELECT … FOR UPDATE``, in primary-key order), read the server's clock, decide in Python with
the state machine every backend shares (:func:`~replaysafe.ledger.base.decide_claim`,
:func:`~replaysafe.ledger.base.check_fence`), write, commit. A batch (``claim_many``,
``complete_many``, ``mark_started``) is one such transaction with one locking read and one write
statement per kind of row, whatever its size.

**Fencing tokens** come from a one-row counter, ``UPDATE <prefix>tokens SET value =
LAST_INSERT_ID(value + n)``, taken inside the claim transaction *after* the operation rows are
locked and *last*, just before the write. Its row lock serialises token issue with commit order:
a token drawn later is larger, and a takeover draws after locking the row it replaces, so its
token exceeds the one it fences off. An ``AUTO_INCREMENT`` column would also issue increasing
values, but it needs an insert per token (a table that grows, or a delete per claim), and
MySQL < 8 and MariaDB < 10.2.4 could reissue values after a restart; the counter is one row,
durable with the claim itself. The price: claims of different operations queue on that row for
the few milliseconds between their write and their commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from replaysafe.errors import LeaseLost
from replaysafe.ledger.base import (
    Acquired,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    OpKey,
    Record,
    State,
    check_fence,
    decide_claim,
    storable_text,
)
from replaysafe.stores.mysql.core import MySQLCore, db_now

if TYPE_CHECKING:
    from asyncmy.connection import Connection


class ClaimsMixin(MySQLCore):
    """The claim role (:class:`~replaysafe.ledger.base.Ledger`) on MySQL / MariaDB."""

    async def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        """Try to take the operation for ``lease`` seconds, judged by the server's clock. One
        transaction. A claim whose connection died mid-call raises ``LedgerUnavailable`` and may
        or may not have committed: the next claim resolves it (``InFlight`` until the lease
        expires, then ``recovered=True``)."""
        self._guard("claim")
        return (await self._claim_all([ClaimRequest(key, fingerprint, owner, lease)]))[0]

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        """Claim a batch in one transaction (one locking read, one token draw, at most two
        writes). Same outcomes as :meth:`claim` for each request in order: a key repeated in the
        batch is answered from the first copy's outcome (``InFlight`` after an ``Acquired``)."""
        self._guard("claim_many")
        if not requests:
            return []
        return await self._claim_all(list(requests))

    async def _claim_all(self, requests: list[ClaimRequest]) -> list[ClaimOutcome]:
        async def body(conn: Connection) -> list[ClaimOutcome]:
            current = await self._lock_records(conn, (r.key for r in requests))
            existed = set(current)
            now = await db_now(conn)
            # decide first with token 0 to learn how many tokens the batch needs (the decision
            # never depends on the token's value), then again with the tokens drawn
            outcomes, written = decide_all(requests, dict(current), now, None)
            acquired = sum(isinstance(o, Acquired) for o in outcomes)
            if not acquired:
                return outcomes
            last = await self._draw_tokens(conn, acquired)
            outcomes, written = decide_all(requests, current, now, last - acquired + 1)
            await self._write_records(conn, written, existed)
            return outcomes

        return await self._in_tx("claim", body, retry_duplicates=True)

    async def _draw_tokens(self, conn: Connection, n: int) -> int:
        """Reserve ``n`` fencing tokens; returns the last one (see the module docstring)."""
        async with conn.cursor() as cur:
            await cur.execute(
                f"UPDATE {self.table('tokens')} SET value = LAST_INSERT_ID(value + %s) "
                "WHERE id = 1",
                (n,),
            )
            return int(cur.lastrowid)

    async def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        """Record, in one transaction for the batch, that each claim's effect is about to
        start; a stale claim yields its ``LeaseLost`` in place and changes nothing."""
        self._guard("mark_started")
        if not claims:
            return []

        async def body(conn: Connection) -> list[Claim | LeaseLost]:
            current = await self._lock_records(conn, (c.key for c in claims))
            out: list[Claim | LeaseLost] = []
            changed: list[Record] = []
            for claim in claims:
                try:
                    rec = check_fence(current.get(claim.key), claim)
                except LeaseLost as exc:
                    out.append(exc)
                    continue
                if rec.unstarted_attempt is not None:
                    current[claim.key] = rec = replace(rec, unstarted_attempt=None)
                    changed.append(rec)
                out.append(claim)
            await self._write_records(conn, changed, set(current))
            return out

        return await self._in_tx("mark_started", body)

    async def extend(self, claim: Claim, lease: float) -> Claim:
        """Push the lease to the server's ``now + lease``. ``LeaseLost`` when the token is
        stale."""
        self._guard("extend")

        async def body(conn: Connection) -> Claim:
            rec = check_fence((await self._lock_records(conn, [claim.key])).get(claim.key), claim)
            until = await db_now(conn) + lease
            await self._write_records(conn, [replace(rec, lease_until=until)], {rec.key})
            return replace(claim, lease_until=until)

        return await self._in_tx("extend", body)

    async def complete(self, claim: Claim, result: str | None = None) -> Record:
        """Record the effect as done. ``LeaseLost`` when the token is stale (then do not complete
        at the broker). If the connection dies while committing, the completion may or may not
        have committed (``LedgerUnavailable``); the next claim finds ``AlreadyDone`` if it did."""
        self._guard("complete")
        out = await self._complete_all([(claim, result)], "complete")
        if isinstance(out[0], LeaseLost):
            raise out[0]
        return out[0]

    async def complete_many(
        self, items: Sequence[tuple[Claim, str | None]]
    ) -> list[Record | LeaseLost]:
        """Complete a batch in one transaction. A stale claim yields its ``LeaseLost`` in place
        and does not stop the others; the same claim twice completes once (the copy is stale)."""
        self._guard("complete_many")
        if not items:
            return []
        return await self._complete_all(list(items), "complete_many")

    async def _complete_all(
        self, items: list[tuple[Claim, str | None]], action: str
    ) -> list[Record | LeaseLost]:
        async def body(conn: Connection) -> list[Record | LeaseLost]:
            current = await self._lock_records(conn, (c.key for c, _ in items))
            existed = set(current)
            now = await db_now(conn)
            out: list[Record | LeaseLost] = []
            done: list[Record] = []
            for claim, result in items:
                try:
                    rec = check_fence(current.get(claim.key), claim)
                except LeaseLost as exc:
                    out.append(exc)
                    continue
                rec = completed(rec, result, now)
                current[claim.key] = rec
                done.append(rec)
                out.append(rec)
            await self._write_records(conn, done, existed)
            return out

        return await self._in_tx(action, body)

    async def release(self, claim: Claim, error: str | None = None) -> None:
        """Give the operation back (no effect happened); the next claim gets it at once.
        ``LeaseLost`` when the token is stale."""
        self._guard("release")

        async def body(conn: Connection) -> None:
            rec = check_fence((await self._lock_records(conn, [claim.key])).get(claim.key), claim)
            now = await db_now(conn)
            rec = replace(
                rec, state=State.RELEASED, lease_until=None, last_error=storable_text(error),
                updated_at=now,
            )  # fmt: skip
            await self._write_records(conn, [rec], {rec.key})

        await self._in_tx("release", body)

    async def get(self, key: OpKey) -> Record | None:
        """The record of ``key`` (one plain read), or None."""
        return await self._get("get", key)

    async def _complete_on(self, conn: Connection, claim: Claim, result: str | None) -> None:
        """The fenced completion on ``conn`` inside the caller's transaction (``complete_in``):
        ``LeaseLost`` when the token is stale (the caller rolls back)."""
        rec = check_fence((await self._lock_records(conn, [claim.key])).get(claim.key), claim)
        await self._write_records(conn, [completed(rec, result, await db_now(conn))], {rec.key})


def decide_all(
    requests: Sequence[ClaimRequest],
    current: dict[OpKey, Record],
    now: float,
    first_token: int | None,
) -> tuple[list[ClaimOutcome], list[Record]]:
    """The shared state machine over a batch, in order, updating ``current`` as it goes: the
    outcomes and the records to write. Acquired claims get ``first_token``, ``first_token + 1``
    … (0 for all with ``first_token=None``: a dry run that counts the tokens needed)."""
    token = first_token or 0
    outcomes: list[ClaimOutcome] = []
    written: list[Record] = []
    for r in requests:
        outcome, rec = decide_claim(
            current.get(r.key), r.key, r.fingerprint, r.owner, r.lease, now, token, r.marks_start
        )
        if rec is not None:
            current[r.key] = rec
            written.append(rec)
            if first_token is not None:
                token += 1
        outcomes.append(outcome)
    return outcomes, written


def completed(rec: Record, result: str | None, now: float) -> Record:
    """``rec`` completed at ``now`` with ``result`` (stored verbatim, never escaped)."""
    return replace(
        rec, state=State.COMPLETED, result=result, lease_until=None, updated_at=now,
        completed_at=now,
    )  # fmt: skip


__all__ = ["ClaimsMixin", "completed", "decide_all"]
