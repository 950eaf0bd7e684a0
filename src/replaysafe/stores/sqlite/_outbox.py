"""The outbox in the SQLite ledger's file.

The store is built from a :class:`~replaysafe.stores.sqlite.ledger.SQLiteLedger` and shares its
discipline: ``stage`` runs in the caller's ``ledger.transaction()`` (so the rows commit with the
business rows and ``complete_in``), everything else runs on the ledger's one connection thread
under its lock (``SQLiteLedger.run_job``). Nothing here opens a second connection.

Ordering comes for free: SQLite has one writer at a time, so ``AUTOINCREMENT`` ids are assigned in
commit order and never reused, even after cleanup.

One relay per database file: a relay lease row (owner, lease end on the ledger's clock) lets one
relay publish; others stand by and take over when the lease runs out or the holder releases it on
a clean stop. A holder stalled past its lease may overlap with its successor: that duplicates
publishes (consumers deduplicate), it never loses one. The lease is renewed only when less than
half of it is left, so an idle relay does not fsync on every poll.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

from replaysafe.envelope import DEFAULT_LIMITS, Envelope, Limits
from replaysafe.errors import ConfigurationError
from replaysafe.ledger.base import Transaction
from replaysafe.outbox.base import (
    DEFAULT_RELAY_LEASE,
    NO_SKIP,
    ClaimedBatch,
    OutboxRow,
    OutboxState,
    OutboxStore,
    Skip,
    StaticBatch,
    check_limit,
    parse_headers,
    prepare_rows,
)
from replaysafe.stores.sqlite.errors import outbox_stage_error
from replaysafe.stores.sqlite.ledger import SQLiteLedger

SCHEMA_VERSION: Final = 1

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS replaysafe_outbox (
        id                  INTEGER PRIMARY KEY AUTOINCREMENT,
        destination         TEXT    NOT NULL,
        operation_id        TEXT    NOT NULL,
        ordering_key        TEXT,
        body                BLOB    NOT NULL,
        headers             TEXT    NOT NULL,
        content_type        TEXT    NOT NULL,
        fingerprint         TEXT    NOT NULL,
        published_at        REAL    NOT NULL,
        staged_at           REAL    NOT NULL,
        state               TEXT    NOT NULL DEFAULT 'pending'
                            CHECK (state IN ('pending', 'published')),
        published_at_broker REAL
    )""",
    # relays walk only pending rows, in sequence order
    """CREATE INDEX IF NOT EXISTS replaysafe_outbox_pending
        ON replaysafe_outbox (id) WHERE state = 'pending'""",
    # cleanup walks only published rows, oldest mark first, and stops at its limit
    """CREATE INDEX IF NOT EXISTS replaysafe_outbox_published
        ON replaysafe_outbox (published_at_broker) WHERE state = 'published'""",
    """CREATE TABLE IF NOT EXISTS replaysafe_outbox_meta (
        id                INTEGER PRIMARY KEY CHECK (id = 1),
        schema_version    INTEGER NOT NULL,
        relay_owner       TEXT,
        relay_lease_until REAL    NOT NULL
    )""",
    f"""INSERT OR IGNORE INTO replaysafe_outbox_meta (id, schema_version, relay_lease_until)
        VALUES (1, {SCHEMA_VERSION}, 0)""",
)

_COLUMNS = (
    "id, destination, operation_id, ordering_key, body, headers, content_type, fingerprint, "
    "published_at, staged_at, state, published_at_broker"
)
_INSERT_COLUMNS = (
    "destination, operation_id, ordering_key, body, headers, content_type, fingerprint, "
    "published_at, staged_at"
)
#: rows per INSERT statement (9 bound values each, far below SQLite's variable limit)
_INSERT_CHUNK = 200
# the literal 'pending' (not a parameter) lets SQLite use the partial index
_SELECT_PENDING = f"SELECT {_COLUMNS} FROM replaysafe_outbox WHERE state = 'pending'"
_MARK = """
    UPDATE replaysafe_outbox SET state = 'published', published_at_broker = ?
    WHERE state = 'pending' AND id IN (SELECT value FROM json_each(?))"""
_CLEANUP = """
    DELETE FROM replaysafe_outbox WHERE id IN (
        SELECT id FROM replaysafe_outbox
        WHERE state = 'published' AND published_at_broker < ?
        ORDER BY published_at_broker
        LIMIT ?
    )"""
