"""Driver errors in the replaysafe error tree, for every MySQL / MariaDB store.

- A deadlock (1213) or a lock wait timeout (1205) rolled the transaction back: the store retries
  the whole transaction a bounded number of times (:data:`RETRIES`), and only then raises
  ``LedgerUnavailable``. A duplicate key (1062) on a row the transaction found missing is the
  same kind of race (another claim inserted it first) and is retried alike.
- A lost or refused connection (2002, 2003, 2006, 2013, server shutdown …) is
  ``LedgerUnavailable``: the call may or may not have committed (see each call's docstring).
- Data the store cannot hold (a value too long for its column, a string that is not valid
  UTF-8, a number out of range) is ``LedgerDataError``: a retry fails the same way.
- A missing table is ``ConfigurationError`` naming the migration to run.
"""

from __future__ import annotations

from typing import Final

from replaysafe.errors import (
    ConfigurationError,
    LedgerDataError,
    LedgerUnavailable,
    ReplaysafeError,
)
from replaysafe.stores.mysql.connection import MySQLConfig, driver

#: how many times a transaction that hit a deadlock, lock wait timeout or insert race is run
RETRIES: Final = 6

#: MySQL error codes
DUP_ENTRY: Final = 1062
LOCK_WAIT_TIMEOUT: Final = 1205
DEADLOCK: Final = 1213
NO_SUCH_TABLE: Final = 1146
#: a race the store retries (the transaction was rolled back, nothing of it is kept)
RACES: Final = frozenset({LOCK_WAIT_TIMEOUT, DEADLOCK})
#: the data of this call cannot be stored (too long, bad string, out of range, not null, check)
DATA_CODES: Final = frozenset({1048, 1264, 1292, 1366, 1406, 3819, 4025})


#: server errors that mean this connection is gone: shutdown in progress, connection killed
#: (MySQL 1053; MariaDB 1927), aborted connection
LOST_CODES: Final = frozenset({1053, 1152, 1184, 1927})


def code_of(exc: BaseException) -> int | None:
    """The server's (or client library's) numeric error code, when ``exc`` carries one."""
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def is_race(exc: BaseException) -> bool:
    return code_of(exc) in RACES


def is_driver_error(exc: BaseException) -> bool:
    return isinstance(exc, driver().errors.MySQLError)


def is_connection_loss(exc: BaseException) -> bool:
    """True when ``exc`` means the connection is gone (it must not be reused)."""
    if isinstance(exc, OSError | EOFError | ConnectionError):
        return True
    errors = driver().errors
    if isinstance(exc, errors.InterfaceError):
        return True
    code = code_of(exc)
    return isinstance(exc, errors.OperationalError) and (
        code is None or code >= 2000 or code in LOST_CODES
    )


def _detail(config: MySQLConfig, exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return config.scrub(text)


def map_error(
    config: MySQLConfig, action: str, exc: BaseException, hint: str | None = None
) -> ReplaysafeError:
    """``exc`` (a driver error or ``UnicodeEncodeError``) raised by ``action`` as the replaysafe
    error it means (see the module docstring)."""
    detail = _detail(config, exc)
    code = code_of(exc)
    if isinstance(exc, UnicodeEncodeError) or code in DATA_CODES:
        return LedgerDataError(
            f"MySQL store {action} on {config.redacted} refused this call's data "
            f"({type(exc).__name__}: {detail}); the statement wrote nothing and a retry fails the "
            "same way: set the message aside (quarantine or dead-letter it) and fix what "
            "produced the value"
        )
    if code == NO_SUCH_TABLE:
        return ConfigurationError(
            f"a table of the MySQL store (prefix {config.table_prefix!r}) is missing in "
            f"{config.redacted} ({detail}); run `await ledger.migrate()` (or "
            "`await store.migrate()` for the outbox), or pass auto_migrate=True"
        )
    if hint is None:
        hint = (
            "the connection failed or was closed; the call may or may not have committed: retry, "
            "the pool reconnects"
            if is_connection_loss(exc)
            else "retry; if it persists, check the server's error log"
        )
    return LedgerUnavailable(
        f"MySQL store {action} failed on {config.redacted} ({type(exc).__name__}: {detail}); {hint}"
    )


def races_exhausted(config: MySQLConfig, action: str, exc: BaseException) -> LedgerUnavailable:
    """What a transaction raises after :data:`RETRIES` deadlocks, lock waits or insert races."""
    return LedgerUnavailable(
        f"MySQL store {action} on {config.redacted} kept racing with concurrent transactions "
        f"after {RETRIES} tries (last: {_detail(config, exc)}); nothing of it was written: retry "
        "later, and look for long transactions holding the ledger's rows"
    )


__all__ = [
    "DEADLOCK",
    "DUP_ENTRY",
    "LOCK_WAIT_TIMEOUT",
    "RETRIES",
    "code_of",
    "is_connection_loss",
    "is_driver_error",
    "is_race",
    "map_error",
    "races_exhausted",
]
