"""The transactional outbox: the store protocol and the row type shared by every backend.

"Commit the row and also publish the event" is not atomic: a crash between the two loses the event
(publish after commit) or announces something that never happened (publish before commit). The
outbox makes it atomic by *not publishing* in the business transaction: :meth:`OutboxStore.stage`
writes the envelopes as rows of the caller's own transaction (the ledger's ``transaction()``), so
they commit or roll back with the business rows. A :class:`~replaysafe.outbox.relay.Relay` then
publishes committed rows and marks them published (boundary PUBLISHED).

What each step may lose or duplicate:

- ``stage`` loses nothing and duplicates nothing: the rows exist exactly when the transaction
  committed. A rolled-back transaction leaves no row; an uncommitted row is invisible to relays.
- Publishing then marking is at-least-once: a relay that dies after the broker accepted a batch
  and before the mark committed publishes that batch again after restart, with the SAME operation
  ids and first publish times (everything is read back from the row), so consumers deduplicate.
  Nothing is ever lost: a row stays pending until a mark commits.

Row life cycle::

    stage (caller's tx commits) ──► pending ──publish, confirmed──► mark ──► published
                                       ▲             │                          │
                                       └── failure / ambiguous (same row, ──────┘ cleanup after
                                           same envelope, retried later)           ``retention``

Ordering: rows carry a sequence id assigned in commit order per ordering key (SQLite: one writer
at a time; PostgreSQL: stagers of one key take a per-key transaction lock first). Relays publish a
key's rows in sequence order and never publish a later row of a key before the earlier one was
confirmed. Rows without a key have no order relative to each other.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from replaysafe.envelope import DEFAULT_LIMITS, Envelope, Limits, decode_wire
from replaysafe.errors import ConfigurationError
from replaysafe.ledger.base import Transaction

#: relays hold a store's relay lease (where the store has one) for this long by default, seconds
DEFAULT_RELAY_LEASE = 30.0


class OutboxState(StrEnum):
    PENDING = "pending"
    PUBLISHED = "published"


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One staged envelope, as stored.

    ``published_at`` is the envelope's *first* publish time (``rs-published-at``): stamped at stage
    time unless the producer set one, and never changed, so a republished row carries the same
    time. ``published_at_broker`` is when a relay's mark committed (None while pending).
    """

    id: int
    destination: str
    operation_id: str
    key: str | None
    body: bytes
    #: the envelope's own headers (the rs-* metadata is rebuilt from the columns)
    headers: Mapping[str, str]
    content_type: str
    fingerprint: str
    published_at: float
    staged_at: float
    state: OutboxState
    published_at_broker: float | None = None

    def envelope(self, limits: Limits = DEFAULT_LIMITS) -> Envelope:
        """The envelope to publish, rebuilt from the row through the wire codec (the same
        ``decode_wire`` consumers use), so what the relay sends is what a consumer will accept.

        Raises a :class:`~replaysafe.errors.BadInput` subclass if the row no longer decodes (it was
        edited by hand, or ``limits`` became stricter than at stage time).
        """
        wire = Envelope(
            self.operation_id,
            self.body,
            None,
            self.fingerprint,
            self.content_type,
            self.key,
            self.headers,
            self.published_at,
        ).wire_headers()
        return decode_wire(
            self.body, wire, content_type=self.content_type, key=self.key, limits=limits
        )


@dataclass(frozen=True, slots=True)
class Skip:
    """Rows a relay does not want in its next claim (they are backing off or blocked)."""

    #: every row of these destinations (the broker failed for them)
    destinations: frozenset[str] = frozenset()
    #: every row of these (destination, key) pairs (an earlier row of the key is blocked)
    keys: frozenset[tuple[str, str]] = frozenset()
    #: single keyless rows that are blocked
    row_ids: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.destinations or self.keys or self.row_ids)


NO_SKIP = Skip()


class ClaimedBatch(ABC):
    """Rows a relay may publish now, from :meth:`OutboxStore.claim`.

    ``rows`` are in sequence order. On PostgreSQL the rows stay locked by the claim's transaction
    until the ``async with`` block ends (other relays skip them); on SQLite the relay lease makes
    this relay the only one.
    """

    rows: list[OutboxRow]
    #: False when another relay holds the store's relay lease: ``rows`` is empty, stand by
    active: bool

    @abstractmethod
    async def mark_published(self, row_ids: Sequence[int]) -> int:
        """Mark these rows published in one statement (they commit when the claim ends, or at
        once where there is no claim transaction). Returns how many were still pending."""


@dataclass(slots=True)
class StaticBatch(ClaimedBatch):
    """A claimed batch without a transaction of its own: marks go straight to the store."""

    store: OutboxStore
    rows: list[OutboxRow] = field(default_factory=list)
    active: bool = True

    async def mark_published(self, row_ids: Sequence[int]) -> int:
        return await self.store.mark_published(row_ids)