_TAKE_LEASE = """
    UPDATE replaysafe_outbox_meta SET relay_owner = ?1, relay_lease_until = ?2
    WHERE id = 1 AND (relay_owner IS NULL OR relay_owner = ?1 OR relay_lease_until <= ?3)"""


def _row(values: Sequence[Any]) -> OutboxRow:
    return OutboxRow(
        id=values[0],
        destination=values[1],
        operation_id=values[2],
        key=values[3],
        body=bytes(values[4]),
        headers=parse_headers(values[5]),
        content_type=values[6],
        fingerprint=values[7],
        published_at=values[8],
        staged_at=values[9],
        state=OutboxState(values[10]),
        published_at_broker=values[11],
    )


def _pending_sql(skip: Skip) -> tuple[str, list[Any]]:
    """The pending-rows query without the rows ``skip`` names (bound JSON arrays, never
    interpolated values)."""
    sql = _SELECT_PENDING
    params: list[Any] = []
    if skip.destinations:
        sql += " AND destination NOT IN (SELECT value FROM json_each(?))"
        params.append(json.dumps(sorted(skip.destinations)))
    if skip.keys:
        sql += (
            " AND NOT EXISTS (SELECT 1 FROM json_each(?) AS k WHERE"
            " json_extract(k.value, '$[0]') = destination"
            " AND json_extract(k.value, '$[1]') = ordering_key)"
        )
        params.append(json.dumps(sorted(skip.keys)))
    if skip.row_ids:
        sql += " AND id NOT IN (SELECT value FROM json_each(?))"
        params.append(json.dumps(sorted(skip.row_ids)))
    return sql + " ORDER BY id LIMIT ?", params


