"""The options of one PostgreSQL ledger, its pools' arguments and its statements: what the async
ledger and its sync twin share (:class:`Shared`)."""

from __future__ import annotations

import math
import re
from typing import Any, Final

from replaysafe._redact import redact, secrets_of
from replaysafe.errors import ConfigurationError
from replaysafe.stores.postgres.driver import driver
from replaysafe.stores.postgres.errors import PgErrors
from replaysafe.stores.postgres.sql import INDEXES, OBJECTS, statement_texts

#: schema names: lower case, so they never need quoting rules explained; 63 bytes is PostgreSQL's
#: identifier limit. ``pg_`` is reserved for system schemas.
SCHEMA_PATTERN: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
#: table prefixes: the longest table name (prefix + "schema_version") must stay within 63 bytes
PREFIX_PATTERN: Final = re.compile(r"[a-z_][a-z0-9_]{0,39}")


class Shared(PgErrors):
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
        self.redacted = redact(dsn)
        self.secret_words = secrets_of(dsn)
        self.schema = schema
        self.prefix = table_prefix
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = float(connect_timeout)
        self.acquire_timeout = float(acquire_timeout)
        self.auto_migrate = auto_migrate
        self.names = {k: f"{table_prefix}{suffix}" for k, suffix in OBJECTS.items()}
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

    def table(self, key: str) -> str:
        """Qualified name of a ledger object (``ops``, ``q``, ``seq`` …), for display."""
        return f"{self.schema}.{self.names[key]}"

    def check_dsn(self) -> None:
        """Parse the DSN before any pool worker tries it: libpq echoes a malformed value (a bad
        percent-escape in a password, say) in its error, and the pool would log that line."""
        psycopg, _ = driver()
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
        self.q = {name: self.compose(text) for name, text in statement_texts().items()}

    def compose(self, text: str) -> bytes:
        """``text`` with ``{ops}``, ``{q}``, ``{seq}`` … replaced by quoted identifiers and
        ``{seq_lit}`` by the sequence's quoted name for ``nextval('…')``. Placeholders ``%s`` are
        left for psycopg."""
        from psycopg import sql

        # tables and sequences are schema-qualified; an index is named bare (it lives in its
        # table's schema, and CREATE INDEX refuses a qualified name)
        idents: dict[str, sql.Composable] = {
            key: sql.Identifier(name) if key in INDEXES else sql.Identifier(self.schema, name)
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
            driver()
            self.render_statements()
        return self.q[name]
