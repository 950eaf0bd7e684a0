"""The sync twin of the PostgreSQL ledger (:class:`SyncPostgresLedger`, from
``PostgresLedger.sync()``), for plain threads: the same options, statements, claim logic, row
decoding and error mapping as the async ledger (:mod:`~replaysafe.stores.postgres.steps`,
:mod:`~replaysafe.stores.postgres.codec`), on psycopg's sync pool."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Self

from replaysafe.errors import ConfigurationError, LeaseLost, LedgerError, LedgerUnavailable
from replaysafe.ledger.base import (
    Claim,
    ClaimOutcome,
    ClaimRequest,
    OpKey,
    QuarantineEntry,
    QuarantineRequest,
    Record,
    entry_from_row,
    storable_text,
)
from replaysafe.stores.postgres.codec import (
    complete_many_outcomes,
    complete_many_params,
    decode_record,
    extended,
    fence_error,
    fence_params,
    get_params,
    mark_started_params,
    marked_claims,
    pack_entry,
)
from replaysafe.stores.postgres.connection import Shared
from replaysafe.stores.postgres.driver import driver, log
from replaysafe.stores.postgres.errors import COMMIT_HINT
from replaysafe.stores.postgres.schema import (
    check_version,
    corrected_now,
    migration_steps,
    open_steps,
)
from replaysafe.stores.postgres.sql import Rows
from replaysafe.stores.postgres.steps import claim_steps, complete_in_steps, drive_on_sync

if TYPE_CHECKING:  # the driver is an optional extra: imported lazily at run time
    from psycopg import Connection, Cursor
    from psycopg_pool import ConnectionPool


class SyncPostgresTransaction:
    """The sync twin's open transaction (:meth:`SyncPostgresLedger.transaction`): the sync mirror
    of :class:`PostgresTransaction`, on one pooled connection, for a plain function's
    ``ctx.tx``.

    Valid only inside its ``with twin.transaction()`` block. Statements use psycopg's
    placeholders (``%s`` or ``%(name)s``). The caller's own SQL errors propagate unchanged
    (``psycopg.errors.UniqueViolation`` …); a connection that died under a statement is
    ``LedgerUnavailable``. After an error PostgreSQL refuses further statements in the same
    transaction: let the exception leave the block, which rolls back.
    """

    def __init__(self, ledger: SyncPostgresLedger, conn: Connection[Any]) -> None:
        self._ledger = ledger
        self._conn = conn
        self._open = True

    @property
    def connection(self) -> Connection[Any]:
        """The psycopg connection (for cursors, COPY …). Do not commit or roll back on it."""
        self._check_open()
        return self._conn

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Cursor[Any]:
        """Run one statement; returns the psycopg cursor (``rowcount``, ``fetchall()`` …).

        The caller's own SQL errors propagate unchanged; a connection that died under the
        statement raises ``LedgerUnavailable``: the transaction is gone, nothing of it
        committed."""
        self._check_open()
        psycopg, _ = driver()
        try:
            return self._conn.execute(sql, params or None)
        except psycopg.Error as exc:
            if self._conn.broken or self._conn.closed:
                raise self._ledger._s.unavailable("transaction statement", exc) from exc
            raise

    def fetchall(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[tuple[Any, ...]]:
        """Run a query inside the transaction and return all rows (none for a statement that
        returns no rows)."""
        cur = self.execute(sql, params)
        if cur.description is None:
            return []
        return [tuple(r) for r in cur.fetchall()]

    def _check_open(self) -> None:
        if not self._open:
            raise LedgerError(
                "this transaction is finished (committed or rolled back); open a new one with "
                "`with twin.transaction() as tx`"
            )

    def __repr__(self) -> str:
        return f"SyncPostgresTransaction({self._ledger!r}, open={self._open})"


class SyncPostgresLedger:
    """The sync twin of a :class:`PostgresLedger` (``PostgresLedger.sync()``), for plain threads
    (a sync :class:`~replaysafe.Guard`, thread-pool consumers, Celery, Django).

    The same options (DSN, schema, table prefix, pool sizes, timeouts, ``auto_migrate``), the same
    statements, the same claim logic (:func:`claim_steps`), row decoding and error mapping as the
    async ledger; each call runs in the caller's thread on psycopg's sync
    ``psycopg_pool.ConnectionPool`` (autocommit: one statement, one round trip, one commit per
    call). Safe from several threads at once: each call takes its own pooled connection.

    Opens on first use (or :meth:`open`): the pool, the clock offset, the schema check (or the
    migration with ``auto_migrate``). :meth:`close` closes its pool; the async ledger it came from
    is independent of it (closing one leaves the other open).

    Transactional, as the async ledger: :meth:`transaction` and :meth:`complete_in` commit a
    plain function's business rows and the ledger row together.
    """

    #: business rows and the ledger row can commit together (:meth:`transaction`)
    transactional: ClassVar[bool] = True

    def __init__(self, shared: Shared) -> None:
        psycopg, pool_mod = driver()  # MissingExtra now, not at the first claim
        self._s = shared
        self._sql = shared.sql
        self._errors: tuple[type[BaseException], ...] = (psycopg.Error, UnicodeEncodeError)
        self._pool_timeout: type[BaseException] = pool_mod.PoolTimeout
        self._pool: ConnectionPool[Any] | None = None
        self._open_lock = threading.Lock()
        self._closed = False
        self._clock_offset = 0.0
        #: threads inside one of this twin's transactions (see _guard); set.add/discard are
        #: atomic, and the hot path only tests the set for emptiness
        self._tx_threads: set[int] = set()

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Open the pool, measure the clock offset and check (or, with ``auto_migrate``, create)
        the schema. Idempotent; every other call opens lazily."""
        self._ensure_ready()

    def close(self) -> None:
        """Close this twin's pool; idempotent. Later calls raise ``LedgerUnavailable``."""
        with self._open_lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=5.0)

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> float:
        """Local time corrected by the offset to the database clock measured at open. For
        display and nack delays only: leases are judged by the database in every statement."""
        return corrected_now(self._clock_offset)

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return (
            f"SyncPostgresLedger({self._s.redacted!r}, schema={self._s.schema!r}, "
            f"table_prefix={self._s.prefix!r}{state})"
        )

    # ------------------------------------------------------------------ ledger API

    def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        """:meth:`PostgresLedger.claim`, in the caller's thread."""
        self._guard("claim")
        return self._claim_all([ClaimRequest(key, fingerprint, owner, lease)])[0]

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        """:meth:`PostgresLedger.claim_many`, in the caller's thread."""
        self._guard("claim_many")
        if not requests:
            self._check_open()
            return []
        return self._claim_all(list(requests))

    def extend(self, claim: Claim, lease: float) -> Claim:
        """:meth:`PostgresLedger.extend`, in the caller's thread."""
        self._guard("extend")
        rows = self._fetch("extend", self._sql("extend"), fence_params(claim, lease=lease))
        if not rows:
            raise self._lease_lost(claim)
        return extended(claim, rows[0][0])

    def complete(self, claim: Claim, result: str | None = None) -> Record:
        """:meth:`PostgresLedger.complete`, in the caller's thread."""
        self._guard("complete")
        rows = self._fetch("complete", self._sql("complete"), fence_params(claim, result=result))
        if not rows:
            raise self._lease_lost(claim)
        return decode_record(rows[0])

    def complete_many(self, items: Sequence[tuple[Claim, str | None]]) -> list[Record | LeaseLost]:
        """:meth:`PostgresLedger.complete_many`, in the caller's thread."""
        self._guard("complete_many")
        if not items:
            self._check_open()
            return []
        if len(items) == 1:  # the single-row statement, as PostgresLedger.complete_many
            claim, result = items[0]
            one = self._fetch(
                "complete_many", self._sql("complete"), fence_params(claim, result=result)
            )
            return [decode_record(one[0]) if one else self._lease_lost(claim)]
        rows = self._fetch(
            "complete_many", self._sql("complete_many"), complete_many_params(items), binary=True
        )
        return complete_many_outcomes(items, rows)

    def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        """:meth:`PostgresLedger.mark_started`, in the caller's thread."""
        self._guard("mark_started")
        if not claims:
            self._check_open()
            return []
        rows = self._fetch(
            "mark_started", self._sql("mark_started"), mark_started_params(claims), binary=True
        )
        return [
            marked if marked is not None else self._lease_lost(c)
            for c, marked in zip(claims, marked_claims(claims, rows), strict=True)
        ]

    def release(self, claim: Claim, error: str | None = None) -> None:
        """:meth:`PostgresLedger.release`, in the caller's thread."""
        self._guard("release")
        rows = self._fetch(
            "release", self._sql("release"), fence_params(claim, error=storable_text(error))
        )
        if not rows:
            raise self._lease_lost(claim)

    def quarantine(self, request: QuarantineRequest, claim: Claim | None = None) -> QuarantineEntry:
        """:meth:`PostgresLedger.quarantine`, in the caller's thread."""
        self._guard("quarantine")
        entry_params = pack_entry(request.storable())
        if claim is None:
            rows = self._fetch("quarantine", self._sql("upsert_entry"), entry_params)
            return entry_from_row(rows[0])
        rows = self._fetch(
            "quarantine",
            self._sql("quarantine_claimed"),
            {**entry_params, **fence_params(claim)},
        )
        if not rows:  # the fence refused: neither the record nor the entry was written
            raise self._lease_lost(claim)
        return entry_from_row(rows[0])

    def get(self, key: OpKey) -> Record | None:
        """:meth:`PostgresLedger.get`, in the caller's thread."""
        rows = self._fetch("get", self._sql("get"), get_params(key))
        return decode_record(rows[0]) if rows else None

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def transaction(self) -> Iterator[SyncPostgresTransaction]:
        """:meth:`PostgresLedger.transaction` in the caller's thread: ``BEGIN`` … ``COMMIT`` on
        one pooled connection, ``ROLLBACK`` on any exception (``KeyboardInterrupt`` included).
        Several threads may each hold one at once, up to ``max_size`` connections.

        A failed ``COMMIT`` is ``LedgerUnavailable`` with the outcome unknown (the next claim
        resolves it: ``AlreadyDone`` if it committed), or ``LedgerDataError`` when the server
        refused the block's own rows at commit (a deferred constraint): rolled back. Inside the
        block use ``tx`` and :meth:`complete_in`; this twin's other write calls from the same
        thread are refused with ``ConfigurationError`` (they would wait on the transaction's own
        row locks, or on its pooled connection).
        """
        self._guard("transaction")
        pool = self._pool if self._pool is not None else self._ensure_ready()
        s = self._s
        try:
            conn = pool.getconn(s.acquire_timeout)
        except self._pool_timeout as exc:  # first: PoolTimeout is a psycopg.OperationalError
            raise s.pool_exhausted() from exc
        except self._errors as exc:
            raise s.unavailable("transaction", exc) from exc
        me = threading.get_ident()
        tx = SyncPostgresTransaction(self, conn)
        try:
            try:
                conn.execute("BEGIN")
            except self._errors as exc:
                raise s.unavailable("transaction", exc) from exc
            self._tx_threads.add(me)
            try:
                yield tx
            except BaseException as exc:
                tx._open = False
                problem = self._rollback(conn)
                if problem is not None:
                    exc.add_note(problem)
                raise
            tx._open = False
            try:
                conn.execute("COMMIT")
            except self._errors as exc:
                raise s.error("commit", exc, COMMIT_HINT) from exc
        finally:
            tx._open = False
            self._tx_threads.discard(me)
            # the pool rolls back anything left open and discards a broken connection
            pool.putconn(conn)
            if conn.broken:
                self._flush_dead_connections(pool)

    def complete_in(self, tx: object, claim: Claim, result: str | None = None) -> None:
        """:meth:`PostgresLedger.complete_in` in the caller's thread: fence and mark the claim
        completed inside ``tx``, so it commits with the business rows. ``LeaseLost`` when the
        token is stale: let it leave the block so it rolls back. ``ConfigurationError`` for a
        transaction this twin did not open."""
        if not isinstance(tx, SyncPostgresTransaction) or tx._ledger is not self:
            raise ConfigurationError(
                "complete_in() needs a transaction opened by this twin's transaction(); a "
                "transaction of another database (or another twin's pool) cannot commit this "
                "ledger's row"
            )
        tx._check_open()
        try:
            lost = drive_on_sync(tx._conn, complete_in_steps(self._s, claim, result))
        except self._errors as exc:
            raise self._s.error("complete_in", exc) from exc
        if lost is not None:
            raise lost

    # ------------------------------------------------------------------ plumbing

    def _guard(self, what: str) -> None:
        """Refuse a write from inside this thread's own open transaction (it would wait forever
        on that transaction's row locks). Costs one emptiness test when no transaction is open."""
        if self._tx_threads and threading.get_ident() in self._tx_threads:
            raise ConfigurationError(
                f"{what} on {self!r} from inside its own open transaction() could wait on that "
                "transaction's row locks forever; use tx.execute()/complete_in(tx, ...) inside "
                "the block, or call it after the block"
            )

    def _rollback(self, conn: Connection[Any]) -> str | None:
        """Roll back; never raises (the caller is already propagating the real error)."""
        try:
            conn.execute("ROLLBACK")
        except self._errors as exc:
            # a broken connection has no transaction left to roll back; the pool discards it
            return f"rollback failed ({self._s.scrub(str(exc))}); the connection is discarded"
        return None

    def _claim_all(self, requests: list[ClaimRequest]) -> list[ClaimOutcome]:
        """Run :func:`claim_steps`, each statement on a pooled connection."""
        steps = claim_steps(self._s, requests)
        rows: Any = None  # a generator's first send must be None
        while True:
            try:
                query, params = steps.send(rows)
            except StopIteration as done:
                outcomes: list[ClaimOutcome] = done.value
                return outcomes
            rows = self._fetch("claim", query, params, binary=True)

    def _lease_lost(self, claim: Claim) -> LeaseLost:
        """The ``LeaseLost`` for a fenced write that changed no row, saying what the record is."""
        try:
            current = self.get(claim.key)
        except LedgerUnavailable:
            current = None
        return fence_error(current, claim)

    def _fetch(self, action: str, query: bytes, params: Any, *, binary: bool = False) -> Rows:
        """One statement on a pooled autocommit connection; all rows (see
        :meth:`PostgresLedger._fetch`)."""
        pool = self._pool if self._pool is not None else self._ensure_ready()
        try:
            # getconn/putconn, not pool.connection(): its `with conn` commit check is a no-op in
            # autocommit and cost about 10% of the twin's CPU per claim + complete (measured)
            conn = pool.getconn(self._s.acquire_timeout)
        except self._pool_timeout as exc:
            raise self._s.pool_exhausted() from exc
        try:
            rows: Rows = conn.execute(query, params, binary=binary).fetchall()
        except self._errors as exc:
            pool.putconn(conn)  # a broken connection is discarded and replaced by the pool
            if conn.broken:
                self._flush_dead_connections(pool)
            raise self._s.error(action, exc) from exc
        except BaseException:
            pool.putconn(conn)
            raise
        pool.putconn(conn)
        return rows

    def _flush_dead_connections(self, pool: ConnectionPool[Any]) -> None:
        """A pooled connection broke: check the idle ones now (see
        :meth:`PostgresLedger._flush_dead_connections`), so the next call gets a live one."""
        try:
            pool.check()
        except Exception:  # the caller is raising its own error
            log.debug("pool check after a broken connection failed", exc_info=True)

    def _check_open(self) -> None:
        if self._closed:
            raise self._s.closed(repr(self))

    def _ensure_ready(self) -> ConnectionPool[Any]:
        with self._open_lock:
            self._check_open()
            if self._pool is None:
                self._pool = self._open_pool()
            return self._pool

    def _open_pool(self) -> ConnectionPool[Any]:
        """A pool that reached the server, on a schema at :data:`SCHEMA_VERSION` (migrated first
        with ``auto_migrate``), with the clock offset measured; closed again on any failure."""
        s = self._s
        psycopg, pool_mod = driver()
        s.check_dsn()
        pool: ConnectionPool[Any] = pool_mod.ConnectionPool(**s.pool_args())
        problem: str | None = None
        try:
            pool.open(wait=s.min_size > 0, timeout=s.connect_timeout)
            if s.min_size == 0:  # prove the server answers at all
                with pool.connection(timeout=s.connect_timeout) as conn:
                    conn.execute("SELECT 1")
        except (psycopg.Error, pool_mod.PoolTimeout) as exc:
            # scrubbed, and not chained: the driver's text may echo the connection string
            problem = s.problem(exc)
        if problem is not None:
            pool.close(timeout=1.0)
            raise s.no_connection(self._why_no_connection() or problem)
        try:
            self._clock_offset = self._prepare(pool)
        except BaseException:
            pool.close(timeout=1.0)
            raise
        return pool

    def _prepare(self, pool: ConnectionPool[Any]) -> float:
        """Migrate (with ``auto_migrate``), check the schema version; the clock offset."""
        s = self._s
        try:
            if s.auto_migrate:
                try:
                    with pool.connection(timeout=s.acquire_timeout) as conn, conn.transaction():
                        drive_on_sync(conn, migration_steps(s))
                except self._pool_timeout as exc:
                    raise s.pool_exhausted() from exc
                except self._errors as exc:
                    raise s.unavailable("migrate", exc) from exc
            with pool.connection(timeout=s.acquire_timeout) as conn:
                offset, version = drive_on_sync(conn, open_steps(s))
        except self._pool_timeout as exc:
            raise s.pool_exhausted() from exc
        except self._errors as exc:
            raise s.unavailable("open", exc) from exc
        check_version(s, version)
        return offset

    def _why_no_connection(self) -> str | None:
        psycopg, _ = driver()
        try:
            conn = psycopg.Connection.connect(
                self._s.dsn, connect_timeout=self._s.libpq_connect_timeout()
            )
        except psycopg.Error as exc:
            return self._s.problem(exc)
        conn.close()
        return None