class SQLiteOutboxStore(OutboxStore):
    """The outbox in ``ledger``'s SQLite file (see the module docstring).

    ``limits`` are what every staged envelope must pass: use the consumers' limits.
    ``owns_ledger``: :meth:`close` closes the ledger too (set by :meth:`from_url`, which opens
    one of its own).
    """

    def __init__(
        self, ledger: SQLiteLedger, *, limits: Limits = DEFAULT_LIMITS, owns_ledger: bool = False
    ) -> None:
        if not isinstance(ledger, SQLiteLedger):
            raise ConfigurationError(
                f"SQLiteOutboxStore needs the SQLiteLedger whose file it shares, got "
                f"{type(ledger).__name__}"
            )
        self._ledger = ledger
        self.limits = limits
        self._migrated = False
        self._owns_ledger = owns_ledger

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteOutboxStore:
        """The outbox in the SQLite file ``sqlite:PATH`` names (``open_outbox``), on a ledger of
        its own (``SQLiteLedger.from_url``: the same options) that :meth:`close` closes."""
        return cls(SQLiteLedger.from_url(url, **options), owns_ledger=True)

    async def close(self) -> None:
        """Close the ledger when this store opened it (:meth:`from_url`); else nothing: the
        ledger is its owner's."""
        if self._owns_ledger:
            await self._ledger.close()

    @property
    def ledger(self) -> SQLiteLedger:
        return self._ledger

    def now(self) -> float:
        return self._ledger.now()

    def __repr__(self) -> str:
        return f"SQLiteOutboxStore({self._ledger.path!r})"

    async def migrate(self) -> None:
        def run(conn: sqlite3.Connection) -> None:
            for statement in _SCHEMA:
                conn.execute(statement)
            (version,) = conn.execute(
                "SELECT schema_version FROM replaysafe_outbox_meta"
            ).fetchone()
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"{self._ledger.path!r} has outbox schema version {version}, newer than this "
                    f"replaysafe understands ({SCHEMA_VERSION}); upgrade replaysafe"
                )

        await self._ledger.run_job(run, write=True)
        self._migrated = True

    async def _ready(self) -> None:
        # the relay side may create the tables itself; stage cannot (it runs in the caller's tx)
        if not self._migrated:
            await self.migrate()

    # ------------------------------------------------------------------ staging

    async def stage(
        self, tx: Transaction | Any, destination: str, envelopes: Sequence[Envelope]
    ) -> None:
        """Insert pending rows inside ``tx``, which must come from this store's ledger's
        ``transaction()``. See :meth:`OutboxStore.stage`."""
        if not isinstance(tx, Transaction) or not self._ledger.owns(tx):
            raise ConfigurationError(
                "stage() needs a transaction opened by this store's ledger "
                f"({self._ledger!r}).transaction(); rows staged anywhere else would not commit "
                "with the business rows"
            )
        rows = prepare_rows(destination, envelopes, self.now(), self.limits)
        for start in range(0, len(rows), _INSERT_CHUNK):
            chunk = rows[start : start + _INSERT_CHUNK]
            values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
            params = [v for r in chunk for v in r.values()]
            sql = f"INSERT INTO replaysafe_outbox ({_INSERT_COLUMNS}) VALUES {values}"
            try:
                await tx.execute(sql, params)
            except sqlite3.Error as exc:
                raise outbox_stage_error(self._ledger.path, exc) from exc

    # ------------------------------------------------------------------ relay side

    async def fetch_pending(self, limit: int = 100) -> list[OutboxRow]:
        check_limit("limit", limit)
        await self._ready()
        sql, params = _pending_sql(NO_SKIP)

        def run(conn: sqlite3.Connection) -> list[OutboxRow]:
            return [_row(r) for r in conn.execute(sql, (*params, limit)).fetchall()]

        return await self._ledger.run_job(run, write=False)

    @asynccontextmanager
    async def claim(
        self,
        limit: int,
        *,
        owner: str,
        lease: float = DEFAULT_RELAY_LEASE,
        skip: Skip = NO_SKIP,
    ) -> AsyncIterator[ClaimedBatch]:
        """Pending rows for ``owner``, if it holds (or can take) the file's relay lease.

        The rows are read without holding SQLite's write lock; the lease is taken or renewed in a
        short write transaction only when rows are waiting and less than half of it is left. One
        relay per file is what keeps per-key order here (no row locks), so a stand-by relay gets an
        inactive, empty batch.
        """
        check_limit("limit", limit)
        if lease <= 0:
            raise ConfigurationError(f"relay lease must be positive seconds, got {lease!r}")
        sql, params = _pending_sql(skip)
        await self._ready()

        def read(conn: sqlite3.Connection) -> tuple[str | None, float, list[OutboxRow]]:
            holder, until = conn.execute(
                "SELECT relay_owner, relay_lease_until FROM replaysafe_outbox_meta"
            ).fetchone()
            rows = [_row(r) for r in conn.execute(sql, (*params, limit)).fetchall()]
            return holder, until, rows

        def take(conn: sqlite3.Connection) -> bool:
            now = self._ledger.now()
            return conn.execute(_TAKE_LEASE, (owner, now + lease, now)).rowcount == 1

        holder, until, rows = await self._ledger.run_job(read, write=False)
        now = self.now()
        if not rows:
            active = holder in (None, owner) or until <= now
            yield StaticBatch(self, [], active)
            return
        renew = holder != owner or until - now < lease / 2
        if renew and not await self._ledger.run_job(take, write=True):
            yield StaticBatch(self, [], False)
            return
        yield StaticBatch(self, rows, True)

    async def release(self, owner: str) -> None:
        await self._ready()

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE replaysafe_outbox_meta SET relay_owner = NULL, relay_lease_until = 0 "
                "WHERE id = 1 AND relay_owner = ?",
                (owner,),
            )

        await self._ledger.run_job(run, write=True)

    async def mark_published(self, row_ids: Sequence[int]) -> int:
        if not row_ids:
            return 0
        await self._ready()
        ids = json.dumps([int(i) for i in row_ids])

        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(_MARK, (self._ledger.now(), ids)).rowcount

        return await self._ledger.run_job(run, write=True)

    async def pending_count(self) -> int:
        await self._ready()

        def run(conn: sqlite3.Connection) -> int:
            (n,) = conn.execute(
                "SELECT COUNT(*) FROM replaysafe_outbox WHERE state = 'pending'"
            ).fetchone()
            return int(n)

        return await self._ledger.run_job(run, write=False)

    async def oldest_pending_age(self) -> float | None:
        await self._ready()

        def run(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT staged_at FROM replaysafe_outbox WHERE state = 'pending' "
                "ORDER BY id LIMIT 1"
            ).fetchone()
            return None if row is None else float(row[0])

        staged = await self._ledger.run_job(run, write=False)
        return None if staged is None else max(0.0, self.now() - staged)

    async def cleanup(self, published_before: float, limit: int = 1000) -> int:
        check_limit("limit", limit)
        await self._ready()

        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(_CLEANUP, (published_before, limit)).rowcount

        return await self._ledger.run_job(run, write=True)


__all__ = ["SCHEMA_VERSION", "SQLiteOutboxStore"]
