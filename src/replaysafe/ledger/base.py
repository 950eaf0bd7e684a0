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
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, ClassVar, Final, Protocol, Self, overload, runtime_checkable

from replaysafe.errors import CapabilityError, ConfigurationError, LeaseLost, LedgerError
from replaysafe.ledger.durability import Durability as Durability
from replaysafe.ledger.durability import DurabilityLevel as DurabilityLevel
from replaysafe.quarantine import EffectRisk, QuarantineReason

#: quarantined message copies are capped so one huge poison message cannot bloat the ledger
MAX_QUARANTINE_COPY = 64 * 1024
#: longest handler name, pause reason and pause author the ledger stores (UTF-8 bytes)
MAX_HANDLER_NAME = 255
MAX_PAUSE_TEXT = 1000


#: the ledger scope of :meth:`Ledger.probe`'s own operations (never a handler's: a handler name
#: has no spaces in practice, and the runtime never claims in this scope)
PROBE_SCOPE = "replaysafe probe"
PROBE_FINGERPRINT = hashlib.sha256(b"replaysafe probe").hexdigest()


class State(StrEnum):
    IN_FLIGHT = "in_flight"
    RELEASED = "released"
    COMPLETED = "completed"
    QUARANTINED = "quarantined"


@dataclass(frozen=True, slots=True, order=True)
class OpKey:
    """Ledger key: the operation scoped by handler (or tenant). A composite, never a concatenated
    string, so ``("a:b", "c")`` and ``("a", "b:c")`` can never collide."""

    scope: str
    operation_id: str


@dataclass(frozen=True, slots=True)
class Record:
    """What the ledger knows about one operation."""

    key: OpKey
    fingerprint: str
    state: State
    token: int
    owner: str | None
    lease_until: float | None
    attempts: int
    result: str | None
    last_error: str | None
    created_at: float
    #: the last change of state or holder (claim, completion, release, quarantine, redrive); an
    #: ``extend`` moves only ``lease_until``, so for an in-flight record this is its claim time
    updated_at: float
    completed_at: float | None = None
    #: the attempt number of a claim made with ``marks_start`` whose ``mark_started`` has not
    #: been recorded (while it equals ``attempts`` on an in-flight record, its holder has not
    #: started the effect); None when no such claim is pending. Only read on an in-flight
    #: record: a record whose attempt ended may keep its last value (Redis drops it at completion)
    unstarted_attempt: int | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """Proof of a current claim. ``token`` is the fencing token every later call presents."""

    key: OpKey
    fingerprint: str
    token: int
    owner: str
    lease_until: float
    attempt: int
    #: True when this claim took over an expired lease: the previous attempt may or may not have
    #: produced its effect (outcome unknown)
    recovered: bool = False
    #: for a recovered claim: False only when the ledger knows that the previous holder never
    #: started its effect (it claimed with ``marks_start`` and never called ``mark_started``);
    #: True otherwise, conservatively (also for records older than this field). Not meaningful
    #: when ``recovered`` is False.
    previous_started: bool = True


@dataclass(frozen=True, slots=True)
class Acquired:
    claim: Claim


@dataclass(frozen=True, slots=True)
class InFlight:
    """Someone else holds a live lease: do not run; retry after ``record.lease_until``."""

    record: Record


@dataclass(frozen=True, slots=True)
class AlreadyDone:
    record: Record


@dataclass(frozen=True, slots=True)
class Conflict:
    """Same operation id, different payload: a key-reuse conflict. Never applied."""

    record: Record


@dataclass(frozen=True, slots=True)
class Quarantined:
    """The operation itself is quarantined; deliveries of it are completed without running until
    it is redriven."""

    record: Record


ClaimOutcome = Acquired | InFlight | AlreadyDone | Conflict | Quarantined


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    key: OpKey
    fingerprint: str
    owner: str
    lease: float
    #: the holder will call :meth:`Ledger.mark_started` right before its effect starts (unkeyed
    #: effects): until it does, the attempt is recorded as not started, so a claim that takes it
    #: over after a crash learns ``previous_started=False``. Honoured by ``claim_many`` only.
    marks_start: bool = False


