"""In-memory ledger: the reference implementation of the state machine, for tests and the demo.

It is durable only for the life of the process: it proves the pipeline's logic, not durability.
Shared by every worker of one process (in-process "crashes" keep it, as a real database would).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from replaysafe._coro import at_once
from replaysafe._redact import redact
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.errors import ConfigurationError, LeaseLost
from replaysafe.ledger.base import (
    Acquired,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    Durability,
    LedgerBackend,
    LedgerSummary,
    OpKey,
    PauseState,
    QuarantineEntry,
    QuarantineRequest,
    Record,
    State,
    check_fence,
    check_handler_name,
    decide_claim,
    merge_quarantine,
    pause_text,
    storable_text,
    unknown_entry,
)
from replaysafe.quarantine import QuarantineReason

T = TypeVar("T")


class MemoryLedger(LedgerBackend):
    """A ledger in this process's memory: for tests and the demo. Nothing survives the process
    (``durability()`` says so)."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._records: dict[OpKey, Record] = {}
        self._quarantine: dict[str, QuarantineEntry] = {}
        self._paused: dict[str, PauseState] = {}
        self._last_token = 0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryLedger:
        """The ledger the URL ``memory`` names (``open_ledger``); it takes no query, so its one
        setting (``clock``) is a keyword."""
        if url != "memory":
            raise ConfigurationError(
                f"{redact(url)!r} is not the memory ledger's URL; it is exactly 'memory' (no "
                "host, path or query): pass its clock as a keyword"
            )
        return cls(**options)

    def now(self) -> float:
        return self._clock.now()

    def sync(self) -> SyncMemoryLedger:
        """The sync twin: the same records, for plain threads (see :class:`SyncMemoryLedger`)."""
        return SyncMemoryLedger(self)

    # No awaits between read and write below: on one event loop each method is atomic.

    async def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        return self._claim(ClaimRequest(key, fingerprint, owner, lease))

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        return [self._claim(r) for r in requests]

    def _claim(self, r: ClaimRequest) -> ClaimOutcome:
        outcome, rec = decide_claim(
            self._records.get(r.key),
            r.key,
            r.fingerprint,
            r.owner,
            r.lease,
            self.now(),
            self._last_token + 1,
            r.marks_start,
        )
        if isinstance(outcome, Acquired):
            self._last_token += 1
        if rec is not None:
            self._records[r.key] = rec
        return outcome

    async def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        out: list[Claim | LeaseLost] = []
        for claim in claims:
            try:
                rec = check_fence(self._records.get(claim.key), claim)
            except LeaseLost as exc:
                out.append(exc)
                continue
            if rec.unstarted_attempt is not None:
                self._records[claim.key] = replace(rec, unstarted_attempt=None)
            out.append(claim)
        return out

    async def extend(self, claim: Claim, lease: float) -> Claim:
        rec = check_fence(self._records.get(claim.key), claim)
        until = self.now() + lease
        # updated_at stays the claim time (the summary's oldest in-flight age)
        self._records[claim.key] = replace(rec, lease_until=until)
        return replace(claim, lease_until=until)

    async def complete(self, claim: Claim, result: str | None = None) -> Record:
        rec = check_fence(self._records.get(claim.key), claim)
        now = self.now()
        done = replace(
            rec,
            state=State.COMPLETED,
            result=result,
            lease_until=None,
            updated_at=now,
            completed_at=now,
        )
        self._records[claim.key] = done
        return done

    async def release(self, claim: Claim, error: str | None = None) -> None:
        rec = check_fence(self._records.get(claim.key), claim)
        self._records[claim.key] = replace(
            rec,
            state=State.RELEASED,
            lease_until=None,
            last_error=storable_text(error),
            updated_at=self.now(),
        )

    async def quarantine(
        self, request: QuarantineRequest, claim: Claim | None = None
    ) -> QuarantineEntry:
        request = request.storable()  # what every backend stores: the same text here
        now = self.now()
        if claim is not None:
            rec = check_fence(self._records.get(claim.key), claim)
            self._records[claim.key] = replace(
                rec,
                state=State.QUARANTINED,
                lease_until=None,
                last_error=request.detail,
                updated_at=now,
            )
        eid = request.entry_id()
        entry = merge_quarantine(self._quarantine.get(eid), request, now)
        self._quarantine[eid] = entry
        return entry

    async def get(self, key: OpKey) -> Record | None:
        return self._records.get(key)

    async def quarantined(
        self, *, reason: QuarantineReason | None = None, limit: int = 100
    ) -> list[QuarantineEntry]:
        entries = sorted(self._quarantine.values(), key=lambda e: (e.created_at, e.id))
        return [e for e in entries if reason is None or e.reason == reason][:limit]

    async def quarantine_entry(self, entry_id: str) -> QuarantineEntry | None:
        return self._quarantine.get(entry_id)

    async def redrive(self, entry_id: str) -> QuarantineEntry:
        entry = self._quarantine.get(entry_id)
        if entry is None:
            raise unknown_entry(entry_id)
        now = self.now()
        if entry.operation_id is not None:
            key = OpKey(entry.scope, entry.operation_id)
            rec = self._records.get(key)
            if rec is not None and rec.state is State.QUARANTINED:
                self._records[key] = replace(rec, state=State.RELEASED, attempts=0,
                                             updated_at=now, unstarted_attempt=None)  # fmt: skip
        entry = replace(entry, redriven_at=now, redrives=entry.redrives + 1, updated_at=now)
        self._quarantine[entry_id] = entry
        return entry

    async def purge_quarantine(
        self,
        entry_ids: Sequence[str] | None = None,
        *,
        reason: QuarantineReason | None = None,
        older_than: float | None = None,
        limit: int = 10_000,
    ) -> int:
        doomed = [
            e.id for e in sorted(self._quarantine.values(), key=lambda e: (e.created_at, e.id))
            if (entry_ids is None or e.id in entry_ids)
            and (reason is None or e.reason == reason)
            and (older_than is None or e.created_at < older_than)
        ][:limit]  # fmt: skip
        for eid in doomed:
            del self._quarantine[eid]
        return len(doomed)

    async def summary(self, *, top: int = 10) -> LedgerSummary:
        now = self.now()
        recs = list(self._records.values())
        in_flight = [r for r in recs if r.state is State.IN_FLIGHT]
        hot = sorted((r for r in recs if r.attempts > 1), key=lambda r: (-r.attempts, r.key))
        return LedgerSummary(
            now=now,
            by_state=dict(Counter(r.state.value for r in recs)),
            expired_leases=sum(1 for r in in_flight if (r.lease_until or 0.0) <= now),
            oldest_in_flight_at=min((r.updated_at for r in in_flight), default=None),
            hot_operations=[(r.key, r.attempts) for r in hot[:top]],
            quarantined_by_reason=dict(Counter(e.reason.value for e in self._quarantine.values())),
            completed_last_hour=sum(
                1 for r in recs if r.completed_at is not None and r.completed_at >= now - 3600
            ),
        )

    async def purge(self, older_than: float, *, limit: int = 10_000) -> int:
        doomed = [
            k
            for k, r in self._records.items()
            if r.state is State.COMPLETED and (r.completed_at or 0.0) < older_than
        ][:limit]
        for k in doomed:
            del self._records[k]
        return len(doomed)

    async def set_paused(
        self, handler: str, paused: bool, *, reason: str = "", by: str = ""
    ) -> None:
        check_handler_name(handler)
        if paused:
            self._paused[handler] = PauseState(
                handler, pause_text(reason), pause_text(by), self.now()
            )
        else:
            self._paused.pop(handler, None)

    async def paused(self) -> dict[str, PauseState]:
        return dict(self._paused)

    async def durability(self) -> Durability:
        return Durability(
            "memory", False, "process memory",
            "a process restart forgets every claim and completion: every redelivery after it "
            "runs again",
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"MemoryLedger(records={len(self._records)})"


class SyncMemoryLedger:
    """The sync twin of a :class:`MemoryLedger` (``MemoryLedger.sync()``): the same records,
    each call run to its end in the caller's thread under one lock. Its own calls are serialised;
    the async API used at the same time from another thread is not (tests and demos only)."""

    def __init__(self, ledger: MemoryLedger) -> None:
        self._ledger = ledger
        self._lock = threading.Lock()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            return at_once(coro)

    def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        return self._run(self._ledger.claim(key, fingerprint, owner, lease))

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        return self._run(self._ledger.claim_many(requests))

    def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        return self._run(self._ledger.mark_started(claims))

    def extend(self, claim: Claim, lease: float) -> Claim:
        return self._run(self._ledger.extend(claim, lease))

    def complete(self, claim: Claim, result: str | None = None) -> Record:
        return self._run(self._ledger.complete(claim, result))

    def complete_many(self, items: Sequence[tuple[Claim, str | None]]) -> list[Record | LeaseLost]:
        return self._run(self._ledger.complete_many(items))

    def release(self, claim: Claim, error: str | None = None) -> None:
        self._run(self._ledger.release(claim, error))

    def quarantine(self, request: QuarantineRequest, claim: Claim | None = None) -> QuarantineEntry:
        return self._run(self._ledger.quarantine(request, claim))

    def get(self, key: OpKey) -> Record | None:
        return self._run(self._ledger.get(key))

    def now(self) -> float:
        return self._ledger.now()

    def close(self) -> None:
        """Nothing to release (the records belong to the MemoryLedger)."""
