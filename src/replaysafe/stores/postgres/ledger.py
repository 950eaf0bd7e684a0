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
  ``_Shared`` object both hold; the logic of more than one statement (claim planning and race
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

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, ClassVar, Final, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from replaysafe._url import flag, take_options
from replaysafe.errors import (
    ConfigurationError,
    LeaseLost,
    LedgerDataError,
    LedgerError,
    LedgerUnavailable,
    MissingExtra,
)
from replaysafe.ledger._fast import new_acquired, new_claim, new_record
from replaysafe.ledger.base import (
    Acquired,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    LedgerSummary,
    OpKey,
    PauseState,
    QuarantineEntry,
    QuarantineRequest,
    Record,
    State,
    Transaction,
    TransactionalLedger,
    check_fence,
    check_handler_name,
    decide_claim,
    entry_from_row,
    pause_text,
    storable_text,
    unknown_entry,
)
from replaysafe.ledger.durability import Durability, assess_postgres
from replaysafe.quarantine import QuarantineReason

if TYPE_CHECKING:  # the driver is an optional extra: imported lazily at run time
    from psycopg import AsyncConnection, AsyncCursor, Connection, Cursor
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

log = logging.getLogger("replaysafe.ledger.postgres")

T = TypeVar("T")

#: the version :meth:`PostgresLedger.migrate` brings a schema to (see ``_MIGRATIONS``)
SCHEMA_VERSION: Final = 4

#: schema names: lower case, so they never need quoting rules explained; 63 bytes is PostgreSQL's
#: identifier limit. ``pg_`` is reserved for system schemas.
SCHEMA_PATTERN: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
#: table prefixes: the longest table name (prefix + "schema_version") must stay within 63 bytes
PREFIX_PATTERN: Final = re.compile(r"[a-z_][a-z0-9_]{0,39}")

#: rows deleted per statement by :meth:`PostgresLedger.purge` (each statement commits on its own,
#: so no lock is held longer than one small batch takes)
PURGE_BATCH: Final = 1000

#: how often a claim is re-run when a concurrent transaction committed the row between this
#: statement's snapshot and its conflict check (rare: it needs two claims of one new key at once)
CLAIM_RACE_RETRIES: Final = 5

_STATES: Final = {s.value: s for s in State}


# ---------------------------------------------------------------------- DSN redaction


_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:\\.|[^'\\])*'|\S+)", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"((?:^|&)password=)[^&]*", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """``dsn`` with its password replaced by ``***`` (URL or ``key=value`` form).

    >>> redact_dsn("postgresql://app:s3cret@db:5432/orders")
    'postgresql://app:***@db:5432/orders'
    >>> redact_dsn("host=db user=app password='s e c' dbname=orders")
    'host=db user=app password=*** dbname=orders'
    """
    if "://" not in dsn:
        return _KV_PASSWORD.sub(r"\1***", dsn)
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable DSN>"
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostinfo}" if colon else parts.netloc
    else:
        netloc = parts.netloc
    query = _QUERY_PASSWORD.sub(r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secrets(dsn: str) -> list[str]:
    """Every spelling of the DSN's password, to scrub from driver messages."""
    found: list[str] = []
    if "://" in dsn:
        try:
            parts = urlsplit(dsn)
        except ValueError:
            return [dsn]  # cannot tell where the password is: scrub the whole DSN
        if parts.password:
            found.append(parts.password)
        found += [m.group(0).split("=", 1)[1] for m in _QUERY_PASSWORD.finditer(parts.query)]
    else:
        found += [m.group(2).strip("'") for m in _KV_PASSWORD.finditer(dsn)]
    from urllib.parse import unquote

    found += [unquote(s) for s in found]
    return [s for s in dict.fromkeys(found) if len(s) >= 1]


# ---------------------------------------------------------------------- SQL

# Timestamps are stored as timestamptz and returned as POSIX seconds (float8). date_part returns
# float8 directly (extract() returns numeric, which is slower to produce and to parse).
_REC_COLUMNS: Final = (
    "scope",
    "operation_id",
    "fingerprint",
    "state",
    "token",
    "owner",
    "date_part('epoch', {a}.lease_until)",
    "attempts",
    "result",
    "last_error",
    "date_part('epoch', {a}.created_at)",
    "date_part('epoch', {a}.updated_at)",
    "date_part('epoch', {a}.completed_at)",
    "unstarted_attempt",
)
_REC_NAMES: Final = (
    "scope",
    "operation_id",
    "fingerprint",
    "state",
    "token",
    "owner",
    "lease_until",
    "attempts",
    "result",
    "last_error",
    "created_at",
    "updated_at",
    "completed_at",
    "unstarted_attempt",
)


def _rec(alias: str, *, named: bool = False) -> str:
    """The record columns of table alias ``alias`` in :func:`_record` order."""
    cols = []
    for expr, name in zip(_REC_COLUMNS, _REC_NAMES, strict=True):
        e = expr.format(a=alias) if "{a}" in expr else f"{alias}.{expr}"
        cols.append(f"{e} AS {name}" if named else e)
    return ", ".join(cols)


_ENTRY_COLUMNS: Final = (
    "id, scope, reason, operation_id, fingerprint, risk, attempts, first_detail, last_detail, "
    "message, content_type, date_part('epoch', created_at) AS created_at, "
    "date_part('epoch', updated_at) AS updated_at, seen, "
    "date_part('epoch', published_at) AS published_at, message_size, "
    "date_part('epoch', redriven_at) AS redriven_at, redrives"
)

#: quarantine columns added by version 2 (reported by ``migrate`` when it adds them)
_V2_QUARANTINE_COLUMNS: Final = ("published_at", "message_size", "redriven_at", "redrives")
#: operation columns added by version 4 (reported by ``migrate`` when it adds them)
_V4_OPERATION_COLUMNS: Final = ("unstarted_attempt", "previous_started")

_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: (
        # The key is the composite (scope, operation_id): ("a:b", "c") and ("a", "b:c") never
        # collide. `recovered` remembers whether the current claim took over an expired lease
        # (PostgreSQL 15's RETURNING cannot see the row's previous state).
        """CREATE TABLE IF NOT EXISTS {ops} (
            scope        text        NOT NULL,
            operation_id text        NOT NULL,
            fingerprint  text        NOT NULL,
            state        text        NOT NULL
                CHECK (state IN ('in_flight', 'released', 'completed', 'quarantined')),
            token        bigint      NOT NULL,
            owner        text,
            lease_until  timestamptz,
            attempts     integer     NOT NULL,
            recovered    boolean     NOT NULL DEFAULT false,
            result       text,
            last_error   text,
            created_at   timestamptz NOT NULL,
            updated_at   timestamptz NOT NULL,
            completed_at timestamptz,
            PRIMARY KEY (scope, operation_id)
        )""",
        # purge walks only completed rows, oldest first: a partial index stays small relative to
        # the table's churn and keeps purge an index scan at tens of millions of rows
        """CREATE INDEX IF NOT EXISTS {purge_idx} ON {ops} (completed_at)
            WHERE state = 'completed'""",
        # CACHE 1 (the default, spelled out): cached ranges per session would issue tokens out
        # of order across connections, and fencing needs them to increase
        "CREATE SEQUENCE IF NOT EXISTS {seq} AS bigint MINVALUE 1 CACHE 1 NO CYCLE",
        """CREATE TABLE IF NOT EXISTS {q} (
            id           text        PRIMARY KEY,
            scope        text        NOT NULL,
            reason       text        NOT NULL,
            operation_id text,
            fingerprint  text,
            risk         text        NOT NULL,
            attempts     integer     NOT NULL,
            first_detail text        NOT NULL,
            last_detail  text        NOT NULL,
            message      bytea       CHECK (octet_length(message) <= 65536),
            content_type text,
            created_at   timestamptz NOT NULL,
            updated_at   timestamptz NOT NULL,
            seen         integer     NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS {q_by_time} ON {q} (created_at, id)",
        "CREATE INDEX IF NOT EXISTS {q_by_reason} ON {q} (reason, created_at, id)",
    ),
    2: (
        # inspect and redrive: the publish time (checked against the horizon before a redrive),
        # the original message size (the copy is capped) and the redrive history. Constant
        # defaults: PostgreSQL 11+ adds these without rewriting the table.
        """ALTER TABLE {q}
            ADD COLUMN IF NOT EXISTS published_at timestamptz,
            ADD COLUMN IF NOT EXISTS message_size integer NOT NULL DEFAULT 0,
            ADD COLUMN IF NOT EXISTS redriven_at  timestamptz,
            ADD COLUMN IF NOT EXISTS redrives     integer NOT NULL DEFAULT 0""",
        # older entries: the original size is unknown, the stored copy's length is a lower bound
        # (and keeps message_size >= length of the copy, which `truncated` relies on)
        """UPDATE {q} SET message_size = octet_length(message)
            WHERE message IS NOT NULL AND message_size = 0""",
        # summary()'s hot operations: only retried rows (attempts > 1) are indexed, so the index
        # stays small, a first claim never touches it and extend stays a HOT update. "C" order
        # for ties is code-point order, the same as every other backend.
        """CREATE INDEX IF NOT EXISTS {hot_idx}
            ON {ops} (attempts DESC, scope COLLATE "C", operation_id COLLATE "C")
            WHERE attempts > 1""",
    ),
    3: (
        # handler control: one row per paused handler (no row: running), read by every worker
        # about once a second (a handful of rows: a sequential scan is the cheapest plan)
        """CREATE TABLE IF NOT EXISTS {paused} (
            handler   text        PRIMARY KEY,
            reason    text        NOT NULL,
            paused_by text        NOT NULL,
            since     timestamptz NOT NULL
        )""",
    ),
    4: (
        # mark_started: `unstarted_attempt` is the attempt of a claim made with marks_start whose
        # effect has not been marked started (NULL: none pending; older rows are NULL, which a
        # recovering claim reads as "may have started"); `previous_started` is what the current
        # claim learned about the holder it took over (RETURNING sees only the new row, as with
        # `recovered`). Nullable / constant default: added without rewriting the table.
        """ALTER TABLE {ops}
            ADD COLUMN IF NOT EXISTS unstarted_attempt integer,
            ADD COLUMN IF NOT EXISTS previous_started  boolean NOT NULL DEFAULT true""",
    ),
}

_OBJECTS: Final = {  # object key -> table suffix, for names and for "what was created"
    "ops": "operations",
    "q": "quarantine",
    "seq": "token_seq",
    "version": "schema_version",
    "purge_idx": "operations_purge",
    "q_by_time": "quarantine_by_time",
    "q_by_reason": "quarantine_by_reason",
    "hot_idx": "operations_hot",
    "paused": "paused",
}

_INDEXES: Final = frozenset({"purge_idx", "q_by_time", "q_by_reason", "hot_idx"})

# A claim's requests: one row per (deduplicated) request, `ord` its position. Arrays travel in
# binary (%b): psycopg's text array dumper quotes every element with a regex, which cost more
# than the whole statement at batch 100.
_REQ_ONE: Final = """
    SELECT %(scope)s::text AS scope, %(op)s::text AS operation_id, %(fp)s::text AS fingerprint,
           %(owner)s::text AS owner, %(lease)s::float8 AS lease, %(marks)s::boolean AS marks,
           1::bigint AS ord"""
_REQ_MANY: Final = """
    SELECT * FROM unnest(%(scope)b::text[], %(op)b::text[], %(fp)b::text[], %(owner)b::text[],
                         %(lease)b::float8[], %(marks)b::bool[])
        WITH ORDINALITY AS r(scope, operation_id, fingerprint, owner, lease, marks, ord)"""

# The claim: write when a takeover is allowed, else read the row as it was. The insert path's
# lease starts at statement_timestamp(); a takeover's lease starts at clock_timestamp() after the
# row lock was taken (the takeover check itself uses the same fresh clock). The lease length is
# recovered on the conflict path as excluded.lease_until - excluded.created_at. A request's
# marks_start travels as the insert's unstarted_attempt (1 or NULL); a takeover writes its own
# attempt there instead (NULL when it took over an attempt that may have started: that stays
# unknown), and records in previous_started whether the holder it took over had marked its
# effect started (ledger.base.previous_started, decide_claim).
_CLAIM: Final = """
WITH req AS ({req}),
ins AS (
    INSERT INTO {ops} AS o (scope, operation_id, fingerprint, state, token, owner, lease_until,
                            attempts, recovered, created_at, updated_at, unstarted_attempt,
                            previous_started)
    SELECT r.scope, r.operation_id, r.fingerprint, 'in_flight', nextval({seq_lit}), r.owner,
           statement_timestamp() + r.lease * interval '1 second', 1, false,
           statement_timestamp(), statement_timestamp(), CASE WHEN r.marks THEN 1 END, true
    FROM req r ORDER BY r.ord
    ON CONFLICT (scope, operation_id) DO UPDATE SET
        state = 'in_flight',
        token = nextval({seq_lit}),
        owner = excluded.owner,
        lease_until = clock_timestamp() + (excluded.lease_until - excluded.created_at),
        attempts = o.attempts + 1,
        recovered = (o.state = 'in_flight'),
        unstarted_attempt = CASE WHEN excluded.unstarted_attempt IS NOT NULL
                                      AND (o.state <> 'in_flight'
                                           OR o.unstarted_attempt IS NOT DISTINCT FROM o.attempts)
                                 THEN o.attempts + 1 END,
        previous_started = (o.state <> 'in_flight'
                            OR o.unstarted_attempt IS DISTINCT FROM o.attempts),
        result = NULL,
        completed_at = NULL,
        updated_at = statement_timestamp()
    WHERE o.fingerprint = excluded.fingerprint
      AND (o.state = 'released' OR (o.state = 'in_flight' AND o.lease_until <= clock_timestamp()))
    RETURNING {ins_cols}, o.recovered AS recovered, o.previous_started AS previous_started
)
SELECT r.ord, true, {i_cols}, i.recovered, NULL::float8, i.previous_started
FROM ins i JOIN req r ON r.scope = i.scope AND r.operation_id = i.operation_id
UNION ALL
SELECT r.ord, false, {e_cols}, false, date_part('epoch', clock_timestamp()), true
FROM req r LEFT JOIN {ops} e ON e.scope = r.scope AND e.operation_id = r.operation_id
WHERE NOT EXISTS (SELECT 1 FROM ins i WHERE i.scope = r.scope AND i.operation_id = r.operation_id)
"""

# What an acquired claim returns: what the caller does not already know. The requester knows the
# key, fingerprint and owner, and the state (in_flight), result and completed_at (NULL) of a
# row it just claimed; the other record columns come back as typed NULLs, so every row of the
# statement keeps one layout (ord, written, the 14 record columns, recovered, db_now,
# previous_started) and a refused row still carries its whole record. Fewer columns: less for
# the server to produce and send, less for the client to parse (the record is rebuilt only
# where it is needed).
_ACQUIRED_RETURNING: Final = (
    "o.scope, o.operation_id, o.token, date_part('epoch', o.lease_until) AS lease_until, "
    "o.attempts, o.last_error, date_part('epoch', o.created_at) AS created_at, "
    "date_part('epoch', o.updated_at) AS updated_at, o.unstarted_attempt"
)
_ACQUIRED_COLUMNS: Final = (
    "NULL::text, NULL::text, NULL::text, NULL::text, i.token, NULL::text, i.lease_until, "
    "i.attempts, NULL::text, i.last_error, i.created_at, i.updated_at, NULL::float8, "
    "i.unstarted_attempt"
)
# The same for a completed item of complete_many: with the token current, the key,
# fingerprint, owner and attempts are the claim's (only a claim, which draws a new token,
# rewrites them), the state is completed, the result is the caller's and the lease NULL.
_COMPLETED_RETURNING: Final = (
    "o.last_error, date_part('epoch', o.created_at) AS created_at, "
    "date_part('epoch', o.updated_at) AS updated_at, o.unstarted_attempt"
)
_COMPLETED_COLUMNS: Final = (
    "NULL::text, NULL::text, NULL::text, NULL::text, NULL::int8, NULL::text, NULL::float8, "
    "NULL::int4, NULL::text, u.last_error, u.created_at, u.updated_at, u.updated_at, "
    "u.unstarted_attempt"
)

# fenced writes name the claim's key with their own parameters, so a statement can also carry an
# entry's (scope, op) without the two being confused
_FENCE: Final = (
    "scope = %(f_scope)s AND operation_id = %(f_op)s AND token = %(f_token)s "
    "AND state = 'in_flight'"
)

_COMPLETE: Final = """
UPDATE {ops} o SET state = 'completed', result = %(result)s, lease_until = NULL,
                   updated_at = statement_timestamp(), completed_at = statement_timestamp()
WHERE {fence}
RETURNING {rec}"""

# complete_many: the first item per (key, token) may win; later copies and stale tokens lose,
# exactly as sequential completes would. Rows not updated come back as they were (snapshot), so
# LeaseLost can say what the record is.
_COMPLETE_MANY: Final = """
WITH req AS (
    SELECT * FROM unnest(%(scope)b::text[], %(op)b::text[], %(token)b::int8[], %(result)b::text[])
        WITH ORDINALITY AS r(scope, operation_id, token, result, ord)
),
items AS (
    SELECT DISTINCT ON (scope, operation_id, token) * FROM req
    ORDER BY scope, operation_id, token, ord
),
upd AS (
    UPDATE {ops} o SET state = 'completed', result = items.result, lease_until = NULL,
                       updated_at = statement_timestamp(), completed_at = statement_timestamp()
    FROM items
    WHERE o.scope = items.scope AND o.operation_id = items.operation_id
      AND o.token = items.token AND o.state = 'in_flight'
    RETURNING items.ord AS ord, {upd_cols}
)
SELECT u.ord, true, {u_cols} FROM upd u
UNION ALL
SELECT r.ord, false, {e_cols}
FROM req r LEFT JOIN {ops} e ON e.scope = r.scope AND e.operation_id = r.operation_id
WHERE NOT EXISTS (SELECT 1 FROM upd u WHERE u.ord = r.ord)
"""

# mark_started: one statement for the batch, fenced per item; the items it changed come back
# (a claim repeated in the batch matches the same row: it is marked once and counts for both)
_MARK_STARTED: Final = """
WITH req AS (
    SELECT * FROM unnest(%(scope)b::text[], %(op)b::text[], %(token)b::int8[])
        AS r(scope, operation_id, token)
)
UPDATE {ops} o SET unstarted_attempt = NULL
FROM req
WHERE o.scope = req.scope AND o.operation_id = req.operation_id AND o.token = req.token
  AND o.state = 'in_flight'
RETURNING o.scope, o.operation_id, o.token"""

_EXTEND: Final = """
UPDATE {ops} SET lease_until = clock_timestamp() + %(lease)s::float8 * interval '1 second'
WHERE {fence}
RETURNING date_part('epoch', lease_until)"""

_RELEASE: Final = """
UPDATE {ops} SET state = 'released', lease_until = NULL, last_error = %(error)s,
                 updated_at = statement_timestamp()
WHERE {fence}
RETURNING token"""

_ENTRY_VALUES: Final = """%(id)s, %(scope)s, %(reason)s, %(op)s, %(fp)s, %(risk)s, %(attempts)s,
        %(detail)s, %(detail)s, %(message)s, %(ctype)s, statement_timestamp(),
        statement_timestamp(), 1, to_timestamp(%(published)s::float8), %(size)s"""
_ENTRY_UPSERT: Final = """
ON CONFLICT (id) DO UPDATE SET
    risk = excluded.risk,
    attempts = greatest(q.attempts, excluded.attempts),
    last_detail = excluded.last_detail,
    updated_at = excluded.updated_at,
    seen = q.seen + 1
RETURNING {entry}"""
_ENTRY_INSERT: Final = """
INSERT INTO {q} AS q (id, scope, reason, operation_id, fingerprint, risk, attempts, first_detail,
                      last_detail, message, content_type, created_at, updated_at, seen,
                      published_at, message_size)"""

_UPSERT_ENTRY: Final = _ENTRY_INSERT + "\nVALUES (" + _ENTRY_VALUES + ")" + _ENTRY_UPSERT

# Quarantine with a claim: the fenced move to QUARANTINED and the entry commit together, in one
# statement; a refused fence inserts nothing (the entry's SELECT yields no row).
_QUARANTINE_CLAIMED: Final = (
    """
WITH fence AS (
    UPDATE {ops} SET state = 'quarantined', lease_until = NULL, last_error = %(detail)s,
                     updated_at = statement_timestamp()
    WHERE {fence}
    RETURNING 1
)"""
    + _ENTRY_INSERT
    + "\nSELECT "
    + _ENTRY_VALUES
    + " WHERE EXISTS (SELECT 1 FROM fence)"
    + _ENTRY_UPSERT
)

_GET: Final = "SELECT {rec} FROM {ops} o WHERE o.scope = %(scope)s AND o.operation_id = %(op)s"

_GET_ENTRY: Final = "SELECT {entry} FROM {q} WHERE id = %(id)s"

_LIST_ALL: Final = "SELECT {entry} FROM {q} ORDER BY created_at, id LIMIT %(limit)s"
_LIST_REASON: Final = (
    "SELECT {entry} FROM {q} WHERE reason = %(reason)s ORDER BY created_at, id LIMIT %(limit)s"
)

#: One bounded batch: the subquery walks the partial index oldest first and stops after ``n``
#: rows; ``ctid = ANY(ARRAY(…))`` makes the outer delete a TID scan (``ctid IN (SELECT …)`` may be
#: planned as a join over the whole table). The predicate is repeated so a row changed after the
#: subquery read it is re-checked, not deleted blindly.
_PURGE: Final = """
DELETE FROM {ops}
WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM {ops}
        WHERE state = 'completed' AND completed_at < to_timestamp(%(before)s)
        ORDER BY completed_at
        LIMIT %(n)s))
  AND state = 'completed' AND completed_at < to_timestamp(%(before)s)"""


# Redrive: the entry's bookkeeping and the release of its QUARANTINED operation are one statement,
# so one transaction: both or neither. An unknown id updates nothing and returns no row.
_REDRIVE: Final = """
WITH e AS (
    UPDATE {q} SET redriven_at = statement_timestamp(), redrives = redrives + 1,
                   updated_at = statement_timestamp()
    WHERE id = %(id)s
    RETURNING {entry}
),
released AS (
    UPDATE {ops} o SET state = 'released', attempts = 0, updated_at = statement_timestamp(),
                       unstarted_attempt = NULL
    FROM e
    WHERE o.scope = e.scope AND o.operation_id = e.operation_id AND o.state = 'quarantined'
    RETURNING 1
)
SELECT * FROM e"""

#: One bounded batch of purge_quarantine: the oldest ``n`` matching entries (the filters are
#: composed from fixed fragments, values always bound), deleted by primary key.
_PURGE_QUARANTINE: Final = """
DELETE FROM {q}
WHERE id = ANY (ARRAY(
        SELECT id FROM {q} WHERE %s
        ORDER BY created_at, id
        LIMIT %%(n)s))"""
_PURGE_QUARANTINE_FILTERS: Final = (
    ("ids", "id = ANY (%(ids)s::text[])"),
    ("reason", "reason = %(reason)s"),
    ("before", "created_at < to_timestamp(%(before)s::float8)"),
)

# Summary, one statement (one snapshot). Counts by state are one pass over the operations (an
# exact count(*) is a scan in PostgreSQL whatever the index); expired leases are judged by the
# database clock in the same pass; the hot operations walk the partial index {hot_idx}; sizes
# include indexes and TOAST.
_SUMMARY: Final = """
WITH states AS (
    SELECT state, count(*) AS n,
           count(*) FILTER (WHERE state = 'in_flight'
                              AND lease_until <= statement_timestamp()) AS expired,
           min(updated_at) FILTER (WHERE state = 'in_flight') AS oldest,
           count(*) FILTER (WHERE state = 'completed'
                              AND completed_at >= statement_timestamp() - interval '1 hour')
               AS recent
    FROM {ops} GROUP BY state
),
hot AS (
    SELECT scope, operation_id, attempts FROM {ops}
    WHERE attempts > 1
    ORDER BY attempts DESC, scope COLLATE "C", operation_id COLLATE "C"
    LIMIT %(top)s
)
SELECT date_part('epoch', statement_timestamp()),
       (SELECT json_object_agg(state, n) FROM states),
       (SELECT coalesce(sum(expired), 0)::bigint FROM states),
       (SELECT date_part('epoch', min(oldest)) FROM states),
       (SELECT coalesce(sum(recent), 0)::bigint FROM states),
       (SELECT json_agg(json_build_array(scope, operation_id, attempts)
                        ORDER BY attempts DESC, scope COLLATE "C", operation_id COLLATE "C")
        FROM hot),
       (SELECT json_object_agg(reason, n)
        FROM (SELECT reason, count(*) AS n FROM {q} GROUP BY reason) r),
       pg_total_relation_size({ops_lit}::regclass) + pg_total_relation_size({q_lit}::regclass)"""


# Handler control (``replaysafe handler pause|resume``): the pause time is the database clock.
_PAUSE: Final = """
INSERT INTO {paused} (handler, reason, paused_by, since)
VALUES (%(handler)s, %(reason)s, %(by)s, statement_timestamp())
ON CONFLICT (handler) DO UPDATE SET
    reason = excluded.reason, paused_by = excluded.paused_by, since = excluded.since"""
_RESUME: Final = "DELETE FROM {paused} WHERE handler = %(handler)s"
_LIST_PAUSED: Final = (
    "SELECT handler, reason, paused_by, date_part('epoch', since) FROM {paused} ORDER BY handler"
)


#: what decides whether a returned commit survives a crash, as the session running the ledger's
#: statements sees it (server configuration, ALTER DATABASE/ROLE ... SET and the DSN's options)
_DURABILITY: Final = b"""
SELECT current_setting('fsync'), current_setting('synchronous_commit'),
       current_setting('full_page_writes'), current_setting('synchronous_standby_names'),
       current_setting('wal_writer_delay')"""


# ---------------------------------------------------------------------- value types


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What :meth:`PostgresLedger.migrate` did."""

    schema: str
    table_prefix: str
    from_version: int
    to_version: int
    #: qualified names of the objects this run created, and ``column schema.table.name`` for
    #: columns it added to an existing table (empty when everything existed)
    created: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.created) or self.from_version != self.to_version

    def describe(self) -> str:
        if not self.changed:
            return (
                f"schema {self.schema!r} (prefix {self.table_prefix!r}) is already at ledger "
                f"version {self.to_version}; nothing to do"
            )
        verb = "created" if self.from_version == 0 else "upgraded"
        lines = [
            f"{verb} ledger schema {self.schema!r} (prefix {self.table_prefix!r}): version "
            f"{self.from_version} -> {self.to_version}"
        ]
        lines += [f"  created {name}" for name in self.created]
        return "\n".join(lines)


