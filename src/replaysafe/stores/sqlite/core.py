"""The SQLite ledger's state transitions, written once for the async ledger and its sync twin:
each reads, decides (``decide_claim`` / ``check_fence`` from :mod:`replaysafe.ledger.base`) and
writes inside the ``BEGIN IMMEDIATE`` its holder opened, on whichever thread the holder runs it."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from typing import Any

from replaysafe.errors import LeaseLost
from replaysafe.ledger.base import (
    Acquired,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    OpKey,
    QuarantineEntry,
    QuarantineRequest,
    Record,
    State,
    check_fence,
    decide_claim,
    entry_from_row,
    merge_quarantine,
    storable_text,
    unknown_entry,
)
from replaysafe.stores.sqlite.connection import SQLiteConnection
from replaysafe.stores.sqlite.rows import (
    completed,
    fence_each,
    load,
    load_many,
    record_params,
    save,
    save_entry,
)
from replaysafe.stores.sqlite.sql import COMPLETE_RECORD, MARK_STARTED, SAVE_RECORD, SELECT_ENTRY


class SQLiteCore(SQLiteConnection):
    """The state machine of a SQLite ledger over its connection, held by :class:`SQLiteLedger`
    (which runs it on its executor thread) and by :class:`SyncSQLiteLedger` (which runs it in the
    caller's thread): the options, connection, jobs and error mapping of
    :class:`~replaysafe.stores.sqlite.connection.SQLiteConnection`, plus the state transitions
    (the ``*_rows`` methods, which run inside a job or the caller's transaction). So the SQL, the
    state machine and the error mapping exist once.

    Not thread-safe: its holder runs one method at a time (``SQLiteLedger``: one executor thread
    under its ``asyncio.Lock``; ``SyncSQLiteLedger``: a ``threading.Lock``). Two holders never
    share a core: each has its own connection, and SQLite's ``BEGIN IMMEDIATE`` and
    ``busy_timeout`` serialise them as they serialise processes.
    """

    # ------------------------------------------------------------------ state transitions
    # All run inside BEGIN IMMEDIATE (a job, or the caller's transaction), on whichever thread
    # the holder runs the core on.

    def claim_rows(
        self, requests: list[ClaimRequest], conn: sqlite3.Connection
    ) -> list[ClaimOutcome]:
        """``decide_claim`` for each request in order, on the records read in one batched
        statement; a key repeated in the batch sees the record its earlier copy decided. The
        writes go out in one ``executemany``, in request order."""
        now = self.clock.now()
        (last_token,) = conn.execute("SELECT last_token FROM replaysafe_meta").fetchone()
        issued = last_token
        current = load_many(conn, [r.key for r in requests])
        outcomes: list[ClaimOutcome] = []
        writes: list[tuple[Any, ...]] = []
        for r in requests:
            k = (r.key.scope, r.key.operation_id)
            outcome, rec = decide_claim(
                current.get(k), r.key, r.fingerprint, r.owner, r.lease, now, issued + 1,
                r.marks_start,
            )  # fmt: skip
            if isinstance(outcome, Acquired):
                issued += 1
            if rec is not None:
                current[k] = rec
                writes.append(record_params(rec))
            outcomes.append(outcome)
        if writes:
            conn.executemany(SAVE_RECORD, writes)
        if issued != last_token:
            conn.execute("UPDATE replaysafe_meta SET last_token = ?", (issued,))
        return outcomes

    def extend_rows(self, claim: Claim, lease: float, conn: sqlite3.Connection) -> Claim:
        rec = check_fence(load(conn, claim.key), claim)
        now = self.clock.now()
        # updated_at stays the claim time (the summary's oldest in-flight age)
        save(conn, replace(rec, lease_until=now + lease))
        return replace(claim, lease_until=now + lease)

    def complete_rows(self, claim: Claim, result: str | None, conn: sqlite3.Connection) -> Record:
        """Fence and complete one claim (``complete_many_rows`` of one, without the batch
        bookkeeping: measured, a visible share of a batch-1 complete's CPU)."""
        rec = check_fence(load(conn, claim.key), claim)
        done, params = completed(rec, result, self.clock.now())
        conn.execute(COMPLETE_RECORD, params)
        return done

    def complete_many_rows(
        self, items: list[tuple[Claim, str | None]], conn: sqlite3.Connection
    ) -> list[Record | LeaseLost]:
        """Complete each current claim (:func:`fence_each`: a claim repeated in the batch finds
        its earlier copy's COMPLETED record, ``LeaseLost``)."""
        now = self.clock.now()
        return fence_each(
            conn,
            [claim for claim, _ in items],
            COMPLETE_RECORD,
            lambda i, rec: completed(rec, items[i][1], now),
        )

    def mark_started_rows(
        self, claims: list[Claim], conn: sqlite3.Connection
    ) -> list[Claim | LeaseLost]:
        def mark(_: int, rec: Record) -> tuple[Record, tuple[Any, ...]] | None:
            if rec.unstarted_attempt is None:
                return None  # already marked (or never claimed with marks_start)
            return replace(rec, unstarted_attempt=None), (rec.key.scope, rec.key.operation_id)

        fenced = fence_each(conn, claims, MARK_STARTED, mark)
        return [f if isinstance(f, LeaseLost) else c for c, f in zip(claims, fenced, strict=True)]

    def release_rows(self, claim: Claim, error: str | None, conn: sqlite3.Connection) -> None:
        rec = check_fence(load(conn, claim.key), claim)
        save(
            conn,
            replace(
                rec,
                state=State.RELEASED,
                lease_until=None,
                last_error=storable_text(error),
                updated_at=self.clock.now(),
            ),
        )

    def quarantine_rows(
        self, request: QuarantineRequest, claim: Claim | None, conn: sqlite3.Connection
    ) -> QuarantineEntry:
        request = request.storable()
        now = self.clock.now()
        if claim is not None:
            # fence first: a stale claim raises before anything is written
            rec = check_fence(load(conn, claim.key), claim)
            save(
                conn,
                replace(
                    rec,
                    state=State.QUARANTINED,
                    lease_until=None,
                    last_error=request.detail,
                    updated_at=now,
                ),
            )
        eid = request.entry_id()
        row = conn.execute(SELECT_ENTRY, (eid,)).fetchone()
        entry = merge_quarantine(None if row is None else entry_from_row(row), request, now)
        save_entry(conn, entry)
        return entry

    def redrive_rows(self, entry_id: str, conn: sqlite3.Connection) -> QuarantineEntry:
        row = conn.execute(SELECT_ENTRY, (entry_id,)).fetchone()
        if row is None:
            raise unknown_entry(entry_id)
        now = self.clock.now()
        entry = entry_from_row(row)
        if entry.operation_id is not None:
            rec = load(conn, OpKey(entry.scope, entry.operation_id))
            if rec is not None and rec.state is State.QUARANTINED:
                # attempts reset: the redriven copy gets a full retry budget, not the one spent
                save(conn, replace(rec, state=State.RELEASED, attempts=0, updated_at=now,
                                         unstarted_attempt=None))  # fmt: skip
        entry = replace(entry, redriven_at=now, redrives=entry.redrives + 1, updated_at=now)
        save_entry(conn, entry)
        return entry
