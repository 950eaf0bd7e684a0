"""PostgreSQL ledger: psycopg 3 (async) on a connection pool, for many workers on many machines.

How it stays correct:

- **Claims are one statement.** ``INSERT … ON CONFLICT (scope, operation_id) DO UPDATE … WHERE``
  *takeover is allowed* (``released``, or ``in_flight`` with an expired lease) *and the fingerprint
  matches*. PostgreSQL decides under the row lock; the same statement reads the existing row when
  nothing was written and the answer (``InFlight`` / ``AlreadyDone`` / ``Conflict`` /
  ``Quarantined``) is classified by :func:`~replaysafe.ledger.base.decide_claim`, the one state
  machine every backend shares.
- **Leases are judged by the database clock** (``clock_timestamp()``), never by a worker's clock.
  :meth:`PostgresLedger.now` is the local clock corrected by the offset measured at ``open()``:
  it is for display and nack delays only.
- **Fencing tokens come from one sequence** (``CACHE 1``: a per-session cache would hand out
  values out of order across connections). A takeover draws its token *after* taking the row lock,
  so the new token is greater than the token it replaces; a first insert draws it while forming the
  row, so a claim that finds an existing row may burn a value. Tokens strictly increase; they are
  not dense.
- **Fenced writes** (extend, complete, release, quarantine with a claim, complete_in) are
  ``UPDATE … WHERE scope, operation_id, token AND state = 'in_flight'``; zero rows is ``LeaseLost``
  and nothing changed.
- **Batch forms are one statement each** (arrays through ``unnest``), so one round trip and one
  commit serve a whole batch.
- **Identifiers** (schema, table prefix) are validated against a strict pattern and composed only
  with :class:`psycopg.sql.Identifier`; keys, payloads and results are always bound parameters.
- **Secrets**: the DSN's password never appears in ``repr``, log lines or error messages.
- **A sync twin** (:meth:`PostgresLedger.sync`, :class:`SyncPostgresLedger`) serves plain
  threads with psycopg's sync pool. The statements, options and error mapping live in one
  ``Shared`` object both hold; the logic of more than one statement (claim planning and race
  retries, migration, the open check) is written once as sans-IO steps each flavour drives, and
  the single-statement calls share pure pack and decode functions.

What a caller can lose or see twice: a call whose connection died mid-statement (server restart,
``pg_terminate_backend``, network cut, failover) raises ``LedgerUnavailable`` and *may or may not
have committed*. That is never unsafe: an unknown claim is answered ``InFlight`` until its lease
expires and is then taken over with ``recovered=True``; an unknown completion is found by the next
claim as ``AlreadyDone``. After such an error the caller must not complete at the broker, exactly
as after ``LeaseLost``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from replaysafe._url import flag, take_options
from replaysafe.ledger.base import TransactionalLedger
from replaysafe.stores.postgres.admin import PostgresAdmin
from replaysafe.stores.postgres.claims import PostgresClaims
from replaysafe.stores.postgres.controls import PostgresControls
from replaysafe.stores.postgres.quarantine import PostgresQuarantine
from replaysafe.stores.postgres.sync import SyncPostgresLedger
from replaysafe.stores.postgres.transaction import PostgresTransactions

#: PostgresLedger.from_url: the ledger's own query parameters (the rest is libpq's)
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "schema": str, "table_prefix": str, "min_size": int, "max_size": int,
    "acquire_timeout": float, "auto_migrate": flag,
}  # fmt: skip


class PostgresLedger(
    PostgresClaims,
    PostgresQuarantine,
    PostgresControls,
    PostgresAdmin,
    PostgresTransactions,
    TransactionalLedger,
):
    """The replay ledger in PostgreSQL. See the module docstring for the design.

    ``dsn`` is a libpq connection string or URL. ``schema`` and ``table_prefix`` name where the
    ledger lives (validated; tables ``<prefix>operations``, ``<prefix>quarantine``,
    ``<prefix>paused``, sequence ``<prefix>token_seq``, ``<prefix>schema_version``). The pool
    holds ``min_size`` to ``max_size`` connections; ``connect_timeout`` bounds opening one,
    ``acquire_timeout`` bounds waiting for a free one. Connections run in autocommit: every
    ledger call is one statement, one round trip, one commit.

    The schema is created by :meth:`migrate` (or ``replaysafe ledger migrate``); with
    ``auto_migrate=True`` :meth:`open` runs it. Without it, ``open`` refuses a missing or older
    schema with ``ConfigurationError`` naming the command to run.

    The pool opens on first use, or explicitly with :meth:`open` / ``async with``.
    """

    @classmethod
    def from_url(cls, url: str, **opts: Any) -> PostgresLedger:
        """The ledger at ``url``: a libpq URL (or ``key=value`` DSN) whose query may also carry
        the ledger's own options ``schema``, ``table_prefix``, ``min_size``, ``max_size``,
        ``acquire_timeout`` and ``auto_migrate`` (``1``/``0``), taken out before libpq sees
        it; ``opts`` (the constructor's keyword arguments) win over the URL."""
        dsn, options = take_options(url, _URL_OPTIONS, what="PostgreSQL ledger")
        return cls(dsn, **{**options, **opts})

    def sync(self) -> SyncPostgresLedger:
        """The sync twin (:class:`SyncPostgresLedger`): the same DSN, schema, table prefix, pool
        sizes, timeouts and ``auto_migrate``, its own sync connection pool, for plain threads.
        Each call returns a new one that opens on first use; close it. Raises
        ``LedgerUnavailable`` when this ledger is closed."""
        if self._closed:
            self._guard("sync")
        return SyncPostgresLedger(self._s)
