"""The ledger's statements, rendered once per schema and table prefix
(:meth:`~replaysafe.stores.postgres.connection.Shared.render_statements`). Identifiers are the
``{ops}``, ``{q}`` … fields (quoted by psycopg); values are always bound parameters."""

from __future__ import annotations

import itertools
from typing import Any, Final

#: rows deleted per statement by :meth:`PostgresLedger.purge` (each statement commits on its own,
#: so no lock is held longer than one small batch takes)
PURGE_BATCH: Final = 1000

#: what a sans-IO step asks its driver to run: (statement, parameters); the driver sends back all
#: rows (an empty list for a statement that returns none)
Step = tuple[Any, Any]
Rows = list[tuple[Any, ...]]

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


def record_columns(alias: str, *, named: bool = False) -> str:
    """The record columns of table alias ``alias`` in :func:`decode_record` order."""
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

OBJECTS: Final = {  # object key -> table suffix, for names and for "what was created"
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

INDEXES: Final = frozenset({"purge_idx", "q_by_time", "q_by_reason", "hot_idx"})

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
PURGE_QUARANTINE_FILTERS: Final = (
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
DURABILITY_SQL: Final = b"""
SELECT current_setting('fsync'), current_setting('synchronous_commit'),
       current_setting('full_page_writes'), current_setting('synchronous_standby_names'),
       current_setting('wal_writer_delay')"""


def statement_texts() -> dict[str, str]:
    """Every named statement's text, with the identifier fields (``{ops}`` …) still open."""
    rec_o = record_columns("o")
    texts = {
        "claim_one": _CLAIM.format(
            req=_REQ_ONE,
            ops="{ops}",
            seq_lit="{seq_lit}",
            ins_cols=_ACQUIRED_RETURNING,
            i_cols=_ACQUIRED_COLUMNS,
            e_cols=record_columns("e"),
        ),
        "claim_many": _CLAIM.format(
            req=_REQ_MANY,
            ops="{ops}",
            seq_lit="{seq_lit}",
            ins_cols=_ACQUIRED_RETURNING,
            i_cols=_ACQUIRED_COLUMNS,
            e_cols=record_columns("e"),
        ),
        "complete": _COMPLETE.format(ops="{ops}", fence=_FENCE, rec=rec_o),
        "complete_many": _COMPLETE_MANY.format(
            ops="{ops}",
            upd_cols=_COMPLETED_RETURNING,
            u_cols=_COMPLETED_COLUMNS,
            e_cols=record_columns("e"),
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
    for used in itertools.product((False, True), repeat=len(PURGE_QUARANTINE_FILTERS)):
        chosen = [f for f, on in zip(PURGE_QUARANTINE_FILTERS, used, strict=True) if on]
        where = " AND ".join(cond for _, cond in chosen) or "true"
        name = purge_quarantine_name(dict(chosen))
        texts[name] = _PURGE_QUARANTINE % where
    return texts


def purge_quarantine_name(filters: dict[str, Any]) -> str:
    """The statement name of ``purge_quarantine`` for the filters present in ``filters``."""
    used = [name for name, _ in PURGE_QUARANTINE_FILTERS if name in filters]
    return "purge_quarantine:" + ",".join(used)