class PostgresTransaction(Transaction):
    """An open transaction on one pooled connection, handed to a transactional handler.

    Valid only inside its ``async with ledger.transaction()`` block. Statements use psycopg's
    placeholders (``%s`` or ``%(name)s``). Errors of the caller's own SQL propagate unchanged
    (``psycopg.errors.UniqueViolation`` …) so a handler can react to them (a dead connection is
    ``LedgerUnavailable``, as everywhere in the ledger); the block then rolls
    back when the exception leaves it. After such an error PostgreSQL refuses further statements in
    the same transaction until it is rolled back: let the exception leave the block.
    """

    def __init__(self, ledger: PostgresLedger, conn: AsyncConnection[Any]) -> None:
        self._ledger = ledger
        self._conn = conn
        self._open = True

    @property
    def connection(self) -> AsyncConnection[Any]:
        """The psycopg connection (for cursors, COPY …). Do not commit or roll back on it."""
        self._check_open()
        return self._conn

    async def execute(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> AsyncCursor[Any]:
        """Run one statement; returns the psycopg cursor (``rowcount``, ``fetchall()`` …).

        The caller's own SQL errors propagate unchanged; a connection that died under the
        statement (server restart, ``pg_terminate_backend``, network) raises
        ``LedgerUnavailable``: the transaction is gone, nothing of it committed."""
        self._check_open()
        psycopg, _ = _driver()
        try:
            return await self._conn.execute(sql, params or None)
        except psycopg.Error as exc:
            if self._conn.broken or self._conn.closed:
                raise self._ledger._unavailable("transaction statement", exc) from exc
            raise

    async def fetchall(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[tuple[Any, ...]]:
        cur = await self.execute(sql, params)
        if cur.description is None:
            return []
        return [tuple(r) for r in await cur.fetchall()]

    def _check_open(self) -> None:
        if not self._open:
            raise LedgerError(
                "this transaction is finished (committed or rolled back); open a new one with "
                "`async with ledger.transaction() as tx`"
            )

    def __repr__(self) -> str:
        return f"PostgresTransaction({self._ledger!r}, open={self._open})"


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
        psycopg, _ = _driver()
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


# ---------------------------------------------------------------------- shared by both flavours

#: what a sans-IO step asks its driver to run: (statement, parameters); the driver sends back all
#: rows (an empty list for a statement that returns none)
_Step = tuple[Any, Any]
_Rows = list[tuple[Any, ...]]


class _Shared:
    """What :class:`PostgresLedger` and its sync twin :class:`SyncPostgresLedger` share: the
    validated options, the statements rendered once for this schema and prefix, and the mapping
    of driver errors to replaysafe errors. Holds no connection; safe to use from any thread
    (rendering is idempotent: two threads rendering at once build equal statements)."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str,
        table_prefix: str,
        min_size: int,
        max_size: int,
        connect_timeout: float,
        acquire_timeout: float,
        auto_migrate: bool,
    ) -> None:
        if not isinstance(schema, str) or not SCHEMA_PATTERN.fullmatch(schema):
            raise ConfigurationError(
                f"schema {schema!r} is not a valid ledger schema name; use 1-63 characters of "
                "lower-case letters, digits and underscores, starting with a letter or underscore"
            )
        if schema.startswith("pg_"):
            raise ConfigurationError(
                f"schema {schema!r} starts with 'pg_', which PostgreSQL reserves; choose another"
            )
        if not isinstance(table_prefix, str) or not PREFIX_PATTERN.fullmatch(table_prefix):
            raise ConfigurationError(
                f"table_prefix {table_prefix!r} is not valid; use 1-40 characters of lower-case "
                "letters, digits and underscores, starting with a letter or underscore"
            )
        if min_size < 0 or max_size < 1 or min_size > max_size:
            raise ConfigurationError(
                f"pool sizes must satisfy 0 <= min_size <= max_size and max_size >= 1, got "
                f"min_size={min_size}, max_size={max_size}"
            )
        if not connect_timeout > 0 or not acquire_timeout > 0:
            raise ConfigurationError("connect_timeout and acquire_timeout must be > 0 seconds")
        self.dsn = dsn
        self.redacted = redact_dsn(dsn)
        self.secret_words = _secrets(dsn)
        self.schema = schema
        self.prefix = table_prefix
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = float(connect_timeout)
        self.acquire_timeout = float(acquire_timeout)
        self.auto_migrate = auto_migrate
        self.names = {k: f"{table_prefix}{suffix}" for k, suffix in _OBJECTS.items()}
        self.q: dict[str, bytes] = {}

    def pool_args(self) -> dict[str, Any]:
        """The keyword arguments of both psycopg pools (``AsyncConnectionPool``,
        ``ConnectionPool``): autocommit connections, the same sizes and timeouts."""
        return {
            "conninfo": self.dsn,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "kwargs": {
                "autocommit": True,
                # libpq's connect_timeout is whole seconds, at least 2
                "connect_timeout": self.libpq_connect_timeout(),
            },
            "timeout": self.acquire_timeout,
            "name": f"replaysafe-ledger-{self.schema}",
            "open": False,
        }

    def libpq_connect_timeout(self) -> int:
        """libpq's ``connect_timeout``: whole seconds, at least 2."""
        return max(2, math.ceil(self.connect_timeout))

    def problem(self, exc: BaseException) -> str:
        """``exc`` in one line with every spelling of the password scrubbed."""
        return f"{type(exc).__name__}: {self.scrub(' '.join(str(exc).split()))}"

    def no_connection(self, problem: str) -> LedgerUnavailable:
        return LedgerUnavailable(
            f"could not connect to PostgreSQL at {self.redacted} within "
            f"{self.connect_timeout:g}s ({problem}); check that the server is up, "
            "reachable and accepts this user, then retry"
        )

    def closed(self, what: str) -> LedgerUnavailable:
        return LedgerUnavailable(
            f"{what} is closed; create a new PostgresLedger (or call sync() again) to use the "
            "database again"
        )

    def check_version(self, version: int) -> None:
        """Raise ``ConfigurationError`` naming the command to run unless the schema is at
        :data:`SCHEMA_VERSION` (``version`` 0: it does not exist)."""
        if version == SCHEMA_VERSION:
            return
        if version == 0:
            what = "does not exist"
        elif version < SCHEMA_VERSION:
            what = f"is at version {version}, older than this replaysafe's {SCHEMA_VERSION}"
        else:
            raise ConfigurationError(
                f"ledger schema {self.schema!r} is at version {version}, newer than this "
                f"replaysafe understands ({SCHEMA_VERSION}); upgrade replaysafe"
            )
        prefix = "" if self.prefix == "rs_" else f" --table-prefix {self.prefix}"
        raise ConfigurationError(
            f"the ledger schema {self.schema!r} (prefix {self.prefix!r}) {what} in "
            f"{self.redacted}; run `replaysafe ledger migrate --dsn DSN --schema "
            f"{self.schema}{prefix}` (or `await ledger.migrate()`, or pass auto_migrate=True)"
        )

    def table(self, key: str) -> str:
        """Qualified name of a ledger object (``ops``, ``q``, ``seq`` …), for display."""
        return f"{self.schema}.{self.names[key]}"

    def check_dsn(self) -> None:
        """Parse the DSN before any pool worker tries it: libpq echoes a malformed value (a bad
        percent-escape in a password, say) in its error, and the pool would log that line."""
        psycopg, _ = _driver()
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(self.dsn)
        except psycopg.Error as exc:
            problem = self.scrub(" ".join(str(exc).split()))
        else:
            return
        raise ConfigurationError(  # raised outside the except block: no chained driver text
            f"the PostgreSQL DSN {self.redacted} is malformed ({problem}); fix it (a password "
            "with special characters must be percent-encoded in a URL)"
        )

    def render_statements(self) -> None:
        """Compose every statement once, with the validated identifiers quoted by psycopg."""
        if self.q:
            return
        rec_o = _rec("o")
        texts = {
            "claim_one": _CLAIM.format(
                req=_REQ_ONE,
                ops="{ops}",
                seq_lit="{seq_lit}",
                ins_cols=_ACQUIRED_RETURNING,
                i_cols=_ACQUIRED_COLUMNS,
                e_cols=_rec("e"),
            ),
            "claim_many": _CLAIM.format(
                req=_REQ_MANY,
                ops="{ops}",
                seq_lit="{seq_lit}",
                ins_cols=_ACQUIRED_RETURNING,
                i_cols=_ACQUIRED_COLUMNS,
                e_cols=_rec("e"),
            ),
            "complete": _COMPLETE.format(ops="{ops}", fence=_FENCE, rec=rec_o),
            "complete_many": _COMPLETE_MANY.format(
                ops="{ops}",
                upd_cols=_COMPLETED_RETURNING,
                u_cols=_COMPLETED_COLUMNS,
                e_cols=_rec("e"),
            ),
            "extend": _EXTEND.format(ops="{ops}", fence=_FENCE),
            "mark_started": _MARK_STARTED.format(ops="{ops}"),
            "release": _RELEASE.format(ops="{ops}", fence=_FENCE),
            "upsert_entry": _UPSERT_ENTRY.format(q="{q}", entry=_ENTRY_COLUMNS),
            "quarantine_claimed": _QUARANTINE_CLAIMED.format(
                ops="{ops}", q="{q}", fence=_FENCE, entry=_ENTRY_COLUMNS
            ),
            "get": _GET.format(rec=rec_o, ops="{ops}"),
            "get_entry": _GET_ENTRY.format(entry=_ENTRY_COLUMNS, q="{q}"),
            "redrive": _REDRIVE.format(entry=_ENTRY_COLUMNS, q="{q}", ops="{ops}"),
            "summary": _SUMMARY,
            "list_all": _LIST_ALL.format(entry=_ENTRY_COLUMNS, q="{q}"),
            "list_reason": _LIST_REASON.format(entry=_ENTRY_COLUMNS, q="{q}"),
            "purge": _PURGE,
            "pause": _PAUSE,
            "resume": _RESUME,
            "list_paused": _LIST_PAUSED,
        }
        for used in itertools.product((False, True), repeat=len(_PURGE_QUARANTINE_FILTERS)):
            chosen = [f for f, on in zip(_PURGE_QUARANTINE_FILTERS, used, strict=True) if on]
            where = " AND ".join(cond for _, cond in chosen) or "true"
            name = _purge_quarantine_name(dict(chosen))
            texts[name] = _PURGE_QUARANTINE % where
        self.q = {name: self.compose(text) for name, text in texts.items()}

    def compose(self, text: str) -> bytes:
        """``text`` with ``{ops}``, ``{q}``, ``{seq}`` … replaced by quoted identifiers and
        ``{seq_lit}`` by the sequence's quoted name for ``nextval('…')``. Placeholders ``%s`` are
        left for psycopg."""
        from psycopg import sql

        # tables and sequences are schema-qualified; an index is named bare (it lives in its
        # table's schema, and CREATE INDEX refuses a qualified name)
        idents: dict[str, sql.Composable] = {
            key: sql.Identifier(name) if key in _INDEXES else sql.Identifier(self.schema, name)
            for key, name in self.names.items()
        }
        # nextval() and ::regclass take a (quoted, qualified) name as a text literal
        for key in ("seq", "ops", "q"):
            idents[f"{key}_lit"] = sql.Literal(
                sql.Identifier(self.schema, self.names[key]).as_string(None)
            )
        # sql.SQL treats {…} as fields; nothing else in our statements uses braces
        return sql.SQL(text).format(**idents).as_bytes(None)

    def sql(self, name: str) -> bytes:
        if not self.q:  # rendered on first use: composing needs the driver (a lazy import)
            _driver()
            self.render_statements()
        return self.q[name]

    def scrub(self, text: str) -> str:
        for secret in self.secret_words:
            text = text.replace(secret, "***")
        return text

    def error(self, action: str, exc: BaseException, hint: str | None = None) -> LedgerError:
        """A failed statement's error in the replaysafe tree: ``LedgerDataError`` when the server
        (or the driver, while encoding a parameter) refused this call's data — a NUL byte or a
        lone surrogate in a key or result, a number out of range, a violated constraint — which a
        retry cannot change; else :meth:`unavailable`."""
        psycopg, _ = _driver()
        if not isinstance(exc, UnicodeEncodeError | psycopg.DataError | psycopg.IntegrityError):
            return self.unavailable(action, exc, hint)
        detail = self.scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        return LedgerDataError(
            f"PostgreSQL ledger {action} on {self.redacted} refused this call's data "
            f"({type(exc).__name__}: {detail}); the statement wrote nothing and a retry fails the "
            "same way: set the message aside (quarantine or dead-letter it) and fix what "
            "produced the value"
        )

    def unavailable(
        self, action: str, exc: BaseException, hint: str | None = None
    ) -> LedgerUnavailable:
        psycopg, _ = _driver()
        detail = self.scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        name = type(exc).__name__
        if hint is None:
            if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
                hint = (
                    f"the ledger tables are missing in schema {self.schema!r}; run `replaysafe "
                    f"ledger migrate --schema {self.schema}` against this database"
                )
            elif isinstance(exc, psycopg.errors.InsufficientPrivilege):
                hint = (
                    f"the role lacks privileges on the ledger: GRANT USAGE ON SCHEMA "
                    f"{self.schema}, SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "
                    f"{self.schema} and USAGE ON ALL SEQUENCES IN SCHEMA {self.schema} to it "
                    "(or connect as the role that ran `replaysafe ledger migrate`)"
                )
            elif isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                hint = (
                    "the connection failed or was closed (server restart, failover, network, "
                    "pg_terminate_backend); a write in flight may or may not have committed. "
                    "Do not complete at the broker; retry the call — the pool reconnects"
                )
            else:
                hint = "retry; if it persists, check the server log for this error"
        return LedgerUnavailable(
            f"PostgreSQL ledger {action} failed on {self.redacted} ({name}: {detail}); {hint}"
        )

    def pool_exhausted(self) -> LedgerUnavailable:
        return LedgerUnavailable(
            f"no PostgreSQL connection to {self.redacted} became free within "
            f"{self.acquire_timeout:g}s (pool max_size={self.max_size}): the server is "
            "unreachable or every connection is busy; retry, raise max_size, or shorten "
            "transactions"
        )


# ---------------------------------------------------------------------- sans-IO steps
#
# Work of more than one statement whose logic must exist once for both flavours is written as a
# generator: it yields each statement (``_Step``) and is sent back its rows; a driver per flavour
# (``_drive_on`` / ``_drive_on_sync`` on one connection, the claim drivers on pooled
# connections) runs the statements. The generator's return value is the call's answer.


def _open_steps(s: _Shared) -> Generator[_Step, _Rows, tuple[float, int]]:
    """The database clock's offset to this host's and the schema version (0: no schema)."""
    qualified = f'"{s.schema}"."{s.names["version"]}"'  # validated identifiers
    sent = time.time()
    rows = yield (
        "SELECT date_part('epoch', clock_timestamp()), to_regclass(%s) IS NOT NULL",
        (qualified,),
    )
    received = time.time()
    offset = float(rows[0][0]) - (sent + received) / 2
    version = 0
    if rows[0][1]:
        vrows = yield s.compose("SELECT version FROM {version} WHERE id = 1"), None
        version = 0 if not vrows else int(vrows[0][0])
    return offset, version


def _migration_steps(s: _Shared) -> Generator[_Step, _Rows, MigrationReport]:
    """:meth:`PostgresLedger.migrate`'s statements, to run in ONE transaction on one connection
    (a ``ConfigurationError`` raised here must roll it back)."""
    from psycopg import sql

    lock_key = int.from_bytes(
        hashlib.sha256(f"replaysafe-migrate:{s.schema}:{s.prefix}".encode()).digest()[:8],
        "big",
        signed=True,
    )
    version_tbl = sql.Identifier(s.schema, s.names["version"])
    yield "SELECT pg_advisory_xact_lock(%s)", (lock_key,)
    before = yield from _existing_objects(s)
    yield sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(s.schema)), None
    yield (
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {} (
                id         integer     PRIMARY KEY CHECK (id = 1),
                version    integer     NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now())"""
        ).format(version_tbl),
        None,
    )
    rows = yield sql.SQL("SELECT version FROM {} WHERE id = 1 FOR UPDATE").format(version_tbl), None
    current = 0 if not rows else int(rows[0][0])
    if current > SCHEMA_VERSION:
        raise ConfigurationError(
            f"schema {s.schema!r} has ledger version {current}, newer than this "
            f"replaysafe understands ({SCHEMA_VERSION}); upgrade replaysafe"
        )
    for version in sorted(_MIGRATIONS):
        if version <= current:
            continue
        for statement in _MIGRATIONS[version]:
            yield s.compose(statement), None
    yield (
        sql.SQL(
            """INSERT INTO {} (id, version) VALUES (1, %s)
            ON CONFLICT (id) DO UPDATE SET version = excluded.version,
                                           updated_at = now()"""
        ).format(version_tbl),
        (SCHEMA_VERSION,),
    )
    after = yield from _existing_objects(s)
    # a column counts as created only when its table existed before (a new table's columns are
    # part of creating the table)
    created = tuple(
        name
        for name in after
        if name not in before
        and (not name.startswith("column ") or name[7:].rsplit(".", 1)[0] in before)
    )
    return MigrationReport(s.schema, s.prefix, current, SCHEMA_VERSION, created)


def _existing_objects(s: _Shared) -> Generator[_Step, _Rows, list[str]]:
    """Qualified names of the ledger's schema objects that exist now, in creation order."""
    rows = yield "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", (s.schema,)
    names: list[str] = []
    if not rows or not rows[0][0]:
        return names
    names.append(f"schema {s.schema}")
    for key in (
        "version",
        "ops",
        "purge_idx",
        "seq",
        "q",
        "q_by_time",
        "q_by_reason",
        "hot_idx",
        "paused",
    ):
        qualified = f'"{s.schema}"."{s.names[key]}"'  # validated identifiers
        found = yield "SELECT to_regclass(%s) IS NOT NULL", (qualified,)
        if found and found[0][0]:
            names.append(s.table(key))
    # columns added to an existing table by a later version, as "column <table>.<name>"
    for key, added in (("ops", _V4_OPERATION_COLUMNS), ("q", _V2_QUARANTINE_COLUMNS)):
        if s.table(key) not in names:
            continue
        rows = yield (
            """SELECT attname FROM pg_attribute
               WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped""",
            (f'"{s.schema}"."{s.names[key]}"',),
        )
        present = {row[0] for row in rows}
        names += [f"column {s.table(key)}.{c}" for c in added if c in present]
    return names


async def _drive_on(conn: AsyncConnection[Any], steps: Generator[_Step, _Rows, T]) -> T:
    """Run ``steps`` on one async connection (see the section comment); its return value."""
    rows: Any = None  # a generator's first send must be None
    while True:
        try:
            query, params = steps.send(rows)
        except StopIteration as done:
            result: T = done.value
            return result
        cur = await conn.execute(query, params)
        rows = await cur.fetchall() if cur.description is not None else []


def _drive_on_sync(conn: Connection[Any], steps: Generator[_Step, _Rows, T]) -> T:
    """Run ``steps`` on one sync connection: :func:`_drive_on` for the sync twin."""
    rows: Any = None
    while True:
        try:
            query, params = steps.send(rows)
        except StopIteration as done:
            result: T = done.value
            return result
        cur = conn.execute(query, params)
        rows = cur.fetchall() if cur.description is not None else []


def _complete_in_steps(
    s: _Shared, claim: Claim, result: str | None
) -> Generator[_Step, _Rows, LeaseLost | None]:
    """Both flavours' ``complete_in``, on the transaction's connection: the fenced completion;
    when it changed no row, the record read for the ``LeaseLost`` to raise (returned, not raised:
    the driver maps only driver errors)."""
    rows = yield s.sql("complete"), _fence_params(claim, result=result)
    if rows:
        return None
    current = yield s.sql("get"), _get_params(claim.key)
    return _fence_error(_record_or_none(current[0] if current else None), claim)


#: why a failed COMMIT leaves the outcome unknown, and how to learn it
_COMMIT_HINT: Final = (
    "the transaction may or may not have committed; the next claim of the operation tells "
    "(AlreadyDone if it did)"
)


def _claim_steps(
    s: _Shared, requests: list[ClaimRequest]
) -> Generator[_Step, _Rows, list[ClaimOutcome]]:
    """Claims with the semantics of sequential single claims (both flavours' ``claim`` and
    ``claim_many``; each statement may run on its own pooled connection, in binary).

    Round one sends the first request per key; a later copy of a key is decided from what the
    earlier copy left (``decide_claim`` on that record) and only goes to the database when
    that record is claimable (a copy after a Conflict on a released row) — a second round.
    """
    if len(requests) == 1 or len({(r.key.scope, r.key.operation_id) for r in requests}) == len(
        requests
    ):  # no key repeats (the common case): one round, nothing to remember
        return [outcome for outcome, _, _ in (yield from _claim_round(s, requests))]
    out: list[ClaimOutcome | None] = [None] * len(requests)
    known: dict[OpKey, tuple[Record | None, float]] = {}
    pending = list(enumerate(requests))
    while pending:
        send: list[tuple[int, ClaimRequest]] = []
        later: list[tuple[int, ClaimRequest]] = []
        sending: set[OpKey] = set()
        for idx, r in pending:
            if r.key in sending:
                later.append((idx, r))
                continue
            if r.key in known:
                record, db_now = known[r.key]
                outcome, _ = decide_claim(record, r.key, r.fingerprint, r.owner, r.lease, db_now, 0)
                if not isinstance(outcome, Acquired):
                    out[idx] = outcome
                    continue
            sending.add(r.key)
            send.append((idx, r))
        if send:
            results = yield from _claim_round(s, [r for _, r in send])
            for (idx, r), (outcome, row, db_now) in zip(send, results, strict=True):
                out[idx] = outcome
                known[r.key] = (
                    _acquired_record(r, row) if row[1] else _record_or_none(row, 2),
                    db_now,
                )
        pending = later
    return [o for o in out if o is not None]


def _claim_round(
    s: _Shared, requests: list[ClaimRequest]
) -> Generator[_Step, _Rows, list[tuple[ClaimOutcome, tuple[Any, ...], float]]]:
    """One statement for distinct keys; per request ``(outcome, row, database now)``. For a
    refused claim ``row[2:15]`` is the record; an acquired claim's row carries only what the
    request does not say (see ``_ACQUIRED_COLUMNS``; ``_acquired_record`` rebuilds the record
    where it is needed). The row is kept raw: building a Record for every acquired claim
    would cost more than the statement's own parsing."""
    results: list[tuple[ClaimOutcome, tuple[Any, ...], float] | None] = [None] * len(requests)
    todo = list(range(len(requests)))
    for _ in range(CLAIM_RACE_RETRIES):
        batch = [requests[i] for i in todo]
        rows = yield _claim_statement(s, batch)
        retry: list[int] = []
        for row in rows:
            i = todo[row[0] - 1]
            r = requests[i]
            if row[1]:  # written: this claim holds the operation now
                # row: ord, written, -, -, -, -, token(6), -, lease_until(8), attempts(9), -,
                # last_error(11), created_at(12), updated_at(13), -, unstarted_attempt(15),
                # recovered(16), -, previous_started(18)
                claim = new_claim(
                    r.key, r.fingerprint, row[6], r.owner, row[8], row[9], row[16], row[18]
                )
                results[i] = (new_acquired(claim), row, row[13])
                continue
            existing = _record_or_none(row, 2)
            db_now = float(row[17])
            outcome, _ = decide_claim(existing, r.key, r.fingerprint, r.owner, r.lease, db_now, 0)
            if isinstance(outcome, Acquired):
                # Nothing was written, yet the row as this statement's snapshot saw it is
                # claimable (or absent): a concurrent claim committed it after the snapshot
                # was taken. A new statement sees the committed row.
                retry.append(i)
            else:
                results[i] = (outcome, row, db_now)
        if not retry:
            break
        todo = retry
    else:
        raise LedgerUnavailable(
            f"claims of {len(todo)} operation(s) kept racing with concurrent claims after "
            f"{CLAIM_RACE_RETRIES} tries (first: {requests[todo[0]].key}); nothing was "
            "written for them: retry later"
        )
    return [r for r in results if r is not None]


def _claim_statement(s: _Shared, batch: list[ClaimRequest]) -> _Step:
    if len(batch) == 1:
        r = batch[0]
        return s.sql("claim_one"), {
            "scope": r.key.scope,
            "op": r.key.operation_id,
            "fp": r.fingerprint,
            "owner": r.owner,
            "lease": float(r.lease),
            "marks": r.marks_start,
        }
    return s.sql("claim_many"), {
        "scope": [r.key.scope for r in batch],
        "op": [r.key.operation_id for r in batch],
        "fp": [r.fingerprint for r in batch],
        "owner": [r.owner for r in batch],
        "lease": [float(r.lease) for r in batch],
        "marks": [r.marks_start for r in batch],
    }


# ---------------------------------------------------------------------- pack and decode
#
# The single-statement calls: parameters from the arguments ("pack") and the answer from the
# rows ("decode"), pure, for both flavours. A fenced write that changed no row reads the record
# (``get``) to say why, which each flavour does with its own driver (see ``_fence_error``).


def _fence_params(claim: Claim, **extra: Any) -> dict[str, Any]:
    return {
        "f_scope": claim.key.scope,
        "f_op": claim.key.operation_id,
        "f_token": claim.token,
        **extra,
    }


def _get_params(key: OpKey) -> dict[str, Any]:
    return {"scope": key.scope, "op": key.operation_id}


def _extended(claim: Claim, lease_until: float) -> Claim:
    """``claim`` with the lease an extend statement returned."""
    return Claim(
        claim.key,
        claim.fingerprint,
        claim.token,
        claim.owner,
        lease_until,
        claim.attempt,
        claim.recovered,
        claim.previous_started,
    )


def _complete_many_params(items: Sequence[tuple[Claim, str | None]]) -> dict[str, Any]:
    return {
        "scope": [c.key.scope for c, _ in items],
        "op": [c.key.operation_id for c, _ in items],
        "token": [c.token for c, _ in items],
        "result": [r for _, r in items],
    }


def _complete_many_outcomes(
    items: Sequence[tuple[Claim, str | None]], rows: _Rows
) -> list[Record | LeaseLost]:
    """complete_many's answer from its statement's rows (one per item, in any order)."""
    rows.sort(key=_ORD)  # updated rows and refused rows come from two branches
    if all(row[1] for row in rows):  # the common case: every claim was current
        return [
            _completed_record(c, result, row) for (c, result), row in zip(items, rows, strict=True)
        ]
    out: list[Record | LeaseLost] = []
    done: dict[OpKey, Record] = {}
    for (claim, result), row in zip(items, rows, strict=True):
        if row[1]:
            rec = _completed_record(claim, result, row)
            done[claim.key] = rec
            out.append(rec)
        else:
            # what the record is now: completed by an earlier item of this batch, or as read
            current = done.get(claim.key) or _record_or_none(row, 2)
            out.append(_fence_error(current, claim))
    return out


def _mark_started_params(claims: Sequence[Claim]) -> dict[str, Any]:
    return {
        "scope": [c.key.scope for c in claims],
        "op": [c.key.operation_id for c in claims],
        "token": [c.token for c in claims],
    }


def _marked(claims: Sequence[Claim], rows: _Rows) -> list[Claim | None]:
    """Per claim: itself when the mark_started statement marked it, None when its fence was
    refused (the caller reads the record to build the ``LeaseLost``)."""
    marked = {(scope, op, token) for scope, op, token in rows}
    return [c if (c.key.scope, c.key.operation_id, c.token) in marked else None for c in claims]


def _entry_params(request: QuarantineRequest) -> dict[str, Any]:
    """The quarantine entry's parameters (``request`` is already ``storable()``)."""
    return {
        "id": request.entry_id(),
        "scope": request.scope,
        "reason": request.reason.value,
        "op": request.operation_id,
        "fp": request.fingerprint,
        "risk": request.risk.value,
        "attempts": request.attempts,
        "detail": request.detail,
        "message": request.capped_message(),
        "ctype": request.content_type,
        "published": request.published_at,
        "size": len(request.message or b""),
    }


# ---------------------------------------------------------------------- the ledger


#: PostgresLedger.from_url: the ledger's own query parameters (the rest is libpq's)
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "schema": str, "table_prefix": str, "min_size": int, "max_size": int,
    "acquire_timeout": float, "auto_migrate": flag,
}  # fmt: skip


class PostgresLedger(TransactionalLedger):
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

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "replaysafe",
        table_prefix: str = "rs_",
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        acquire_timeout: float = 10.0,
        auto_migrate: bool = False,
    ) -> None:
        self._s = shared = _Shared(
            dsn,
            schema=schema,
            table_prefix=table_prefix,
            min_size=min_size,
            max_size=max_size,
            connect_timeout=connect_timeout,
            acquire_timeout=acquire_timeout,
            auto_migrate=auto_migrate,
        )
        self._dsn = dsn
        self._redacted = shared.redacted
        self._schema = schema
        self._prefix = table_prefix
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = shared.connect_timeout
        self._acquire_timeout = shared.acquire_timeout
        self._auto_migrate = auto_migrate
        self._names = shared.names
        # the statements and the error mapping are the shared object's (the sync twin's too)
        self._sql = shared.sql
        self._scrub = shared.scrub
        self._error = shared.error
        self._unavailable = shared.unavailable
        self._pool_exhausted = shared.pool_exhausted
        self._pool: AsyncConnectionPool[Any] | None = None
        self._ready = False
        self._open_lock = asyncio.Lock()
        self._ready_lock = asyncio.Lock()
        self._closed = False
        self._clock_offset = 0.0
        #: tasks inside one of this ledger's transactions (see _guard)
        self._tx_tasks: set[asyncio.Task[Any]] = set()
        self._flush: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ identity

    @classmethod
    def from_url(cls, url: str, **opts: Any) -> PostgresLedger:
        """The ledger at ``url``: a libpq URL (or ``key=value`` DSN) whose query may also carry
        the ledger's own options ``schema``, ``table_prefix``, ``min_size``, ``max_size``,
        ``acquire_timeout`` and ``auto_migrate`` (``1``/``0``), taken out before libpq sees
        it; ``opts`` (the constructor's keyword arguments) win over the URL."""
        dsn, options = take_options(url, _URL_OPTIONS, what="PostgreSQL ledger")
        return cls(dsn, **{**options, **opts})

    @property
    def schema(self) -> str:
        return self._schema

    @property
    def table_prefix(self) -> str:
        return self._prefix

    @property
    def dsn(self) -> str:
        """The DSN with its password redacted (the real one is never exposed)."""
        return self._redacted

    def table(self, key: str) -> str:
        """Qualified name of a ledger object (``ops``, ``q``, ``seq`` …), for display."""
        return self._s.table(key)

    def now(self) -> float:
        """Local time corrected by the offset to the database clock measured at ``open()``.

        For display and nack delays only: leases are judged by the database in every statement.
        """
        return time.time() + self._clock_offset

    def sync(self) -> SyncPostgresLedger:
        """The sync twin (:class:`SyncPostgresLedger`): the same DSN, schema, table prefix, pool
        sizes, timeouts and ``auto_migrate``, its own sync connection pool, for plain threads.
        Each call returns a new one that opens on first use; close it. Raises
        ``LedgerUnavailable`` when this ledger is closed."""
        if self._closed:
            self._guard("sync")
        return SyncPostgresLedger(self._s)

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return (
            f"PostgresLedger({self._redacted!r}, schema={self._schema!r}, "
            f"table_prefix={self._prefix!r}{state})"
        )

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Open the pool (waiting up to ``connect_timeout`` for its first connection), measure
        the clock offset, and check (or, with ``auto_migrate``, create) the schema. Idempotent;
        every other call opens lazily."""
        await self._ensure_ready()

    async def close(self) -> None:
        """Close the pool; idempotent. Later calls raise ``LedgerUnavailable``."""
        self._closed = True
        pool, self._pool = self._pool, None
        self._ready = False
        if self._flush is not None and not self._flush.done():
            # let a running pool check hand its connections back before the pool closes them
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._flush), self._connect_timeout)
        if pool is not None:
            await pool.close(timeout=5.0)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def migrate(self) -> MigrationReport:
        """Create or upgrade the ledger schema; idempotent and safe to run concurrently.

        Runs in one transaction under ``pg_advisory_xact_lock`` keyed by schema and prefix, so two
        processes migrating at once take turns and the second finds nothing to do. A schema newer
        than this replaysafe is refused with ``ConfigurationError`` (nothing is changed).
        """
        pool = await self._ensure_pool()
        psycopg, _ = _driver()
        try:
            async with pool.connection(timeout=self._acquire_timeout) as conn, conn.transaction():
                report = await _drive_on(conn, _migration_steps(self._s))
        except _pool_timeout() as exc:
            raise self._pool_exhausted() from exc
        except psycopg.Error as exc:
            raise self._unavailable("migrate", exc) from exc
        self._ready = False  # re-check (cheaply) on the next call
        return report

    # ------------------------------------------------------------------ ledger API

    async def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        """Try to take the operation for ``lease`` seconds, judged by the database clock.

        One statement (one round trip) in the common case. A claim whose connection died
        mid-statement raises ``LedgerUnavailable`` and may or may not have committed: the next
        claim resolves it (``InFlight`` until the lease expires, then ``recovered=True``).
        """
        self._guard("claim")
        return (await self._claim_all([ClaimRequest(key, fingerprint, owner, lease)]))[0]

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        """Claim a batch in one statement (one round trip, one commit). Same outcomes as calling
        :meth:`claim` for each request in order: a key repeated in the batch is answered from the
        first copy's outcome (``InFlight`` after an ``Acquired``).

        Two concurrent batches that hold overlapping keys in different orders can deadlock;
        PostgreSQL then aborts one statement after ``deadlock_timeout`` and that call raises
        ``LedgerUnavailable`` (nothing of it was written): retry it.
        """
        self._guard("claim_many")
        if not requests:
            return []
        return await self._claim_all(list(requests))

    async def extend(self, claim: Claim, lease: float) -> Claim:
        """Push the lease to database ``now + lease``. ``LeaseLost`` when the token is stale."""
        self._guard("extend")
        rows = await self._fetch("extend", self._sql("extend"), _fence_params(claim, lease=lease))
        if not rows:
            raise await self._lease_lost(claim)
        return _extended(claim, rows[0][0])

    async def complete(self, claim: Claim, result: str | None = None) -> Record:
        """Record the effect as done. ``LeaseLost`` when the token is stale (then do not complete
        at the broker). If the connection dies mid-statement the completion may or may not have
        committed (``LedgerUnavailable``); the next claim finds ``AlreadyDone`` if it did."""
        self._guard("complete")
        rows = await self._fetch(
            "complete", self._sql("complete"), _fence_params(claim, result=result)
        )
        if not rows:
            raise await self._lease_lost(claim)
        return _record(rows[0])

    async def complete_many(
        self, items: Sequence[tuple[Claim, str | None]]
    ) -> list[Record | LeaseLost]:
        """Complete a batch in one statement. A stale claim yields its ``LeaseLost`` in place and
        does not stop the others; the same claim twice completes once (the copy is stale)."""
        self._guard("complete_many")
        if not items:
            return []
        if len(items) == 1:  # the single-row statement: measured ~0.3 ms faster than unnest()
            claim, result = items[0]
            rows = await self._fetch(
                "complete_many", self._sql("complete"), _fence_params(claim, result=result)
            )
            return [_record(rows[0]) if rows else await self._lease_lost(claim)]
        rows = await self._fetch(
            "complete_many", self._sql("complete_many"), _complete_many_params(items), binary=True
        )
        return _complete_many_outcomes(items, rows)

    async def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        """Mark a batch started in one statement (one round trip, one commit), fenced per claim:
        a stale one yields its ``LeaseLost`` in place (what the record is now is read for it,
        one more round trip per stale claim: rare) and changes nothing."""
        self._guard("mark_started")
        if not claims:
            return []
        rows = await self._fetch(
            "mark_started", self._sql("mark_started"), _mark_started_params(claims), binary=True
        )
        out: list[Claim | LeaseLost] = []
        for c, marked in zip(claims, _marked(claims, rows), strict=True):
            out.append(marked if marked is not None else await self._lease_lost(c))
        return out

    async def release(self, claim: Claim, error: str | None = None) -> None:
        """Give the operation back (no effect happened); the next claim gets it at once."""
        self._guard("release")
        rows = await self._fetch(
            "release", self._sql("release"), _fence_params(claim, error=storable_text(error))
        )
        if not rows:
            raise await self._lease_lost(claim)

    async def quarantine(
        self, request: QuarantineRequest, claim: Claim | None = None
    ) -> QuarantineEntry:
        """Upsert the entry (``seen`` + 1 on a repeat) and, with ``claim``, move the operation to
        QUARANTINED under fencing, in one transaction: committed (durable) before this returns,
        so the caller may then complete at the broker."""
        self._guard("quarantine")
        entry_params = _entry_params(request.storable())
        if claim is None:
            rows = await self._fetch("quarantine", self._sql("upsert_entry"), entry_params)
            return _entry(rows[0])
        rows = await self._fetch(
            "quarantine",
            self._sql("quarantine_claimed"),
            {**entry_params, **_fence_params(claim)},
        )
        if not rows:  # the fence refused: neither the record nor the entry was written
            raise await self._lease_lost(claim)
        return _entry(rows[0])

    async def get(self, key: OpKey) -> Record | None:
        rows = await self._fetch("get", self._sql("get"), _get_params(key))
        return _record(rows[0]) if rows else None

    async def quarantined(
        self, *, reason: QuarantineReason | None = None, limit: int = 100
    ) -> list[QuarantineEntry]:
        if limit <= 0:
            return []
        if reason is None:
            rows = await self._fetch("quarantined", self._sql("list_all"), {"limit": limit})
        else:
            rows = await self._fetch(
                "quarantined", self._sql("list_reason"), {"limit": limit, "reason": reason.value}
            )
        return [_entry(r) for r in rows]

    async def quarantine_entry(self, entry_id: str) -> QuarantineEntry | None:
        """One quarantine entry by id (primary key), or None. Reads only."""
        rows = await self._fetch("quarantine_entry", self._sql("get_entry"), {"id": entry_id})
        return _entry(rows[0]) if rows else None

    async def redrive(self, entry_id: str) -> QuarantineEntry:
        """Record a redrive of the entry (``redriven_at`` = database now, ``redrives`` + 1) and,
        if its operation is QUARANTINED, release it with ``attempts`` reset to 0, in one statement
        (one transaction: both or neither).

        A COMPLETED, in-flight or released operation is left as it is: the republished copy of a
        completed one is answered ``AlreadyDone``, never re-run. Publishes nothing: republishing
        is the caller's job, after this returned. Raises ``LedgerError`` for an unknown entry
        (nothing written). If the connection dies mid-statement (``LedgerUnavailable``) the redrive
        may or may not have committed; ``quarantine_entry`` tells (``redrives``)."""
        self._guard("redrive")
        rows = await self._fetch("redrive", self._sql("redrive"), {"id": entry_id})
        if not rows:
            raise unknown_entry(entry_id)
        return _entry(rows[0])

    async def purge_quarantine(
        self,
        entry_ids: Sequence[str] | None = None,
        *,
        reason: QuarantineReason | None = None,
        older_than: float | None = None,
        limit: int = 10_000,
    ) -> int:
        """Delete up to ``limit`` quarantine entries matching every given filter (``entry_ids``,
        ``reason``, ``created_at`` before ``older_than`` in POSIX seconds), oldest first.

        Deletes in statements of at most ``PURGE_BATCH`` rows, each walking an index
        (``(created_at, id)``, ``(reason, created_at, id)`` or the primary key) and committing on
        its own: interrupted midway, the batches already deleted stay deleted. An empty
        ``entry_ids`` matches nothing. Operation records are not touched: a QUARANTINED operation
        stays quarantined (redrive it first to make it claimable)."""
        self._guard("purge_quarantine")
        if limit <= 0 or (entry_ids is not None and len(entry_ids) == 0):
            return 0
        params: dict[str, Any] = {}
        if entry_ids is not None:
            params["ids"] = list(entry_ids)
        if reason is not None:
            params["reason"] = reason.value
        if older_than is not None:
            params["before"] = float(older_than)
        query = self._sql(_purge_quarantine_name(params))
        deleted = 0
        while deleted < limit:
            n = min(PURGE_BATCH, limit - deleted)
            count = await self._rowcount("purge_quarantine", query, {**params, "n": n})
            deleted += count
            if count < n:
                break
        return deleted

    async def summary(self, *, top: int = 10) -> LedgerSummary:
        """Counts for ``replaysafe inspect``, in one statement (one snapshot).

        ``now``, expired leases and the last hour are judged by the database clock. Counting by
        state reads every operation row (an exact ``count(*)`` is a scan in PostgreSQL: linear in
        the table, 0.17 s at one million rows on the 2-core test machine); the ``top`` hot
        operations walk a partial index of retried rows; ``approx_bytes`` is
        ``pg_total_relation_size`` of the operations and quarantine tables (indexes and TOAST
        included)."""
        self._guard("summary")
        rows = await self._fetch("summary", self._sql("summary"), {"top": max(top, 0)})
        now, by_state, expired, oldest, recent, hot, reasons, size = rows[0]
        return LedgerSummary(
            now=float(now),
            by_state=dict(by_state or {}),
            expired_leases=int(expired),
            oldest_in_flight_at=oldest,
            hot_operations=[(OpKey(scope, op), int(n)) for scope, op, n in hot or []],
            quarantined_by_reason=dict(reasons or {}),
            completed_last_hour=int(recent),
            approx_bytes=int(size),
        )

    async def set_paused(
        self, handler: str, paused: bool, *, reason: str = "", by: str = ""
    ) -> None:
        """Pause (upsert a row in ``<prefix>paused``, ``since`` = database now) or resume (delete
        it) ``handler``: one autocommit statement, durable when this returns."""
        self._guard("set_paused")
        check_handler_name(handler)
        if paused:
            params = {"handler": handler, "reason": pause_text(reason), "by": pause_text(by)}
            await self._rowcount("set_paused", self._sql("pause"), params)
        else:
            await self._rowcount("set_paused", self._sql("resume"), {"handler": handler})

    async def paused(self) -> dict[str, PauseState]:
        """The paused handlers: one statement over a table with a row per paused handler."""
        rows = await self._fetch("paused", self._sql("list_paused"), {})
        return {h: PauseState(h, r, b, float(t)) for h, r, b, t in rows}

    async def durability(self) -> Durability:
        """Read ``fsync``, ``synchronous_commit``, ``full_page_writes``,
        ``synchronous_standby_names`` and ``wal_writer_delay`` on one of the ledger's own pooled
        connections (so the DSN's ``options``, ``ALTER ROLE/DATABASE … SET`` and the server's
        configuration all count, as they do for every ledger statement) and judge them with
        :func:`assess_postgres`. Needs the server, not the schema. Raises
        ``LedgerUnavailable`` when the server cannot be reached."""
        self._guard("durability")
        pool = await self._ensure_pool()
        psycopg, _ = _driver()
        try:
            async with pool.connection(timeout=self._acquire_timeout) as conn:
                cur = await conn.execute(_DURABILITY)
                row = await cur.fetchone()
        except _pool_timeout() as exc:
            raise self._pool_exhausted() from exc
        except psycopg.Error as exc:
            raise self._unavailable("durability", exc) from exc
        assert row is not None  # one SELECT without FROM: always one row
        names = ("fsync", "synchronous_commit", "full_page_writes", "synchronous_standby_names",
                 "wal_writer_delay")  # fmt: skip
        return assess_postgres(
            f"{self._redacted} (schema {self._schema})",
            dict(zip(names, (str(v) for v in row), strict=True)),
        )

    async def purge(self, older_than: float, *, limit: int = 10_000) -> int:
        """Forget up to ``limit`` COMPLETED records completed before ``older_than`` (POSIX
        seconds, compared with the database's ``completed_at``), oldest first.

        Deletes in batches of at most ``PURGE_BATCH`` rows, each its own short statement walking
        the partial index ``(completed_at) WHERE state = 'completed'``: no table scan, no lock
        held longer than one batch. A purged operation is new again to the ledger: purge only
        what lies beyond the replay horizon. Interrupted midway, the batches already deleted stay
        deleted (each committed).
        """
        self._guard("purge")
        deleted = 0
        while deleted < limit:
            n = min(PURGE_BATCH, limit - deleted)
            count = await self._rowcount(
                "purge", self._sql("purge"), {"before": float(older_than), "n": n}
            )
            deleted += count
            if count < n:
                break
        return deleted

    # ------------------------------------------------------------------ transactions

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTransaction]:
        """``BEGIN`` … ``COMMIT`` on one pooled connection; ``ROLLBACK`` on any exception
        (cancellation included). Several transactions may be open at once, each on its own
        connection, up to ``max_size``.

        If the commit fails (the connection died while committing), ``LedgerUnavailable`` is
        raised and the outcome is unknown: the transaction may or may not have committed. With
        ``complete_in`` inside, the next claim resolves it (``AlreadyDone`` if it committed).
        Inside the block, use ``tx`` and ``complete_in(tx, …)``; this ledger's other write calls
        from the same task are refused (they would wait on the transaction's own row locks).
        """
        self._guard("transaction")
        pool = await self._ensure_ready()
        psycopg, _ = _driver()
        try:
            conn = await pool.getconn(timeout=self._acquire_timeout)
        except _pool_timeout() as exc:
            raise self._pool_exhausted() from exc
        except psycopg.Error as exc:
            raise self._unavailable("transaction", exc) from exc
        task = asyncio.current_task()
        tx = PostgresTransaction(self, conn)
        try:
            try:
                await conn.execute("BEGIN")
            except psycopg.Error as exc:
                raise self._unavailable("transaction", exc) from exc
            if task is not None:
                self._tx_tasks.add(task)
            try:
                yield tx
            except BaseException as exc:
                tx._open = False
                # shielded: a second cancellation must not skip the rollback
                problem = await asyncio.shield(self._rollback(conn))
                if problem is not None:
                    exc.add_note(problem)
                raise
            tx._open = False
            try:
                await conn.execute("COMMIT")
            except psycopg.Error as exc:
                # a deferred constraint of the block's own rows fails here: data, rolled back
                raise self._error("commit", exc, _COMMIT_HINT) from exc
        finally:
            tx._open = False
            if task is not None:
                self._tx_tasks.discard(task)
            # the pool rolls back anything left open and discards a broken connection
            await pool.putconn(conn)
            if conn.broken:
                await self._flush_dead_connections(pool)

    async def complete_in(self, tx: Transaction, claim: Claim, result: str | None = None) -> None:
        """Fence and mark the claim completed inside ``tx``; it commits with the business rows.
        Raises ``LeaseLost`` when the token is stale: let it leave the block so it rolls back."""
        if not isinstance(tx, PostgresTransaction) or tx._ledger is not self:
            raise ConfigurationError(
                "complete_in() needs a transaction opened by this ledger's transaction(); a "
                "transaction of another database cannot commit this ledger's row"
            )
        tx._check_open()
        psycopg, _ = _driver()
        try:
            lost = await _drive_on(tx._conn, _complete_in_steps(self._s, claim, result))
        except (psycopg.Error, UnicodeEncodeError) as exc:
            raise self._error("complete_in", exc) from exc
        if lost is not None:
            raise lost

    # ------------------------------------------------------------------ claims

    async def _claim_all(self, requests: list[ClaimRequest]) -> list[ClaimOutcome]:
        """Run :func:`_claim_steps` (the claim logic both flavours share), each statement on a
        pooled connection."""
        steps = _claim_steps(self._s, requests)
        rows: Any = None  # a generator's first send must be None
        while True:
            try:
                query, params = steps.send(rows)
            except StopIteration as done:
                outcomes: list[ClaimOutcome] = done.value
                return outcomes
            rows = await self._fetch("claim", query, params, binary=True)

    # ------------------------------------------------------------------ plumbing

    async def _lease_lost(self, claim: Claim) -> LeaseLost:
        """The ``LeaseLost`` for a fenced write that changed no row, saying what the record is."""
        try:
            current = await self.get(claim.key)
        except LedgerUnavailable:
            current = None
        return _fence_error(current, claim)

    async def _fetch(
        self, action: str, query: bytes, params: Any, *, binary: bool = False
    ) -> list[tuple[Any, ...]]:
        """One statement on a pooled autocommit connection; all rows. ``binary`` asks for
        results in binary format (the claim and complete_many statements: their text, bigint,
        integer, float8 and boolean columns load to the same Python values, with less work on
        both sides than printing and parsing text)."""
        rows: list[tuple[Any, ...]] = await self._statement(action, query, params, True, binary)
        return rows

    async def _rowcount(self, action: str, query: bytes, params: Any) -> int:
        count: int = await self._statement(action, query, params, False)
        return count

    async def _statement(
        self, action: str, query: bytes, params: Any, rows: bool, binary: bool = False
    ) -> Any:
        pool = await self._ensure_ready()
        psycopg, _ = _driver()
        used: AsyncConnection[Any] | None = None
        try:
            async with pool.connection(timeout=self._acquire_timeout) as conn:
                used = conn
                cur = await conn.execute(query, params, binary=binary)
                return await cur.fetchall() if rows else cur.rowcount
        except _pool_timeout() as exc:  # first: PoolTimeout is a psycopg.OperationalError
            raise self._pool_exhausted() from exc
        except (psycopg.Error, UnicodeEncodeError) as exc:
            if used is not None and used.broken:
                await self._flush_dead_connections(pool)
            raise self._error(action, exc) from exc

    async def _flush_dead_connections(self, pool: AsyncConnectionPool[Any]) -> None:
        """A pooled connection broke. Its idle siblings probably broke with it (server restart,
        failover, backends terminated): check them all now, so the next call gets a live one
        instead of failing once per dead connection. Bounded by ``connect_timeout``; the check
        is shielded and finishes in the background (cancelling it midway would lose the
        connections it has taken out of the pool)."""
        if self._flush is None or self._flush.done():
            self._flush = asyncio.ensure_future(pool.check())
        try:
            await asyncio.wait_for(asyncio.shield(self._flush), self._connect_timeout)
        except Exception:  # the caller is raising its own error; the check's outcome is logged
            log.debug("pool check after a broken connection did not finish", exc_info=True)

    async def _rollback(self, conn: AsyncConnection[Any]) -> str | None:
        """Roll back; never raises (the caller is already propagating the real error)."""
        psycopg, _ = _driver()
        try:
            await conn.execute("ROLLBACK")
        except psycopg.Error as exc:
            # a broken connection has no transaction left to roll back; the pool discards it
            return f"rollback failed ({self._scrub(str(exc))}); the connection is discarded"
        return None

    def _guard(self, what: str) -> None:
        if self._closed:
            raise LedgerUnavailable(
                f"{self!r} is closed; create a new PostgresLedger to use the database again"
            )
        if self._tx_tasks:
            task = asyncio.current_task()
            if task is not None and task in self._tx_tasks:
                raise ConfigurationError(
                    f"{what} on {self!r} from inside its own open transaction() could wait on that "
                    "transaction's row locks forever; use tx.execute()/complete_in(tx, ...) inside "
                    "the block, or call it after the block"
                )

    async def _ensure_pool(self) -> AsyncConnectionPool[Any]:
        if self._pool is not None:
            return self._pool
        if self._closed:
            self._guard("open")
        async with self._open_lock:
            if self._pool is not None:
                return self._pool
            self._guard("open")
            psycopg, pool_mod = _driver()
            self._s.check_dsn()
            pool: AsyncConnectionPool[Any] = pool_mod.AsyncConnectionPool(**self._s.pool_args())
            problem: str | None = None
            try:
                await pool.open(wait=self._min_size > 0, timeout=self._connect_timeout)
                if self._min_size == 0:  # prove the server answers at all
                    async with pool.connection(timeout=self._connect_timeout) as conn:
                        await conn.execute("SELECT 1")
            except (psycopg.Error, pool_mod.PoolTimeout) as exc:
                # the driver's message may echo the connection string: scrub it, and do not
                # chain the original exception (its text would reach tracebacks and logs)
                problem = self._s.problem(exc)
            if problem is not None:
                await pool.close(timeout=1.0)
                # the pool only says it timed out; one direct attempt says why
                raise self._s.no_connection(await self._why_no_connection() or problem)
            self._pool = pool
            return pool

    async def _why_no_connection(self) -> str | None:
        psycopg, _ = _driver()
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, connect_timeout=self._s.libpq_connect_timeout()
            )
        except psycopg.Error as exc:
            return self._s.problem(exc)
        await conn.close()
        return None

    async def _ensure_ready(self) -> AsyncConnectionPool[Any]:
        if self._ready and self._pool is not None:
            return self._pool
        async with self._ready_lock:
            if self._ready and self._pool is not None:
                return self._pool
            return await self._check_schema()

    async def _check_schema(self) -> AsyncConnectionPool[Any]:
        """Measure the clock offset and check the schema version (migrating first if asked)."""
        pool = await self._ensure_pool()
        if self._auto_migrate:
            await self.migrate()
        psycopg, _ = _driver()
        try:
            async with pool.connection(timeout=self._acquire_timeout) as conn:
                self._clock_offset, version = await _drive_on(conn, _open_steps(self._s))
        except _pool_timeout() as exc:
            raise self._pool_exhausted() from exc
        except psycopg.Error as exc:
            raise self._unavailable("open", exc) from exc
        self._s.check_version(version)
        self._ready = True
        return pool


# ---------------------------------------------------------------------- the sync twin


class SyncPostgresLedger:
    """The sync twin of a :class:`PostgresLedger` (``PostgresLedger.sync()``), for plain threads
    (a sync :class:`~replaysafe.Guard`, thread-pool consumers, Celery, Django).

    The same options (DSN, schema, table prefix, pool sizes, timeouts, ``auto_migrate``), the same
    statements, the same claim logic (:func:`_claim_steps`), row decoding and error mapping as the
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

    def __init__(self, shared: _Shared) -> None:
        psycopg, pool_mod = _driver()  # MissingExtra now, not at the first claim
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
        return time.time() + self._clock_offset

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
        rows = self._fetch("extend", self._sql("extend"), _fence_params(claim, lease=lease))
        if not rows:
            raise self._lease_lost(claim)
        return _extended(claim, rows[0][0])

    def complete(self, claim: Claim, result: str | None = None) -> Record:
        """:meth:`PostgresLedger.complete`, in the caller's thread."""
        self._guard("complete")
        rows = self._fetch("complete", self._sql("complete"), _fence_params(claim, result=result))
        if not rows:
            raise self._lease_lost(claim)
        return _record(rows[0])

    def complete_many(self, items: Sequence[tuple[Claim, str | None]]) -> list[Record | LeaseLost]:
        """:meth:`PostgresLedger.complete_many`, in the caller's thread."""
        self._guard("complete_many")
        if not items:
            self._check_open()
            return []
        if len(items) == 1:  # the single-row statement, as PostgresLedger.complete_many
            claim, result = items[0]
            one = self._fetch(
                "complete_many", self._sql("complete"), _fence_params(claim, result=result)
            )
            return [_record(one[0]) if one else self._lease_lost(claim)]
        rows = self._fetch(
            "complete_many", self._sql("complete_many"), _complete_many_params(items), binary=True
        )
        return _complete_many_outcomes(items, rows)

    def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        """:meth:`PostgresLedger.mark_started`, in the caller's thread."""
        self._guard("mark_started")
        if not claims:
            self._check_open()
            return []
        rows = self._fetch(
            "mark_started", self._sql("mark_started"), _mark_started_params(claims), binary=True
        )
        return [
            marked if marked is not None else self._lease_lost(c)
            for c, marked in zip(claims, _marked(claims, rows), strict=True)
        ]

    def release(self, claim: Claim, error: str | None = None) -> None:
        """:meth:`PostgresLedger.release`, in the caller's thread."""
        self._guard("release")
        rows = self._fetch(
            "release", self._sql("release"), _fence_params(claim, error=storable_text(error))
        )
        if not rows:
            raise self._lease_lost(claim)

    def quarantine(self, request: QuarantineRequest, claim: Claim | None = None) -> QuarantineEntry:
        """:meth:`PostgresLedger.quarantine`, in the caller's thread."""
        self._guard("quarantine")
        entry_params = _entry_params(request.storable())
        if claim is None:
            rows = self._fetch("quarantine", self._sql("upsert_entry"), entry_params)
            return _entry(rows[0])
        rows = self._fetch(
            "quarantine",
            self._sql("quarantine_claimed"),
            {**entry_params, **_fence_params(claim)},
        )
        if not rows:  # the fence refused: neither the record nor the entry was written
            raise self._lease_lost(claim)
        return _entry(rows[0])

    def get(self, key: OpKey) -> Record | None:
        """:meth:`PostgresLedger.get`, in the caller's thread."""
        rows = self._fetch("get", self._sql("get"), _get_params(key))
        return _record(rows[0]) if rows else None

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
                raise s.error("commit", exc, _COMMIT_HINT) from exc
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
            lost = _drive_on_sync(tx._conn, _complete_in_steps(self._s, claim, result))
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
        """Run :func:`_claim_steps`, each statement on a pooled connection."""
        steps = _claim_steps(self._s, requests)
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
        return _fence_error(current, claim)

    def _fetch(self, action: str, query: bytes, params: Any, *, binary: bool = False) -> _Rows:
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
            rows: _Rows = conn.execute(query, params, binary=binary).fetchall()
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
        psycopg, pool_mod = _driver()
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
                        _drive_on_sync(conn, _migration_steps(s))
                except self._pool_timeout as exc:
                    raise s.pool_exhausted() from exc
                except self._errors as exc:
                    raise s.unavailable("migrate", exc) from exc
            with pool.connection(timeout=s.acquire_timeout) as conn:
                offset, version = _drive_on_sync(conn, _open_steps(s))
        except self._pool_timeout as exc:
            raise s.pool_exhausted() from exc
        except self._errors as exc:
            raise s.unavailable("open", exc) from exc
        s.check_version(version)
        return offset

    def _why_no_connection(self) -> str | None:
        psycopg, _ = _driver()
        try:
            conn = psycopg.Connection.connect(
                self._s.dsn, connect_timeout=self._s.libpq_connect_timeout()
            )
        except psycopg.Error as exc:
            return self._s.problem(exc)
        conn.close()
        return None


# ---------------------------------------------------------------------- helpers


def _driver() -> tuple[Any, Any]:
    """``(psycopg, psycopg_pool)``, imported on first use; ``MissingExtra`` names the extra."""
    try:
        import psycopg
    except ImportError:
        raise MissingExtra("postgres", "psycopg") from None
    try:
        import psycopg_pool
    except ImportError:
        raise MissingExtra("postgres", "psycopg_pool") from None
    return psycopg, psycopg_pool


def _pool_timeout() -> type[BaseException]:
    _, pool_mod = _driver()
    timeout: type[BaseException] = pool_mod.PoolTimeout
    return timeout


def _record(row: Sequence[Any], o: int = 0) -> Record:
    """The record in ``row[o:o + 14]`` (columns in ``_REC_NAMES`` order), positionally: this runs
    for every item of every batch."""
    return Record(
        OpKey(row[o], row[o + 1]),
        row[o + 2],
        _STATES[row[o + 3]],
        row[o + 4],
        row[o + 5],
        row[o + 6],
        row[o + 7],
        row[o + 8],
        row[o + 9],
        row[o + 10],
        row[o + 11],
        row[o + 12],
        row[o + 13],
    )


def _acquired_record(r: ClaimRequest, row: Sequence[Any]) -> Record:
    """The record an acquired claim left: the request's key, fingerprint and owner, the row's
    token, lease, attempts, last_error and times (the columns of ``_ACQUIRED_COLUMNS``)."""
    return Record(
        r.key, r.fingerprint, State.IN_FLIGHT, row[6], r.owner, row[8], row[9], None, row[11],
        row[12], row[13], None, row[15],
    )  # fmt: skip


def _completed_record(claim: Claim, result: str | None, row: Sequence[Any]) -> Record:
    """The record a current ``claim`` completed with ``result``: the row of complete_many carries
    only last_error, created_at, updated_at and completed_at (``_COMPLETED_COLUMNS``)."""
    return new_record(
        claim.key, claim.fingerprint, State.COMPLETED, claim.token, claim.owner, None,
        claim.attempt, result, row[11], row[12], row[13], row[14], row[15],
    )  # fmt: skip


def _record_or_none(row: Sequence[Any] | None, o: int = 0) -> Record | None:
    return None if row is None or row[o] is None else _record(row, o)


_ORD: Final = itemgetter(0)


_entry = entry_from_row


def _purge_quarantine_name(filters: dict[str, Any]) -> str:
    """The statement name of ``purge_quarantine`` for the filters present in ``filters``."""
    used = [name for name, _ in _PURGE_QUARANTINE_FILTERS if name in filters]
    return "purge_quarantine:" + ",".join(used)


def _fence_error(current: Record | None, claim: Claim) -> LeaseLost:
    """``check_fence``'s ``LeaseLost`` for ``claim`` against ``current``.

    A fenced write can change no row while the record read afterwards still names this claim's
    token: a concurrent call with the same claim won the row in between. That is a lost fence too.
    """
    try:
        check_fence(current, claim)
    except LeaseLost as exc:
        return exc
    return LeaseLost(
        f"claim on {claim.key.scope}/{claim.key.operation_id} with fencing token {claim.token} "
        "lost to a concurrent call with the same claim; do not complete at the broker, the other "
        "call owns the outcome"
    )


__all__ = [
    "PREFIX_PATTERN",
    "PURGE_BATCH",
    "SCHEMA_PATTERN",
    "SCHEMA_VERSION",
    "MigrationReport",
    "PostgresLedger",
    "PostgresTransaction",
    "SyncPostgresLedger",
    "SyncPostgresTransaction",
    "assess_postgres",
    "redact_dsn",
]
