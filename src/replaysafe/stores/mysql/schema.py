"""The MySQL / MariaDB ledger's tables, their version, and :func:`migrate`.

Column choices (see ``docs/ledger-mysql.md``):

- Keys (scope, operation id, handler names) are ``VARBINARY`` holding their UTF-8 bytes: exact
  byte comparison, no collation folding (``a`` and ``A`` stay two operations), no ``PAD SPACE``
  (``a`` and ``a `` stay two), and ``ORDER BY`` is code-point order like every other backend.
  ``VARBINARY(255)`` + ``VARBINARY(1024)`` keep the primary key at 1279 bytes, well inside
  InnoDB's 3072-byte index limit (an operation id is at most 255 bytes by the envelope's rule;
  a utf8mb4 ``VARCHAR(255)`` would already cost 1020 bytes per column).
- Free text is ``utf8mb4`` with a binary collation; message copies are ``LONGBLOB``.
- Times are ``DOUBLE`` POSIX seconds taken from the server's clock (``UNIX_TIMESTAMP(NOW(6))``),
  so no session time zone or ``TIMESTAMP`` 2038 limit is involved.
- Fencing tokens come from the one-row table ``<prefix>tokens`` (see ``claims.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from replaysafe.errors import ConfigurationError
from replaysafe.stores.mysql.connection import MySQLConfig

if TYPE_CHECKING:
    from asyncmy.connection import Connection

#: the version :func:`migrate` brings a schema to
SCHEMA_VERSION: Final = 1

_TEXT: Final = "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
_TABLE: Final = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC"

#: table suffix -> CREATE TABLE body, in creation order (``{t}`` is the qualified name)
TABLES: Final[dict[str, str]] = {
    "schema_version": f"""CREATE TABLE IF NOT EXISTS {{t}} (
        id      TINYINT NOT NULL PRIMARY KEY,
        version INT     NOT NULL
    ) {_TABLE}""",
    "operations": f"""CREATE TABLE IF NOT EXISTS {{t}} (
        scope             VARBINARY(255)  NOT NULL,
        operation_id      VARBINARY(1024) NOT NULL,
        fingerprint       TEXT {_TEXT}    NOT NULL,
        state             VARCHAR(16) CHARACTER SET ascii NOT NULL,
        token             BIGINT          NOT NULL,
        owner             TEXT {_TEXT},
        lease_until       DOUBLE,
        attempts          INT             NOT NULL,
        result            LONGTEXT {_TEXT},
        last_error        MEDIUMTEXT {_TEXT},
        created_at        DOUBLE          NOT NULL,
        updated_at        DOUBLE          NOT NULL,
        completed_at      DOUBLE,
        unstarted_attempt INT,
        PRIMARY KEY (scope, operation_id),
        KEY {{p}}operations_purge (state, completed_at),
        KEY {{p}}operations_hot (attempts)
    ) {_TABLE}""",
    # one row: the last fencing token issued (see claims.py for why a row and not AUTO_INCREMENT)
    "tokens": f"""CREATE TABLE IF NOT EXISTS {{t}} (
        id    TINYINT NOT NULL PRIMARY KEY,
        value BIGINT  NOT NULL
    ) {_TABLE}""",
    "quarantine": f"""CREATE TABLE IF NOT EXISTS {{t}} (
        id           VARCHAR(64) CHARACTER SET ascii NOT NULL PRIMARY KEY,
        scope        VARBINARY(255)  NOT NULL,
        reason       VARCHAR(64) CHARACTER SET ascii NOT NULL,
        operation_id VARBINARY(1024),
        fingerprint  TEXT {_TEXT},
        risk         VARCHAR(64) CHARACTER SET ascii NOT NULL,
        attempts     INT        NOT NULL,
        first_detail MEDIUMTEXT {_TEXT} NOT NULL,
        last_detail  MEDIUMTEXT {_TEXT} NOT NULL,
        message      LONGBLOB,
        content_type TEXT {_TEXT},
        created_at   DOUBLE     NOT NULL,
        updated_at   DOUBLE     NOT NULL,
        seen         INT        NOT NULL,
        published_at DOUBLE,
        message_size BIGINT     NOT NULL DEFAULT 0,
        redriven_at  DOUBLE,
        redrives     INT        NOT NULL DEFAULT 0,
        KEY {{p}}quarantine_by_time (created_at, id),
        KEY {{p}}quarantine_by_reason (reason, created_at, id)
    ) {_TABLE}""",
    "paused": f"""CREATE TABLE IF NOT EXISTS {{t}} (
        handler   VARBINARY(255) NOT NULL PRIMARY KEY,
        reason    TEXT {_TEXT}   NOT NULL,
        paused_by TEXT {_TEXT}   NOT NULL,
        since     DOUBLE         NOT NULL
    ) {_TABLE}""",
}


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What :func:`migrate` did."""

    database: str
    table_prefix: str
    from_version: int
    to_version: int
    #: qualified names of the tables this run created (empty when everything existed)
    created: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.created) or self.from_version != self.to_version

    def describe(self) -> str:
        where = f"database {self.database!r} (prefix {self.table_prefix!r})"
        if not self.changed:
            return f"{where} is already at ledger version {self.to_version}; nothing to do"
        verb = "created" if self.from_version == 0 else "upgraded"
        lines = [f"{verb} ledger tables in {where}: version {self.from_version} -> "
                 f"{self.to_version}"]  # fmt: skip
        return "\n".join(lines + [f"  created {name}" for name in self.created])