@dataclass(frozen=True, slots=True)
class QuarantineRequest:
    """One message (or operation) set aside, with enough to decide later what to do with it."""

    scope: str
    reason: QuarantineReason
    operation_id: str | None = None
    fingerprint: str | None = None
    risk: EffectRisk = EffectRisk.NEVER_CLAIMED
    attempts: int = 0
    detail: str = ""
    message: bytes | None = None
    content_type: str | None = None
    #: extra identity for messages that could not be decoded: what the transport said about them
    #: (the raw operation-id header, content type), stable across redeliveries of one message
    identity: str = ""
    #: the operation's first publish time (kept so a redrive can be checked against the horizon)
    published_at: float | None = None

    def entry_id(self) -> str:
        """Stable id: the same message quarantined twice for the same reason is one entry.

        Without an operation id or fingerprint (bad input), the message bytes and ``identity``
        identify it, so two different bad messages with equal bodies stay two entries.
        """
        h = hashlib.sha256()
        for part in (
            self.scope,
            self.reason.value,
            self.operation_id or "",
            self.fingerprint or hashlib.sha256(self.message or b"").hexdigest(),
            self.identity,
        ):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        return h.hexdigest()[:32]

    def capped_message(self) -> bytes | None:
        return None if self.message is None else self.message[:MAX_QUARANTINE_COPY]

    def storable(self) -> QuarantineRequest:
        """This request with its free text (``detail``, ``content_type``) made storable by
        :func:`storable_text`: what every backend writes. ``identity`` is only hashed into
        :meth:`entry_id` (never stored) and the message is stored as bytes, so both stay as
        they are; so does the entry id."""
        detail, ctype = storable_text(self.detail), storable_text(self.content_type)
        if detail is self.detail and ctype is self.content_type:
            return self
        return replace(self, detail=detail, content_type=ctype)


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    id: str
    scope: str
    reason: QuarantineReason
    operation_id: str | None
    fingerprint: str | None
    risk: EffectRisk
    attempts: int
    first_detail: str
    last_detail: str
    message: bytes | None
    content_type: str | None
    created_at: float
    updated_at: float
    seen: int
    published_at: float | None = None
    #: length of the original message; larger than ``len(message)`` when the copy was capped
    message_size: int = 0
    redriven_at: float | None = None
    redrives: int = 0

    @property
    def truncated(self) -> bool:
        return self.message is not None and self.message_size > len(self.message)


@dataclass(frozen=True, slots=True)
class LedgerSummary:
    """What ``replaysafe inspect`` shows about a ledger."""

    now: float
    #: operation records by state
    by_state: dict[str, int]
    #: in-flight records whose lease has expired: crashed or stalled holders, outcome unknown
    #: until a redelivery claims them again (the open ambiguity the ledger can see)
    expired_leases: int
    #: claim time of the oldest in-flight record (``updated_at``, which an extend leaves alone:
    #: a handler kept alive by its heartbeat still shows how long it has been running)
    oldest_in_flight_at: float | None
    #: operations with the most attempts (retried or recovered the most), most first
    hot_operations: list[tuple[OpKey, int]]
    quarantined_by_reason: dict[str, int]
    #: completions in the hour before ``now`` (the rate for the size projection)
    completed_last_hour: int
    #: storage used by the ledger's records, where the backend can measure it
    approx_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class PauseState:
    """A paused handler, as the ledger records it (``Ledger.paused``)."""

    handler: str
    #: why it was paused (free text from the operator; may be empty)
    reason: str
    #: who paused it (free text: a user, a tool; may be empty)
    by: str
    #: when it was paused, by the ledger's clock (POSIX seconds)
    since: float


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


def decide_claim(
    existing: Record | None,
    key: OpKey,
    fingerprint: str,
    owner: str,
    lease: float,
    now: float,
    next_token: int,
    marks_start: bool = False,
) -> tuple[ClaimOutcome, Record | None]:
    """The claim transition as a pure function: ``(outcome, record to write or None)``.

    Backends that can read-decide-write atomically (memory under a lock, SQLite under
    ``BEGIN IMMEDIATE``) share this one implementation of the state machine. ``next_token`` is only
    used (and must only be consumed) when the outcome is ``Acquired``. ``marks_start``: see
    :attr:`ClaimRequest.marks_start`.
    """
    if existing is None:
        rec = Record(
            key,
            fingerprint,
            State.IN_FLIGHT,
            next_token,
            owner,
            now + lease,
            1,
            None,
            None,
            now,
            now,
            unstarted_attempt=1 if marks_start else None,
        )
        return Acquired(Claim(key, fingerprint, next_token, owner, now + lease, 1)), rec
    if existing.fingerprint != fingerprint:
        return Conflict(existing), None
    if existing.state is State.COMPLETED:
        return AlreadyDone(existing), None
    if existing.state is State.QUARANTINED:
        return Quarantined(existing), None
    if existing.state is State.IN_FLIGHT and not lease_expired(existing, now):
        return InFlight(existing), None
    recovered = existing.state is State.IN_FLIGHT  # lease expired without complete or release
    started = previous_started(existing)
    attempt = existing.attempts + 1
    rec = Record(
        key,
        fingerprint,
        State.IN_FLIGHT,
        next_token,
        owner,
        now + lease,
        attempt,
        None,
        existing.last_error,
        existing.created_at,
        now,
        # a takeover of an attempt that may have started stays "may have started" whatever this
        # attempt does: the effect of that earlier attempt is still unknown
        unstarted_attempt=attempt if marks_start and not (recovered and started) else None,
    )
    claim = Claim(key, fingerprint, next_token, owner, now + lease, attempt, recovered, started)
    return Acquired(claim), rec


def previous_started(existing: Record) -> bool:
    """For a claim taking over ``existing``: False only when ``existing`` is in flight and its
    holder claimed with ``marks_start`` and never marked the effect started."""
    return not (
        existing.state is State.IN_FLIGHT
        and existing.unstarted_attempt is not None
        and existing.unstarted_attempt == existing.attempts
    )


