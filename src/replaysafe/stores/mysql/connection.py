"""Connections to MySQL / MariaDB: the validated, frozen :class:`MySQLConfig` (keywords or a
``mysql://`` / ``mariadb://`` URL), the lazy driver import and a small connection pool.

Every connection the store opens is set up the same way, because the ledger's correctness rests
on it: ``utf8mb4``, autocommit (a ledger call that needs a transaction says ``BEGIN`` itself),
``READ COMMITTED`` (see ``docs/ledger-mysql.md``: no gap locks on missing keys, and every locking
read sees the latest committed row), strict SQL mode (a value that does not fit is an error, never
silently truncated), UTC session time zone, ``CLIENT_FOUND_ROWS`` (a fenced ``UPDATE`` that
matched its row counts it even when nothing changed) and a bounded ``innodb_lock_wait_timeout``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import unquote, urlsplit

from replaysafe._redact import redact
from replaysafe._url import flag, take_options
from replaysafe.errors import ConfigurationError, LedgerUnavailable, MissingExtra

if TYPE_CHECKING:  # the driver is an optional extra (``mysql``): imported lazily at run time
    from asyncmy.connection import Connection

#: database names: what MySQL allows unquoted, minus ``$`` (64 characters is its identifier limit)
DATABASE_PATTERN: Final = re.compile(r"[A-Za-z0-9_]{1,64}")
#: table prefixes: the longest table name (prefix + ``schema_version``) stays within 64 characters
PREFIX_PATTERN: Final = re.compile(r"[a-z_][a-z0-9_]{0,39}")
#: seconds a statement waits for a row lock before MySQL gives up (error 1205, retried)
LOCK_WAIT_TIMEOUT: Final = 10

#: what the connection runs once, right after connecting (see the module docstring)
_SESSION_SETUP: Final = (
    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
    "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION,ERROR_FOR_DIVISION_BY_ZERO',"
    f" time_zone = '+00:00', innodb_lock_wait_timeout = {LOCK_WAIT_TIMEOUT}",
)


def driver() -> Any:
    """The ``asyncmy`` module, or ``MissingExtra`` naming the ``mysql`` extra."""
    try:
        import asyncmy
    except ImportError:
        raise MissingExtra("mysql", "asyncmy") from None
    return asyncmy


@dataclass(frozen=True, slots=True)
class MySQLConfig:
    """Where a MySQL / MariaDB store lives and how it connects; validated when built, frozen.

    ``table_prefix`` names the store's tables (``<prefix>operations``, ``<prefix>quarantine``,
    ``<prefix>paused``, ``<prefix>tokens``, ``<prefix>schema_version``, ``<prefix>outbox`` …) in
    ``database``. The pool holds up to ``max_size`` connections; ``connect_timeout`` bounds
    opening one, ``acquire_timeout`` waiting for a free one. ``auto_migrate``: the first call
    creates or upgrades the schema instead of refusing a missing one. The password never appears
    in ``repr`` (it is left out) or in any message (see :attr:`redacted`).
    """

    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str = field(default="", repr=False)
    database: str = "test"
    table_prefix: str = "rs_"
    max_size: int = 10
    connect_timeout: float = 5.0
    acquire_timeout: float = 10.0
    auto_migrate: bool = False

    #: URL schemes :meth:`from_url` reads
    SCHEMES: ClassVar[tuple[str, ...]] = ("mysql", "mariadb")

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigurationError(f"MySQL host must be a non-empty string, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ConfigurationError(f"MySQL port must be an integer, got {self.port!r}")
        if not 1 <= self.port <= 65535:
            raise ConfigurationError(f"MySQL port {self.port} is out of range; use 1-65535")
        if not isinstance(self.user, str) or not self.user:
            raise ConfigurationError("MySQL user must be a non-empty string (e.g. user='app')")
        if not isinstance(self.password, str):
            raise ConfigurationError("MySQL password must be a string")
        if not isinstance(self.database, str) or not DATABASE_PATTERN.fullmatch(self.database):
            raise ConfigurationError(
                f"MySQL database {self.database!r} is not valid; use 1-64 letters, digits and "
                "underscores (create it first: CREATE DATABASE name CHARACTER SET utf8mb4)"
            )
        if not isinstance(self.table_prefix, str) or not PREFIX_PATTERN.fullmatch(
            self.table_prefix
        ):
            raise ConfigurationError(
                f"table_prefix {self.table_prefix!r} is not valid; use 1-40 characters of "
                "lower-case letters, digits and underscores, starting with a letter or underscore"
            )
        if isinstance(self.max_size, bool) or not isinstance(self.max_size, int):
            raise ConfigurationError(f"max_size must be an integer, got {self.max_size!r}")
        if self.max_size < 1:
            raise ConfigurationError(f"max_size must be >= 1 connection, got {self.max_size}")
        for name in ("connect_timeout", "acquire_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigurationError(f"{name} must be a number of seconds > 0, got {value!r}")
        if not isinstance(self.auto_migrate, bool):
            raise ConfigurationError(
                f"auto_migrate must be True or False, got {self.auto_migrate!r}"
            )

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> MySQLConfig:
        """The configuration ``url`` names: ``mysql://user:password@host:3306/database`` (or
        ``mariadb://``), whose query may carry ``table_prefix``, ``max_size``,
        ``connect_timeout``, ``acquire_timeout`` and ``auto_migrate`` (``1``/``0``).
        ``overrides`` (the keyword form's names) win over the URL. ``ConfigurationError``
        (password redacted) for anything else."""
        shown = redact(url)
        rest, options = take_options(url, _URL_OPTIONS, what="MySQL")
        try:
            parts = urlsplit(rest)
            port = parts.port
        except ValueError:
            raise ConfigurationError(
                f"MySQL URL {shown} does not parse; use mysql://user:password@host:3306/database "
                "(percent-encode special characters of the password)"
            ) from None
        if parts.scheme.lower() not in cls.SCHEMES:
            raise ConfigurationError(
                f"{shown} is not a MySQL URL; use mysql://user:password@host:3306/database"
            )
        if parts.query:
            unknown = sorted({p.split("=", 1)[0] for p in parts.query.split("&") if p})
            raise ConfigurationError(
                f"MySQL URL {shown} has unknown option(s) {', '.join(unknown)}; the options are "
                f"{', '.join(_URL_OPTIONS)}"
            )
        values: dict[str, Any] = {}
        if parts.hostname:
            values["host"] = parts.hostname
        if port is not None:
            values["port"] = port
        if parts.username:
            values["user"] = unquote(parts.username)
        if parts.password is not None:
            values["password"] = unquote(parts.password)
        database = parts.path.lstrip("/")
        if database:
            values["database"] = unquote(database)
        known = {f.name for f in fields(cls)}
        stray = sorted(set(overrides) - known)
        if stray:
            raise ConfigurationError(
                f"unknown MySQL option(s) {', '.join(stray)}; the options are "
                f"{', '.join(sorted(known))}"
            )
        return cls(**{**values, **options, **overrides})

    @property
    def redacted(self) -> str:
        """The configuration as a URL with the password replaced by ``***``."""
        secret = ":***" if self.password else ""
        return f"mysql://{self.user}{secret}@{self.host}:{self.port}/{self.database}"

    def scrub(self, text: str) -> str:
        """``text`` with the password removed (driver messages may echo connection details)."""
        return text.replace(self.password, "***") if self.password else text

    def table(self, suffix: str) -> str:
        """The quoted, qualified name of one of the store's tables (identifiers validated)."""
        return f"`{self.database}`.`{self.table_prefix}{suffix}`"


#: MySQLConfig.from_url: the store's own query parameters
_URL_OPTIONS: Final[dict[str, Callable[[str], Any]]] = {
    "table_prefix": str,
    "max_size": int,
    "connect_timeout": float,
    "acquire_timeout": float,
    "auto_migrate": flag,
}


class Pool:
    """Up to ``max_size`` connections, opened on demand and reused.

    A connection goes back to the idle list only when it is alive and outside a transaction;
    any other is closed. When one connection is found dead, the idle ones are dropped too (a
    server restart or failover killed them all), so the next call connects afresh instead of
    failing once per dead connection."""

    def __init__(self, config: MySQLConfig) -> None:
        self._config = config
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(config.max_size)
        self._closed = False

    async def acquire(self) -> Connection:
        """A live connection; ``LedgerUnavailable`` when none frees up within
        ``acquire_timeout`` or the server cannot be reached."""
        if self._closed:
            raise LedgerUnavailable(f"the pool for {self._config.redacted} is closed")
        try:
            await asyncio.wait_for(self._slots.acquire(), self._config.acquire_timeout)
        except TimeoutError:
            raise LedgerUnavailable(
                f"no free connection to {self._config.redacted} within "
                f"{self._config.acquire_timeout:g}s (all {self._config.max_size} in use); raise "
                "max_size or acquire_timeout, or look for calls that hold connections long"
            ) from None
        try:
            while self._idle:
                conn = self._idle.pop()
                if conn.connected:
                    return conn
            return await self._connect()
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: Connection, *, broken: bool = False) -> None:
        """Hand ``conn`` back (never a coroutine: safe in ``finally`` under cancellation)."""
        try:
            if broken:
                self.drop_idle()
            if self._closed or broken or not conn.connected or conn.get_transaction_status():
                conn.close()
            else:
                self._idle.append(conn)
        finally:
            self._slots.release()

    def drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def close(self) -> None:
        self._closed = True
        self.drop_idle()

    async def _connect(self) -> Connection:
        asyncmy = driver()
        from asyncmy.constants import CLIENT

        c = self._config
        try:
            conn: Connection = await asyncio.wait_for(
                asyncmy.connect(
                    host=c.host,
                    port=c.port,
                    user=c.user,
                    password=c.password,
                    database=c.database,
                    charset="utf8mb4",
                    autocommit=True,
                    client_flag=CLIENT.FOUND_ROWS,
                    connect_timeout=c.connect_timeout,
                ),
                c.connect_timeout,
            )
        except (OSError, TimeoutError, asyncmy.errors.MySQLError) as exc:
            problem = c.scrub(" ".join(str(exc).split())) or "timed out"
            # not chained: the driver's text could carry connection details into tracebacks
            raise LedgerUnavailable(
                f"could not connect to MySQL/MariaDB at {c.redacted} within "
                f"{c.connect_timeout:g}s ({type(exc).__name__}: {problem}); check that the "
                "server is up, reachable and accepts this user and database, then retry"
            ) from None
        try:
            async with conn.cursor() as cur:
                for statement in _SESSION_SETUP:
                    await cur.execute(statement)
        except asyncmy.errors.MySQLError as exc:
            conn.close()
            raise LedgerUnavailable(
                f"MySQL/MariaDB at {c.redacted} refused the session setup "
                f"({c.scrub(str(exc))}); it needs InnoDB and READ COMMITTED sessions"
            ) from None
        return conn


__all__ = ["DATABASE_PATTERN", "PREFIX_PATTERN", "MySQLConfig", "Pool", "driver"]
