"""The outbox in MySQL / MariaDB: ``<prefix>outbox`` beside the ledger's tables, written through
the ledger's transactions.

How it keeps its promises:

- **Staging is the caller's transaction.** ``stage`` writes through the caller's
  :class:`~replaysafe.stores.mysql.ledger.MySQLTransaction`: the rows commit or roll back with
  the business rows; READ COMMITTED readers never see uncommitted rows.
- **Per-key order survives concurrent stagers.** ``AUTO_INCREMENT`` assigns ids at insert time,
  not at commit, so two transactions staging the same key could commit in the opposite order of
  their ids. ``stage`` first upserts one row per (destination, key) in ``<prefix>outbox_keys``
  (sorted, one statement), which holds that row's lock until the transaction ends: stagers of a
  key take turns, so a key's rows get their ids in commit order. Keyless rows take no lock.
- **Several relays, no routine double publish.** A relay's claim runs in its own transaction:
  ``SELECT … FOR UPDATE SKIP LOCKED`` of the oldest pending rows (MySQL 8, MariaDB 10.6+), minus
  any row whose key has an earlier pending row the claim does not hold (another relay holds it,
  so it must be confirmed first). The rows stay locked while the relay publishes and until its
  marks commit. What still duplicates: a relay that dies after the broker accepted a batch and
  before the marks committed; its transaction rolls back and the next claim publishes the rows
  again, with the same operation ids. Never a loss.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

from replaysafe.clock import Clock
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
    check_limit,
    parse_headers,
    prepare_rows,
)
from replaysafe.stores.mysql.core import execute
from replaysafe.stores.mysql.ledger import MySQLLedger, MySQLTransaction
from replaysafe.stores.mysql.records import key_text, placeholders

if TYPE_CHECKING:
    from asyncmy.connection import Connection

#: rows per INSERT statement (9 bound values each)
_INSERT_CHUNK: Final = 500

_COLUMNS: Final = (
    "id", "destination", "operation_id", "ordering_key", "body", "headers", "content_type",
    "fingerprint", "published_at", "staged_at", "state", "published_at_broker",
)  # fmt: skip
_SELECT: Final = ", ".join(_COLUMNS)
_INSERT_COLUMNS: Final = ", ".join(_COLUMNS[1:10])

_TEXT: Final = "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
# destination and key are VARBINARY like the ledger's keys: exact bytes, no PAD SPACE folding
_DDL: Final = (
    f"""CREATE TABLE IF NOT EXISTS {{t}} (
        id                  BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        destination         VARBINARY(1020) NOT NULL,
        operation_id        TEXT {_TEXT} NOT NULL,
        ordering_key        VARBINARY(1020),
        body                LONGBLOB NOT NULL,
        headers             LONGTEXT {_TEXT} NOT NULL,
        content_type        TEXT {_TEXT} NOT NULL,
        fingerprint         TEXT {_TEXT} NOT NULL,
        published_at        DOUBLE NOT NULL,
        staged_at           DOUBLE NOT NULL,
        state               VARCHAR(16) CHARACTER SET ascii NOT NULL DEFAULT 'pending',
        published_at_broker DOUBLE,
        KEY {{p}}outbox_pending (state, id),
        KEY {{p}}outbox_pending_key (state, destination, ordering_key, id),
        KEY {{p}}outbox_published (state, published_at_broker)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC""",
    """CREATE TABLE IF NOT EXISTS {k} (
        destination  VARBINARY(1020) NOT NULL,
        ordering_key VARBINARY(1020) NOT NULL,
        stages       BIGINT NOT NULL DEFAULT 1,
        PRIMARY KEY (destination, ordering_key)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC""",
)


def _row(values: Sequence[Any]) -> OutboxRow:
    return OutboxRow(
        id=int(values[0]),
        destination=key_text(values[1]) or "",
        operation_id=values[2],
        key=key_text(values[3]),
        body=bytes(values[4]),
        headers=parse_headers(values[5]),
        content_type=values[6],
        fingerprint=values[7],
        published_at=float(values[8]),
        staged_at=float(values[9]),
        state=OutboxState(values[10]),
        published_at_broker=None if values[11] is None else float(values[11]),
    )


class _Batch(ClaimedBatch):
    """Rows locked by the claim's transaction; marks run in it and commit when the claim ends."""

    def __init__(self, store: MySQLOutboxStore, conn: Connection, rows: list[OutboxRow]):
        self._store = store
        self._conn = conn
        self.rows = rows
        self.active = True

    async def mark_published(self, row_ids: Sequence[int]) -> int:
        return await self._store._mark(self._conn, row_ids)


class MySQLOutboxStore(OutboxStore):
    """The outbox in the database of a :class:`MySQLLedger` (see the module docstring): its
    pool, database and table prefix. ``clock`` stamps stage times and marks (default: the
    ledger's server-corrected clock). ``limits`` are what every staged envelope must pass: use
    the consumers' limits. ``owns_ledger``: :meth:`close` closes the ledger too (set by
    :meth:`from_url`, which builds one)."""

    def __init__(
        self,
        ledger: MySQLLedger,
        *,
        clock: Clock | None = None,
        limits: Limits = DEFAULT_LIMITS,
        owns_ledger: bool = False,
    ) -> None:
        if not isinstance(ledger, MySQLLedger):
            raise ConfigurationError(
                f"MySQLOutboxStore needs the MySQLLedger of its database, got "
                f"{type(ledger).__name__}; or use MySQLOutboxStore.from_url(url)"
            )
        self._ledger = ledger
        self._clock = clock
        self.limits = limits
        self._owns_ledger = owns_ledger
        self._table = ledger.table("outbox")
        self._keys = ledger.table("outbox_keys")

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MySQLOutboxStore:
        """The outbox at ``url`` (a ``mysql://`` URL as :meth:`MySQLLedger.from_url` reads it),
        on a ledger of its own that :meth:`close` closes."""
        return cls(MySQLLedger.from_url(url, **options), owns_ledger=True)

    @property
    def table(self) -> str:
        return self._table

    def now(self) -> float:
        return self._clock.now() if self._clock is not None else self._ledger.now()

    def __repr__(self) -> str:
        return f"MySQLOutboxStore({self._ledger.config.redacted!r}, table={self._table!r})"

    async def _one(
        self, action: str, sql: str, params: Sequence[Any] = ()
    ) -> tuple[list[tuple[Any, ...]], int]:
        """One statement in autocommit on the ledger's pool: its rows and its row count."""
        return await self._ledger._in_tx(
            f"outbox {action}", lambda conn: execute(conn, sql, params), begin=False
        )

    async def migrate(self) -> None:
        """Create the outbox tables if missing (idempotent; ``CREATE TABLE IF NOT EXISTS``)."""
        p = self._ledger.table_prefix
        for ddl in _DDL:
            await self._one("migrate", ddl.format(t=self._table, k=self._keys, p=p))

    async def stage(
        self, tx: Transaction | Any, destination: str, envelopes: Sequence[Envelope]
    ) -> None:
        """Insert pending rows inside ``tx`` (a :class:`MySQLTransaction` of this store's
        ledger), after taking the per-key locks (held until ``tx`` ends: keep it short). Errors
        of these statements propagate: let them leave the block, which rolls back."""
        if not isinstance(tx, MySQLTransaction) or tx._ledger is not self._ledger:
            raise ConfigurationError(
                "stage() needs the caller's open transaction on this database: a "
                f"MySQLTransaction from ledger.transaction(), got {type(tx).__name__}"
            )
        rows = prepare_rows(destination, envelopes, self.now(), self.limits)
        if not rows:
            return
        keys = sorted({(r.destination.encode(), r.key.encode()) for r in rows if r.key is not None})
        if keys:
            # sorted, one statement: stagers of overlapping keys lock in the same order
            await tx.execute(
                f"INSERT INTO {self._keys} (destination, ordering_key) VALUES "
                f"{placeholders(2, len(keys))} ON DUPLICATE KEY UPDATE stages = stages + 1",
                [v for pair in keys for v in pair],
            )
        for start in range(0, len(rows), _INSERT_CHUNK):
            chunk = rows[start : start + _INSERT_CHUNK]
            params: list[Any] = []
            for r in chunk:
                params += [
                    r.destination.encode(), r.operation_id,
                    None if r.key is None else r.key.encode(), r.body, r.headers_json,
                    r.content_type, r.fingerprint, r.published_at, r.staged_at,
                ]  # fmt: skip
            await tx.execute(
                f"INSERT INTO {self._table} ({_INSERT_COLUMNS}) VALUES "
                f"{placeholders(9, len(chunk))}",
                params,
            )

    async def fetch_pending(self, limit: int = 100) -> list[OutboxRow]:
        check_limit("limit", limit)
        rows, _ = await self._one(
            "fetch_pending",
            f"SELECT {_SELECT} FROM {self._table} WHERE state = 'pending' ORDER BY id LIMIT %s",
            (limit,),
        )
        return [_row(r) for r in rows]

    @asynccontextmanager
    async def claim(
        self,
        limit: int,
        *,
        owner: str,
        lease: float = DEFAULT_RELAY_LEASE,
        skip: Skip = NO_SKIP,
    ) -> AsyncIterator[ClaimedBatch]:
        """Lock up to ``limit`` pending rows (``FOR UPDATE SKIP LOCKED``) in a transaction that
        lasts as long as the ``async with`` block; marks commit at its end, and any exception
        rolls back and leaves the rows pending. ``owner`` and ``lease`` are not needed here:
        row locks keep relays apart."""
        check_limit("limit", limit)
        async with self._ledger.transaction() as tx:
            rows = await self._claim_rows(tx, limit, skip)
            yield _Batch(self, tx.connection, rows)

    async def _claim_rows(self, tx: MySQLTransaction, limit: int, skip: Skip) -> list[OutboxRow]:
        where = ["state = 'pending'"]
        params: list[Any] = []
        if skip.destinations:
            where.append(f"destination NOT IN ({', '.join(['%s'] * len(skip.destinations))})")
            params += [d.encode() for d in sorted(skip.destinations)]
        for d, k in sorted(skip.keys):
            where.append("NOT (destination = %s AND ordering_key <=> %s)")
            params += [d.encode(), k.encode()]
        if skip.row_ids:
            where.append(f"id NOT IN ({', '.join(['%s'] * len(skip.row_ids))})")
            params += sorted(skip.row_ids)
        claimed = [
            _row(r)
            for r in await tx.fetchall(
                f"SELECT {_SELECT} FROM {self._table} WHERE {' AND '.join(where)} "
                "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                [*params, limit],
            )
        ]
        keyed = sorted({(r.destination, r.key) for r in claimed if r.key is not None})
        if not keyed:
            return claimed
        # earlier pending rows of the claimed keys (a plain read: it also sees rows another
        # relay holds locked); a claimed row behind one the claim does not hold must wait
        pairs = " OR ".join(["(destination = %s AND ordering_key = %s)"] * len(keyed))
        earlier = await tx.fetchall(
            f"SELECT destination, ordering_key, id FROM {self._table} "
            f"WHERE state = 'pending' AND id < %s AND ({pairs})",
            [max(r.id for r in claimed), *[v.encode() for pair in keyed for v in pair]],
        )
        held = {r.id for r in claimed}
        first_missing: dict[tuple[str, str], int] = {}
        for d, k, i in earlier:
            pair = (key_text(d) or "", key_text(k) or "")
            if int(i) not in held:
                first_missing[pair] = min(first_missing.get(pair, int(i)), int(i))
        return [
            r
            for r in claimed
            if r.key is None or first_missing.get((r.destination, r.key), r.id + 1) > r.id
        ]

    async def _mark(self, conn: Connection, row_ids: Sequence[int]) -> int:
        if not row_ids:
            return 0
        ids = sorted({int(i) for i in row_ids})
        _, count = await execute(
            conn,
            f"UPDATE {self._table} SET state = 'published', published_at_broker = %s "
            f"WHERE id IN ({', '.join(['%s'] * len(ids))}) AND state = 'pending'",
            [self.now(), *ids],
        )
        return count

    async def mark_published(self, row_ids: Sequence[int]) -> int:
        if not row_ids:
            return 0
        count: int = await self._ledger._in_tx(
            "outbox mark_published", lambda conn: self._mark(conn, row_ids), begin=False
        )
        return count

    async def pending_count(self) -> int:
        rows, _ = await self._one(
            "pending_count", f"SELECT COUNT(*) FROM {self._table} WHERE state = 'pending'"
        )
        return int(rows[0][0])

    async def oldest_pending_age(self) -> float | None:
        rows, _ = await self._one(
            "oldest_pending_age",
            f"SELECT staged_at FROM {self._table} WHERE state = 'pending' ORDER BY id LIMIT 1",
        )
        return None if not rows else max(0.0, self.now() - float(rows[0][0]))

    async def cleanup(self, published_before: float, limit: int = 1000) -> int:
        check_limit("limit", limit)
        _, count = await self._one(
            "cleanup",
            f"DELETE FROM {self._table} WHERE state = 'published' AND published_at_broker < %s "
            "ORDER BY published_at_broker LIMIT %s",
            (published_before, limit),
        )
        return count

    async def close(self) -> None:
        """Close the ledger when this store built it (:meth:`from_url`); else nothing (the
        ledger is its owner's). Idempotent."""
        if self._owns_ledger:
            await self._ledger.close()


__all__ = ["MySQLOutboxStore"]