async def _rows(
    conn: Connection, sql: str, params: tuple[object, ...] = ()
) -> list[tuple[object, ...]]:
    async with conn.cursor() as cur:
        await cur.execute(sql, params)
        return list(await cur.fetchall()) if cur.description else []


async def read_version(conn: Connection, config: MySQLConfig) -> int:
    """The schema version (0: no version table, or no row yet)."""
    found = await _rows(
        conn,
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = %s "
        "AND table_name = %s",
        (config.database, f"{config.table_prefix}schema_version"),
    )
    if not found or not found[0][0]:
        return 0
    rows = await _rows(conn, f"SELECT version FROM {config.table('schema_version')} WHERE id = 1")
    return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]


def check_version(config: MySQLConfig, version: int) -> None:
    """``ConfigurationError`` naming what to do unless the schema is at :data:`SCHEMA_VERSION`."""
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"the ledger tables (prefix {config.table_prefix!r}) in {config.redacted} are at "
            f"version {version}, newer than this replaysafe understands ({SCHEMA_VERSION}); "
            "upgrade replaysafe"
        )
    what = "do not exist" if version == 0 else f"are at version {version}"
    raise ConfigurationError(
        f"the ledger tables (prefix {config.table_prefix!r}) {what} in {config.redacted}; run "
        "`await ledger.migrate()` once (idempotent), or pass auto_migrate=True "
        "(URL: ?auto_migrate=1)"
    )


async def migrate(conn: Connection, config: MySQLConfig) -> MigrationReport:
    """Create the missing tables and record the version; idempotent and safe to run from many
    processes at once: they take turns under ``GET_LOCK`` (a named lock per database and
    prefix; MySQL's DDL commits on its own, so a transaction could not serialise it)."""
    lock = f"replaysafe-migrate:{config.database}:{config.table_prefix}"
    got = await _rows(conn, "SELECT GET_LOCK(%s, %s)", (lock, 60))
    if not got or got[0][0] != 1:
        raise ConfigurationError(
            f"another migration of {config.redacted} (prefix {config.table_prefix!r}) held the "
            "migration lock for 60 s; wait for it to finish and run migrate again"
        )
    try:
        before = await read_version(conn, config)
        check_version_not_newer(config, before)
        existing = {
            str(r[0])
            for r in await _rows(
                conn,
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (config.database,),
            )
        }
        created: list[str] = []
        for suffix, ddl in TABLES.items():
            name = f"{config.table_prefix}{suffix}"
            await _rows(conn, ddl.format(t=config.table(suffix), p=config.table_prefix))
            if name not in existing:
                created.append(f"{config.database}.{name}")
        await _rows(conn, f"INSERT IGNORE INTO {config.table('tokens')} (id, value) VALUES (1, 0)")
        await _rows(
            conn,
            f"INSERT INTO {config.table('schema_version')} (id, version) VALUES (1, %s) "
            "ON DUPLICATE KEY UPDATE version = VALUES(version)",
            (SCHEMA_VERSION,),
        )
    finally:
        await _rows(conn, "SELECT RELEASE_LOCK(%s)", (lock,))
    return MigrationReport(
        config.database, config.table_prefix, before, SCHEMA_VERSION, tuple(created)
    )


def check_version_not_newer(config: MySQLConfig, version: int) -> None:
    if version > SCHEMA_VERSION:
        check_version(config, version)


__all__ = ["SCHEMA_VERSION", "TABLES", "MigrationReport", "check_version", "migrate"]
