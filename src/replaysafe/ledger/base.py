"""The replay ledger: protocol, state machine and value types shared by every backend.

State machine of one operation record (keyed by ``OpKey(scope, operation_id)``)::

            claim (new)                 complete (current token)
    (none) ───────────► IN_FLIGHT ─────────────────────────────► COMPLETED ──purge──► (none)
                         │   ▲  │ release (current token)
                         │   │  └──────────────► RELEASED ──claim──► IN_FLIGHT (attempt+1)
                         │   └─ claim after lease expiry (attempt+1, recovered=True)
                         └─ quarantine (current token) ──► QUARANTINED

Rules every backend keeps (``replaysafe.testing.contracts.LedgerContract`` checks them):

- Every successful claim gets a fencing token strictly greater than every token the ledger issued
  before. ``extend``, ``complete``, ``release`` and ``quarantine(claim=…)`` with a token that is no
  longer the record's current one raise ``LeaseLost`` and change nothing.
- A lease is judged by the ledger's clock (SQLite/memory: the injected ``Clock``; PostgreSQL:
  ``now()``; Redis: ``TIME``). A live lease makes ``claim`` answer ``InFlight``; an expired lease
  lets the next claim take over with a new token and ``recovered=True`` (the previous attempt's
  outcome is unknown). A holder whose lease expired but was not taken over may still extend or
  complete: its token is still current, which is what fencing is for.
- ``attempts`` is incremented by every successful claim, *before* the handler runs, so an operation
  that kills its worker every time still reaches its retry limit.
- A claim made with ``ClaimRequest.marks_start`` (unkeyed effects, whose holder calls
  ``mark_started`` right before the effect) records its attempt as *not started*
  (``Record.unstarted_attempt``) until ``mark_started`` clears it, under fencing. A claim that takes
  over an expired lease reports ``previous_started=False`` only when the previous holder's claim
  was made that way and never marked: its effect cannot have started. Any other takeover reports
  ``True`` (conservative: a record written before this existed, or by a holder that does not
  mark, may have started its effect), and the fact sticks: the new attempt is recorded as "may
  have started" even when it marks, so a later takeover never forgets an earlier attempt whose
  effect may have happened.
- The same operation with a different fingerprint is a ``Conflict`` on every path (first claim
  excepted: there is nothing to conflict with), and never changes the record.
- Quarantine entries are durable and idempotent per message (same reason, operation and payload
  give one entry, with ``seen`` counting repeats).

Handler control flags live in the ledger too, because it is the one durable store every worker of
an app shares: ``set_paused(handler, True)`` pauses a handler for every worker (each one stops
fetching that handler's source at its next control check and lets in-flight work settle), and
``set_paused(handler, False)`` resumes it. Flags are keyed by handler name (the ledger scope) and
survive restarts of workers and of the ledger's server as its records do.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

from replaysafe.errors import CapabilityError, LeaseLost

# the value types, the pure rules and the text rules live in private modules; their names are
# re-exported here (the same objects), which stays the path to import them from
from replaysafe.ledger._rules import check_fence as check_fence
from replaysafe.ledger._rules import decide_claim as decide_claim
from replaysafe.ledger._rules import entry_from_row as entry_from_row
from replaysafe.ledger._rules import lease_expired as lease_expired
from replaysafe.ledger._rules import merge_quarantine as merge_quarantine
from replaysafe.ledger._rules import previous_started as previous_started
from replaysafe.ledger._rules import unknown_entry as unknown_entry
from replaysafe.ledger._text import MAX_HANDLER_NAME as MAX_HANDLER_NAME
from replaysafe.ledger._text import MAX_PAUSE_TEXT as MAX_PAUSE_TEXT
from replaysafe.ledger._text import check_handler_name as check_handler_name
from replaysafe.ledger._text import pause_text as pause_text
from replaysafe.ledger._text import storable_text as storable_text
from replaysafe.ledger._types import MAX_QUARANTINE_COPY as MAX_QUARANTINE_COPY
from replaysafe.ledger._types import Acquired as Acquired
from replaysafe.ledger._types import AlreadyDone as AlreadyDone
from replaysafe.ledger._types import Claim as Claim
from replaysafe.ledger._types import ClaimOutcome as ClaimOutcome
from replaysafe.ledger._types import ClaimRequest as ClaimRequest
from replaysafe.ledger._types import Conflict as Conflict
from replaysafe.ledger._types import InFlight as InFlight
from replaysafe.ledger._types import LedgerSummary as LedgerSummary
from replaysafe.ledger._types import OpKey as OpKey
from replaysafe.ledger._types import PauseState as PauseState
from replaysafe.ledger._types import Quarantined as Quarantined
from replaysafe.ledger._types import QuarantineEntry as QuarantineEntry
from replaysafe.ledger._types import QuarantineRequest as QuarantineRequest
from replaysafe.ledger._types import Record as Record
from replaysafe.ledger._types import State as State
from replaysafe.ledger.durability import Durability as Durability
from replaysafe.ledger.durability import DurabilityLevel as DurabilityLevel
from replaysafe.quarantine import QuarantineReason

#: the ledger scope of :meth:`Ledger.probe`'s own operations (never a handler's: a handler name
#: has no spaces in practice, and the runtime never claims in this scope)
PROBE_SCOPE = "replaysafe probe"
PROBE_FINGERPRINT = hashlib.sha256(b"replaysafe probe").hexdigest()


class Transaction(ABC):
    """A database transaction handed to a transactional handler as ``ctx.tx``.

    The handler's business rows, the ledger row (``complete_in``) and any outbox rows commit or roll
    back together.
    """

    @abstractmethod
    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        """Run one statement inside the transaction; returns the driver's cursor/result."""

    @abstractmethod
    async def fetchall(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[tuple[Any, ...]]:
        """Run a query inside the transaction and return all rows."""


class Ledger(ABC):
    """The claim role: durable memory of operations, claimed with lease and fencing, then
    completed or released (the state machine in this module's docstring).

    Backends implement the single-item methods; the batch forms default to loops and backends
    override them to use one round trip per batch. The other roles of a store are
    :class:`QuarantineStore`, :class:`HandlerControls` and :class:`LedgerAdmin`;
    :class:`LedgerBackend` is one store playing all four, which is what the runtime takes.
    """

    #: True when the backend implements :class:`TransactionalLedger`
    transactional: ClassVar[bool] = False

    @abstractmethod
    async def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        """Try to take the operation for ``lease`` seconds (ledger clock). Increments ``attempts``
        on success. Moves no boundary; it decides whether the handler may run."""

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        """``claim`` for each request in order. The built-in backends override it with one round
        trip per batch and record ``marks_start``; this default ignores ``marks_start`` (its
        claims then report ``previous_started=True`` when recovered, which is safe)."""
        return [await self.claim(r.key, r.fingerprint, r.owner, r.lease) for r in requests]

    async def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        """Record durably, for each claim, that its effect is about to start (unkeyed effects,
        right before the handler runs): a claim that later takes the operation over learns
        ``previous_started=True``. Fenced: a claim whose token is no longer current yields its
        ``LeaseLost`` in place (and the caller must not start that effect); the others are
        returned as given. Moves no boundary. Built-in backends write the whole batch in one
        round trip.

        This default only checks each fence (a backend that does not record ``marks_start`` has
        nothing to clear). A backend that records ``marks_start`` MUST override it, or a recovered
        claim would read an effect that started as one that never did."""
        out: list[Claim | LeaseLost] = []
        for claim in claims:
            try:
                check_fence(await self.get(claim.key), claim)
            except LeaseLost as exc:
                out.append(exc)
                continue
            out.append(claim)
        return out

    @abstractmethod
    async def extend(self, claim: Claim, lease: float) -> Claim:
        """Push the lease to ``now + lease``. Raises ``LeaseLost`` when the token is stale."""

    @abstractmethod
    async def complete(self, claim: Claim, result: str | None = None) -> Record:
        """Record the effect as done (boundary EFFECTED for keyed/unkeyed effects). Raises
        ``LeaseLost`` when the token is stale: then the caller must not complete at the broker."""

    async def complete_many(
        self, items: Sequence[tuple[Claim, str | None]]
    ) -> list[Record | LeaseLost]:
        out: list[Record | LeaseLost] = []
        for claim, result in items:
            try:
                out.append(await self.complete(claim, result))
            except LeaseLost as exc:
                out.append(exc)
        return out

    @abstractmethod
    async def release(self, claim: Claim, error: str | None = None) -> None:
        """Give the operation back (the handler failed cleanly, no effect). The next claim gets it
        at once. Raises ``LeaseLost`` when the token is stale."""

    @abstractmethod
    async def get(self, key: OpKey) -> Record | None: ...

    @abstractmethod
    def now(self) -> float:
        """The ledger's clock (what leases are judged by)."""

    def sync(self) -> SyncLedger:
        """A :class:`SyncLedger` on the same store with the same options, for plain threads (a
        sync :class:`~replaysafe.Guard`): its own connections, called in the caller's thread
        with the sync driver. Each call returns a new one; close it. Raises
        ``CapabilityError`` where the backend has none."""
        raise CapabilityError(
            f"{type(self).__name__} has no sync twin: use the async API (Guard.run), or a ledger "
            "that has one (SQLiteLedger, PostgresLedger, RedisLedger, MemoryLedger)"
        )

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class QuarantineStore(ABC):
    """The quarantine role: durable entries for messages that must not run again on their own
    (poison, ambiguous outcomes, spent budgets), read and redriven by an operator."""

    @abstractmethod
    async def quarantine(
        self, request: QuarantineRequest, claim: Claim | None = None
    ) -> QuarantineEntry:
        """Durably record a quarantine entry (idempotent per message). With ``claim``, the operation
        record also moves to QUARANTINED under fencing (``LeaseLost`` if stale), so later deliveries
        are answered ``Quarantined``. Must be durable before the caller completes at the broker."""

    @abstractmethod
    async def quarantined(
        self, *, reason: QuarantineReason | None = None, limit: int = 100
    ) -> list[QuarantineEntry]:
        """Quarantine entries, oldest first."""

    @abstractmethod
    async def quarantine_entry(self, entry_id: str) -> QuarantineEntry | None:
        """One quarantine entry by id."""

    @abstractmethod
    async def redrive(self, entry_id: str) -> QuarantineEntry:
        """Prepare an entry for redrive and record that it happened (``redriven_at``,
        ``redrives + 1``). If its operation is QUARANTINED it becomes RELEASED with its attempts
        reset, so the republished copy is claimed afresh; a COMPLETED operation stays completed
        (the copy is answered as a duplicate, never re-run). Publishing the copy is the
        caller's job. Raises ``LedgerError`` for an unknown entry."""

    @abstractmethod
    async def purge_quarantine(
        self,
        entry_ids: Sequence[str] | None = None,
        *,
        reason: QuarantineReason | None = None,
        older_than: float | None = None,
        limit: int = 10_000,
    ) -> int:
        """Delete quarantine entries matching all given filters (ids, reason, created before
        ``older_than``); at most ``limit``. Operation records are left as they are."""


class HandlerControls(ABC):
    """The pause role: per-handler flags every worker sharing the store obeys (see this module's
    docstring)."""

    @abstractmethod
    async def set_paused(
        self, handler: str, paused: bool, *, reason: str = "", by: str = ""
    ) -> None:
        """Durably pause (``paused=True``) or resume (``paused=False``) ``handler`` for every
        worker sharing this ledger. Pausing a paused handler replaces its ``reason``, ``by`` and
        ``since``; resuming a handler that is not paused does nothing. Durable when it returns.
        Moves no boundary and touches no operation record. ``handler`` must pass
        :func:`check_handler_name`; ``reason`` and ``by`` are truncated to
        :data:`MAX_PAUSE_TEXT` UTF-8 bytes (see :func:`pause_text`)."""

    @abstractmethod
    async def paused(self) -> dict[str, PauseState]:
        """Every paused handler, by name (empty when none is). One cheap read: workers call it
        about once a second. Raises ``LedgerUnavailable`` like every other read."""


class LedgerAdmin(ABC):
    """The admin role: what ``inspect``, the horizon purge and ``explain`` read or do."""

    @abstractmethod
    async def summary(self, *, top: int = 10) -> LedgerSummary:
        """Counts for ``replaysafe inspect``: records by state, expired leases, the oldest in
        flight, the ``top`` most-attempted operations, quarantine by reason, recent rate."""

    @abstractmethod
    async def purge(self, older_than: float, *, limit: int = 10_000) -> int:
        """Delete up to ``limit`` COMPLETED records completed before ``older_than`` (POSIX seconds).
        Returns how many were deleted. Only completed records are forgotten: in-flight, released
        and quarantined ones stay."""

    async def durability(self) -> Durability:
        """Whether this ledger's storage can back a claim, read from the live store where the
        backend can (``explain``: RS110 not durable, RS118 loses recent, RS111 unknown)."""
        return Durability(
            type(self).__name__, None, "unknown", "this backend has no durability() of its own"
        )

    async def migrate(self) -> object:
        """Create or update the store's schema and say what was done. The default has nothing to
        do (a store that creates its schema on first use) and returns None."""
        return None


class LedgerBackend(Ledger, QuarantineStore, HandlerControls, LedgerAdmin):
    """One store playing every ledger role: what :class:`~replaysafe.App`, the
    :class:`~replaysafe.Guard`, the worker and the CLI take, and what every built-in backend is.
    Code that needs one role only takes that role's type."""

    async def probe(self, owner: str) -> None:
        """Prove, before a worker consumes anything, that this ledger is reachable, its schema
        is the one this replaysafe expects and the worker may read and write what it needs:
        reads the control flags and the quarantine, then claims and completes one operation of
        its own (scope :data:`PROBE_SCOPE`, id ``startup:<owner>``: a COMPLETED record, purged
        with the horizon like any other). Raises what the failing call raises
        (``LedgerUnavailable`` when unreachable, ``ConfigurationError`` for an unmigrated
        schema, …). Moves no boundary of any real operation."""
        await self.paused()
        await self.quarantined(limit=1)
        key = OpKey(PROBE_SCOPE, f"startup:{owner}")
        outcome = await self.claim(key, PROBE_FINGERPRINT, owner, 30.0)
        if isinstance(outcome, Acquired):
            await self.complete(outcome.claim)


@runtime_checkable
class SyncLedger(Protocol):
    """The ledger calls a sync pipeline makes (``Ledger.sync()``), with the async methods'
    names, contracts and errors, called in the caller's thread. Safe to call from several
    threads at once (the keeper extends leases from its own thread)."""

    def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome: ...
    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]: ...
    def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]: ...
    def extend(self, claim: Claim, lease: float) -> Claim: ...
    def complete(self, claim: Claim, result: str | None = None) -> Record: ...
    def complete_many(
        self, items: Sequence[tuple[Claim, str | None]]
    ) -> list[Record | LeaseLost]: ...
    def release(self, claim: Claim, error: str | None = None) -> None: ...
    def quarantine(
        self, request: QuarantineRequest, claim: Claim | None = None
    ) -> QuarantineEntry: ...
    def get(self, key: OpKey) -> Record | None: ...
    def now(self) -> float: ...
    def close(self) -> None: ...


class TransactionalLedger(LedgerBackend):
    """A ledger backend living in the same database as the business data."""

    transactional: ClassVar[bool] = True

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """Open a transaction: commits on normal exit, rolls back on an exception."""

    @abstractmethod
    async def complete_in(self, tx: Transaction, claim: Claim, result: str | None = None) -> None:
        """Mark the claim complete inside ``tx``: the ledger row commits with the business rows.
        Raises ``LeaseLost`` (and the caller must roll back) when the token is stale."""
