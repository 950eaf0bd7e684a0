"""The ledger's schema: its versions, the migration that brings a schema to
:data:`SCHEMA_VERSION`, the check at open (version and the database clock's offset) and
:class:`MigrationReport`. Steps are sans-IO (see :mod:`replaysafe.stores.postgres.steps`)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from replaysafe.errors import ConfigurationError
from replaysafe.stores.postgres.sql import Rows, Step

if TYPE_CHECKING:
    from replaysafe.stores.postgres.connection import Shared

#: the version :meth:`PostgresLedger.migrate` brings a schema to (see ``_MIGRATIONS``)
SCHEMA_VERSION: Final = 4

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


def check_version(s: Shared, version: int) -> None:
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
            f"ledger schema {s.schema!r} is at version {version}, newer than this "
            f"replaysafe understands ({SCHEMA_VERSION}); upgrade replaysafe"
        )
    prefix = "" if s.prefix == "rs_" else f" --table-prefix {s.prefix}"
    raise ConfigurationError(
        f"the ledger schema {s.schema!r} (prefix {s.prefix!r}) {what} in "
        f"{s.redacted}; run `replaysafe ledger migrate --dsn DSN --schema "
        f"{s.schema}{prefix}` (or `await ledger.migrate()`, or pass auto_migrate=True)"
    )


def corrected_now(offset: float) -> float:
    """This host's clock corrected by ``offset`` (measured by :func:`open_steps`): for display
    and nack delays only, leases are judged by the database in every statement."""
    return time.time() + offset


def open_steps(s: Shared) -> Generator[Step, Rows, tuple[float, int]]:
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


def migration_steps(s: Shared) -> Generator[Step, Rows, MigrationReport]:
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


def _existing_objects(s: Shared) -> Generator[Step, Rows, list[str]]:
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