def entry_from_row(row: Sequence[Any]) -> QuarantineEntry:
    """A quarantine entry from a SQL row in the column order the SQL backends share."""
    return QuarantineEntry(
        id=row[0],
        scope=row[1],
        reason=QuarantineReason(row[2]),
        operation_id=row[3],
        fingerprint=row[4],
        risk=EffectRisk(row[5]),
        attempts=row[6],
        first_detail=row[7],
        last_detail=row[8],
        message=None if row[9] is None else bytes(row[9]),
        content_type=row[10],
        created_at=row[11],
        updated_at=row[12],
        seen=row[13],
        published_at=row[14],
        message_size=row[15],
        redriven_at=row[16],
        redrives=row[17],
    )


def merge_quarantine(
    old: QuarantineEntry | None, request: QuarantineRequest, now: float
) -> QuarantineEntry:
    """The entry after quarantining ``request``: a new one, or ``old`` seen once more (the first
    detail, message copy and publish time are kept; attempts only grow)."""
    if old is None:
        return QuarantineEntry(
            request.entry_id(), request.scope, request.reason, request.operation_id,
            request.fingerprint, request.risk, request.attempts, request.detail, request.detail,
            request.capped_message(), request.content_type, now, now, 1, request.published_at,
            len(request.message or b""),
        )  # fmt: skip
    return replace(
        old,
        attempts=max(old.attempts, request.attempts),
        risk=request.risk,
        last_detail=request.detail,
        updated_at=now,
        seen=old.seen + 1,
    )


def check_fence(existing: Record | None, claim: Claim) -> Record:
    """Return the record if ``claim`` is its current holder, else raise ``LeaseLost``."""
    if existing is None or existing.state is not State.IN_FLIGHT or existing.token != claim.token:
        state = "missing" if existing is None else f"{existing.state.value}, token {existing.token}"
        raise LeaseLost(
            f"claim on {claim.key.scope}/{claim.key.operation_id} with fencing token "
            f"{claim.token} is stale (record is {state}); do not complete at the broker, the "
            "current holder owns the outcome"
        )
    return existing


def lease_expired(record: Record, now: float) -> bool:
    return record.state is State.IN_FLIGHT and (record.lease_until or 0.0) <= now


def check_handler_name(handler: object) -> str:
    """``handler`` if it can name a handler in the ledger's control flags, else
    ``ConfigurationError``: a non-empty string of at most :data:`MAX_HANDLER_NAME` UTF-8 bytes
    without control characters (every backend stores exactly this)."""
    if (
        not isinstance(handler, str)
        or not handler
        or len(handler.encode("utf-8", "surrogatepass")) > MAX_HANDLER_NAME
        or any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 or 0xD800 <= ord(ch) < 0xE000
               for ch in handler)
    ):  # fmt: skip
        raise ConfigurationError(
            f"handler name {handler!r} cannot be paused or resumed: use the handler's registered "
            f"name (1-{MAX_HANDLER_NAME} bytes, no control characters); "
            "`replaysafe handler list MODULE:APP` shows them"
        )
    return handler


#: what no store can hold in a text column: NUL (PostgreSQL refuses it, SQLite's SQL functions
#: stop at it) and lone surrogates (no UTF-8 encoding: the drivers raise before sending)
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")


def _escape_unstorable(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:
        # surrogateescape's stand-in for a byte that was not UTF-8: show the byte itself
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


@overload
def storable_text(text: str) -> str: ...
@overload
def storable_text(text: None) -> None: ...


def storable_text(text: str | None) -> str | None:
    """``text`` as every ledger stores free text that comes from outside (content types,
    details, error texts, pause reasons): unchanged unless it holds a NUL or a lone surrogate,
    each of which becomes a backslash escape (``\\x00``; ``\\xff`` for a byte that was not
    UTF-8 and reached Python as a ``surrogateescape`` surrogate; ``\\ud800`` for any other lone
    surrogate). None stays None.

    One-way on purpose: the stored text is what an operator reads (``quarantine show``,
    ``inspect``), identical on every backend, and valid in every store's text columns. Keys
    (scope, operation id), fingerprints, owners and results are never escaped (an escape could
    make two keys one): a backend that cannot hold one verbatim refuses it with
    ``LedgerDataError``."""
    if text is None or (text.isascii() and "\x00" not in text):  # the common case: no regex
        return text
    return _UNSTORABLE.sub(_escape_unstorable, text)


def pause_text(text: str) -> str:
    """``text`` made storable (:func:`storable_text`) and cut to at most
    :data:`MAX_PAUSE_TEXT` UTF-8 bytes (never inside a character)."""
    raw = storable_text(text).encode("utf-8")[:MAX_PAUSE_TEXT]
    return raw.decode("utf-8", "ignore")


def unknown_entry(entry_id: str) -> LedgerError:
    """What ``redrive`` raises for an entry id the ledger does not hold (every backend)."""
    return LedgerError(
        f"no quarantine entry {entry_id!r} (never quarantined, or purged); list the entries with "
        "`replaysafe quarantine list`"
    )
