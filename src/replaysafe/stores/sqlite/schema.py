"""The SQLite ledger's schema: the tables and indexes (created ``IF NOT EXISTS`` on every
open) and the upgrade of a file written by an older version, both inside the opener's
``BEGIN IMMEDIATE`` so concurrent openers take turns and the later ones find it done."""

from __future__ import annotations

import sqlite3
from typing import Final

from replaysafe.errors import ConfigurationError

#: 2: quarantine entries keep ``published_at``, ``message_size``, ``redriven_at``, ``redrives``;
#: index of retried operations for :meth:`SQLiteLedger.summary`.
#: 3: ``replaysafe_paused``, the handlers paused by ``replaysafe handler pause``.
#: 4: ``replaysafe_operations.unstarted_attempt`` (``mark_started``); NULL in older rows, which a
#: recovering claim reads conservatively as "may have started".
SCHEMA_VERSION: Final = 4

SCHEMA: Final = (
    # The key is the composite (scope, operation_id): ("a:b", "c") and ("a", "b:c") never collide.
    """CREATE TABLE IF NOT EXISTS replaysafe_operations (
        scope        TEXT    NOT NULL,
        operation_id TEXT    NOT NULL,
        fingerprint  TEXT    NOT NULL,
        state        TEXT    NOT NULL,
        token        INTEGER NOT NULL,
        owner        TEXT,
        lease_until  REAL,
        attempts     INTEGER NOT NULL,
        result       TEXT,
        last_error   TEXT,
        created_at   REAL    NOT NULL,
        updated_at   REAL    NOT NULL,
        completed_at REAL,
        unstarted_attempt INTEGER,
        PRIMARY KEY (scope, operation_id)
    ) WITHOUT ROWID""",
    # purge walks only completed rows, oldest first, and stops at its limit
    """CREATE INDEX IF NOT EXISTS replaysafe_operations_purge
        ON replaysafe_operations (state, completed_at)""",
    """CREATE TABLE IF NOT EXISTS replaysafe_quarantine (
        id           TEXT    PRIMARY KEY,
        scope        TEXT    NOT NULL,
        reason       TEXT    NOT NULL,
        operation_id TEXT,
        fingerprint  TEXT,
        risk         TEXT    NOT NULL,
        attempts     INTEGER NOT NULL,
        first_detail TEXT    NOT NULL,
        last_detail  TEXT    NOT NULL,
        message      BLOB,
        content_type TEXT,
        created_at   REAL    NOT NULL,
        updated_at   REAL    NOT NULL,
        seen         INTEGER NOT NULL,
        published_at REAL,
        message_size INTEGER NOT NULL DEFAULT 0,
        redriven_at  REAL,
        redrives     INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE INDEX IF NOT EXISTS replaysafe_quarantine_by_reason
        ON replaysafe_quarantine (reason, created_at)""",
    # listing and purge_quarantine walk entries oldest first and stop at their limit
    """CREATE INDEX IF NOT EXISTS replaysafe_quarantine_by_time
        ON replaysafe_quarantine (created_at, id)""",
    # summary()'s hot operations: only retried rows are indexed (most operations succeed on their
    # first attempt), so it stays small and a first claim never touches it
    """CREATE INDEX IF NOT EXISTS replaysafe_operations_hot
        ON replaysafe_operations (attempts DESC, scope, operation_id) WHERE attempts > 1""",
    # One row: the last fencing token issued by any connection to this file.
    """CREATE TABLE IF NOT EXISTS replaysafe_meta (
        id             INTEGER PRIMARY KEY CHECK (id = 1),
        last_token     INTEGER NOT NULL,
        schema_version INTEGER NOT NULL
    )""",
    f"""INSERT OR IGNORE INTO replaysafe_meta (id, last_token, schema_version)
        VALUES (1, 0, {SCHEMA_VERSION})""",
    # Version 3: one row per paused handler (no row: running). Created IF NOT EXISTS on every
    # open, so an older file gains it before upgrade moves its version.
    """CREATE TABLE IF NOT EXISTS replaysafe_paused (
        handler   TEXT PRIMARY KEY,
        reason    TEXT NOT NULL,
        paused_by TEXT NOT NULL,
        since     REAL NOT NULL
    ) WITHOUT ROWID""",
)

#: Columns a version-1 file lacks, added by ``ALTER TABLE`` when the file is opened (SQLite has no
#: ``ADD COLUMN IF NOT EXISTS``: ``PRAGMA table_info`` decides). Constant definitions only.
ADDED_QUARANTINE_COLUMNS: Final = (
    ("published_at", "REAL"),
    ("message_size", "INTEGER NOT NULL DEFAULT 0"),
    ("redriven_at", "REAL"),
    ("redrives", "INTEGER NOT NULL DEFAULT 0"),
)

#: Columns an older file lacks in ``replaysafe_operations``, added by ``ALTER TABLE`` on open.
ADDED_OPERATION_COLUMNS: Final = (("unstarted_attempt", "INTEGER"),)


def create_or_upgrade(conn: sqlite3.Connection, path: str) -> None:
    """Create the tables and indexes and bring an older file to :data:`SCHEMA_VERSION`, in one
    ``BEGIN IMMEDIATE`` transaction (rolled back if anything fails). Raises
    ``ConfigurationError`` for a file of a newer schema version (nothing changed), ``sqlite3``
    errors unmapped (the caller maps them)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA:
            conn.execute(statement)
        (version,) = conn.execute("SELECT schema_version FROM replaysafe_meta").fetchone()
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"{path!r} has ledger schema version {version}, newer than this "
                f"replaysafe understands ({SCHEMA_VERSION}); upgrade replaysafe"
            )
        if version < SCHEMA_VERSION:
            upgrade(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def upgrade(conn: sqlite3.Connection) -> None:
    """Bring a file of an older schema version to :data:`SCHEMA_VERSION`, inside the caller's
    ``BEGIN IMMEDIATE`` (so concurrent openers take turns and the later ones find it done).
    Idempotent: each column is added only if ``PRAGMA table_info`` does not list it. New tables
    (version 3's ``replaysafe_paused``) come from the ``CREATE … IF NOT EXISTS`` statements that
    run before this."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(replaysafe_quarantine)")}
    for name, definition in ADDED_QUARANTINE_COLUMNS:
        if name not in present:
            # fixed names and definitions from the tuple above: nothing user-supplied
            conn.execute(f"ALTER TABLE replaysafe_quarantine ADD COLUMN {name} {definition}")
    ops = {row[1] for row in conn.execute("PRAGMA table_info(replaysafe_operations)")}
    for name, definition in ADDED_OPERATION_COLUMNS:
        if name not in ops:
            # version 4; existing rows keep NULL: "may have started" to a recovering claim
            conn.execute(f"ALTER TABLE replaysafe_operations ADD COLUMN {name} {definition}")
    if "message_size" not in present:
        # the original size of older entries is unknown; the stored copy's length is a lower bound
        # (and keeps message_size >= len(message), which `truncated` relies on)
        conn.execute(
            "UPDATE replaysafe_quarantine SET message_size = length(message) "
            "WHERE message IS NOT NULL"
        )
    conn.execute("UPDATE replaysafe_meta SET schema_version = ?", (SCHEMA_VERSION,))
