"""The PostgreSQL outbox's statements and row decoding, pure (no connection): identifiers are
validated names composed with ``psycopg.sql.Identifier``, values always bound parameters."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from replaysafe.outbox.base import OutboxRow, OutboxState, Skip, parse_headers

if TYPE_CHECKING:
    from psycopg.sql import Composable, Composed

#: rows per INSERT statement (9 bound values each, far below PostgreSQL's 65535)
INSERT_CHUNK: Final = 500

COLUMNS: Final = (
    "id",
    "destination",
    "operation_id",
    "ordering_key",
    "body",
    "headers",
    "content_type",
    "fingerprint",
    "published_at",
    "staged_at",
    "state",
    "published_at_broker",
)
INSERT_COLUMNS: Final = COLUMNS[1:10]


def int32(text: str) -> int:
    """A stable signed 32-bit hash (advisory lock keys are int4 pairs)."""
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest(), "big", signed=True
    )


def decode_row(values: Sequence[Any]) -> OutboxRow:
    return OutboxRow(
        id=int(values[0]),
        destination=values[1],
        operation_id=values[2],
        key=values[3],
        body=bytes(values[4]),
        headers=parse_headers(values[5]),
        content_type=values[6],
        fingerprint=values[7],
        published_at=float(values[8]),
        staged_at=float(values[9]),
        state=OutboxState(values[10]),
        published_at_broker=None if values[11] is None else float(values[11]),
    )


def table_ident(schema: str, table: str) -> Composable:
    """The outbox table, schema-qualified."""
    from psycopg import sql

    return sql.Identifier(schema, table)


def index_ident(table: str, suffix: str) -> Composable:
    """An index of the outbox table (bare: it lives in its table's schema)."""
    from psycopg import sql

    return sql.Identifier(f"{table}_{suffix}")


def column_list(names: Sequence[str], alias: str | None = None) -> Composable:
    """``names`` as a comma-separated identifier list, qualified by ``alias`` when given."""
    from psycopg import sql

    if alias is None:
        return sql.SQL(", ").join(sql.Identifier(c) for c in names)
    return sql.SQL(", ").join(sql.Identifier(alias, c) for c in names)


def migration_statements(schema: str, table: str) -> list[Composed]:
    """The schema, table and indexes, each ``IF NOT EXISTS`` (run under the migrate lock)."""
    from psycopg import sql

    t = table_ident(schema, table)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)),
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {} (
                id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                destination         text NOT NULL,
                operation_id        text NOT NULL,
                ordering_key        text,
                body                bytea NOT NULL,
                headers             jsonb NOT NULL,
                content_type        text NOT NULL,
                fingerprint         text NOT NULL,
                published_at        double precision NOT NULL,
                staged_at           double precision NOT NULL,
                state               text NOT NULL DEFAULT 'pending'
                                    CHECK (state IN ('pending', 'published')),
                published_at_broker double precision
            )"""
        ).format(t),
        # relays walk pending rows in sequence order
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (id) WHERE state = 'pending'").format(
            index_ident(table, "pending"), t
        ),
        # the claim's "earlier pending row of the same key" check
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {} ON {} (destination, ordering_key, id) "
            "WHERE state = 'pending'"
        ).format(index_ident(table, "pending_key"), t),
        # cleanup walks published rows, oldest mark first
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {} ON {} (published_at_broker) WHERE state = 'published'"
        ).format(index_ident(table, "published"), t),
    ]


def claim_statement(schema: str, table: str, limit: int, skip: Skip) -> tuple[Composed, list[Any]]:
    """The relay's claim: the oldest pending rows not skipped, locked ``FOR UPDATE SKIP LOCKED``,
    minus any whose key has an earlier pending row the claim does not hold."""
    from psycopg import sql

    where = [sql.SQL("state = 'pending'")]
    params: list[Any] = []
    if skip.destinations:
        where.append(sql.SQL("NOT (destination = ANY(%s::text[]))"))
        params.append(sorted(skip.destinations))
    if skip.keys:
        pairs = sorted(skip.keys)
        where.append(
            sql.SQL(
                "NOT EXISTS (SELECT 1 FROM unnest(%s::text[], %s::text[]) AS s(d, k) "
                "WHERE s.d = destination AND s.k = ordering_key)"
            )
        )
        params += [[d for d, _ in pairs], [k for _, k in pairs]]
    if skip.row_ids:
        where.append(sql.SQL("NOT (id = ANY(%s::bigint[]))"))
        params.append(sorted(skip.row_ids))
    params.append(limit)
    query = sql.SQL(
        """WITH claimed AS MATERIALIZED (
               SELECT {cols} FROM {t} WHERE {where}
               ORDER BY id LIMIT %s
               FOR UPDATE SKIP LOCKED
           )
           SELECT {ccols} FROM claimed c
           WHERE NOT EXISTS (
               SELECT 1 FROM {t} e
               WHERE e.state = 'pending'
                 AND e.destination = c.destination
                 AND e.ordering_key = c.ordering_key
                 AND e.id < c.id
                 AND e.id NOT IN (SELECT id FROM claimed)
           )
           ORDER BY c.id"""
    ).format(
        cols=column_list(COLUMNS),
        t=table_ident(schema, table),
        where=sql.SQL(" AND ").join(where),
        ccols=column_list(COLUMNS, "c"),
    )
    return query, params