class OutboxStore(ABC):
    """Where staged envelopes wait for a relay. Backends: SQLite, PostgreSQL.

    A store lives in the ledger's database: :meth:`stage` writes through the caller's
    :class:`~replaysafe.ledger.base.Transaction` only (never a connection of its own), so the
    outbox rows commit with the business rows and the ledger row of that transaction.
    Call :meth:`migrate` once before use (idempotent).
    """

    #: limits every staged envelope must pass (the consumer's limits: refuse at the producer what
    #: a consumer would quarantine)
    limits: Limits = DEFAULT_LIMITS

    @abstractmethod
    async def migrate(self) -> None:
        """Create the outbox tables if they do not exist. Idempotent."""

    @abstractmethod
    async def stage(
        self, tx: Transaction | Any, destination: str, envelopes: Sequence[Envelope]
    ) -> None:
        """Write ``envelopes`` for ``destination`` as pending rows inside ``tx`` (the caller's open
        transaction of this store's database). Moves no boundary: the rows become visible to relays
        only when ``tx`` commits, and vanish if it rolls back.

        Every envelope is checked with the consumer's codec first (``BadInput`` before anything is
        written) and stamped with its first publish time unless it already has one.
        """

    @abstractmethod
    async def fetch_pending(self, limit: int = 100) -> list[OutboxRow]:
        """Up to ``limit`` committed pending rows in sequence order (so in order per key). A plain
        read: it locks nothing, for inspection and tools; relays use :meth:`claim`."""

    @abstractmethod
    def claim(
        self,
        limit: int,
        *,
        owner: str,
        lease: float = DEFAULT_RELAY_LEASE,
        skip: Skip = NO_SKIP,
    ) -> AbstractAsyncContextManager[ClaimedBatch]:
        """Up to ``limit`` pending rows for relay ``owner`` to publish, in sequence order, leaving
        out ``skip``. A row whose key has an earlier pending row that this claim does not hold is
        never included (the earlier one must be confirmed first). ``lease`` is how long the store's
        relay lease lasts where the store serialises relays with one (SQLite)."""

    @abstractmethod
    async def mark_published(self, row_ids: Sequence[int]) -> int:
        """Mark rows published (boundary PUBLISHED recorded) in one statement. Idempotent: rows
        already published keep their first ``published_at_broker``. Returns how many changed."""

    @abstractmethod
    async def pending_count(self) -> int:
        """Committed rows not yet published."""

    @abstractmethod
    async def oldest_pending_age(self) -> float | None:
        """Publish lag: seconds since the earliest pending row (by sequence) was staged, or None
        when nothing is pending."""

    @abstractmethod
    async def cleanup(self, published_before: float, limit: int = 1000) -> int:
        """Delete up to ``limit`` published rows whose mark is older than ``published_before``
        (POSIX seconds), oldest first, in one bounded statement. Pending rows are never deleted.
        Returns how many were deleted."""

    async def release(self, owner: str) -> None:  # noqa: B027 - optional hook
        """Give up ``owner``'s relay lease (a stopping relay lets a standby take over at once).
        A no-op where row locks serialise relays."""

    @abstractmethod
    def now(self) -> float:
        """The store's clock (stage times, marks, publish lag)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources the store owns (not the ledger's). Idempotent."""


# --------------------------------------------------------------------------- shared helpers


def check_limit(what: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{what} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class StagedRow:
    """The column values of one row to insert, prepared the same way by every backend."""

    destination: str
    operation_id: str
    key: str | None
    body: bytes
    headers_json: str
    content_type: str
    fingerprint: str
    published_at: float
    staged_at: float

    def values(self) -> tuple[Any, ...]:
        """The column values in the order of the fields (the insert's column order)."""
        return (self.destination, self.operation_id, self.key, self.body, self.headers_json,
                self.content_type, self.fingerprint, self.published_at, self.staged_at)  # fmt: skip


def prepare_rows(
    destination: str, envelopes: Sequence[Envelope], now: float, limits: Limits
) -> list[StagedRow]:
    """Validate and stamp ``envelopes`` for staging; raise before anything is written.

    Each envelope goes through :func:`~replaysafe.envelope.decode_wire` with its own wire headers,
    exactly as a consumer would decode it: a payload the consumer would quarantine (too large,
    bad operation id, fingerprint that does not match the payload …) is refused here, in the
    producer's transaction, instead of being published.
    """
    if not isinstance(destination, str) or not destination:
        raise ConfigurationError(
            f"outbox destination must be a non-empty string, got {destination!r}"
        )
    if isinstance(envelopes, Envelope):
        raise ConfigurationError("stage() takes a sequence of envelopes; wrap one in a list")
    rows: list[StagedRow] = []
    for env in envelopes:
        if not isinstance(env, Envelope):
            raise ConfigurationError(
                f"stage() takes Envelope objects, got {type(env).__name__}; build them with "
                "Envelope.of(operation_id, payload, key=...)"
            )
        stamped = env.with_published_at(now)
        decode_wire(
            stamped.payload,
            stamped.wire_headers(),
            content_type=stamped.content_type,
            key=stamped.key,
            limits=limits,
        )
        assert stamped.published_at is not None
        rows.append(
            StagedRow(
                destination,
                stamped.operation_id,
                stamped.key,
                bytes(stamped.payload),
                json.dumps(dict(stamped.headers), sort_keys=True, ensure_ascii=False),
                stamped.content_type,
                stamped.fingerprint,
                stamped.published_at,
                now,
            )
        )
    return rows


def parse_headers(text: str | Mapping[str, str]) -> dict[str, str]:
    """Headers column back to a dict (PostgreSQL's jsonb arrives decoded already)."""
    value = json.loads(text) if isinstance(text, str) else text
    return {str(k): str(v) for k, v in dict(value).items()}


__all__ = [
    "DEFAULT_RELAY_LEASE",
    "NO_SKIP",
    "ClaimedBatch",
    "OutboxRow",
    "OutboxState",
    "OutboxStore",
    "Skip",
    "StagedRow",
    "StaticBatch",
    "check_limit",
    "parse_headers",
    "prepare_rows",
]
