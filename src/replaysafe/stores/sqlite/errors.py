"""How the SQLite ledger's failures enter the :class:`~replaysafe.errors.ReplaysafeError`
tree: data SQLite (or the driver, while binding) refused (``LedgerDataError``: a retry fails the
same way) versus a file, disk or lock that failed (``LedgerUnavailable``: worth a retry)."""

from __future__ import annotations

import sqlite3
from typing import Final

from replaysafe.errors import ConfigurationError, LedgerDataError, LedgerError, LedgerUnavailable

#: errors caused by the data of a call, not by the file or the disk (a retry cannot help): a
#: violated constraint, a value SQLite or the driver cannot bind (a str with a lone surrogate has
#: no UTF-8 form; an int beyond 64 bits), a value of a type it cannot store
DATA_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    UnicodeEncodeError,
    OverflowError,
)


def is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def ledger_error(path: str, busy_timeout: float, exc: BaseException) -> LedgerError:
    """A failed call's error in the replaysafe tree: ``LedgerDataError`` when SQLite (or the
    driver, while binding) refused this call's data, which a retry cannot change; else
    ``LedgerUnavailable`` (I/O, a busy lock, a broken file: worth a retry)."""
    if isinstance(exc, sqlite3.Error) and not isinstance(exc, DATA_ERRORS):
        return unavailable_error(path, busy_timeout, exc)
    return LedgerDataError(
        f"SQLite ledger {path!r} refused this call's data ({type(exc).__name__}: "
        f"{exc}); nothing of the call was written and a retry fails the same way: set the "
        "message aside (quarantine or dead-letter it) and fix what produced the value"
    )


def unavailable_error(path: str, busy_timeout: float, exc: sqlite3.Error) -> LedgerUnavailable:
    """``exc`` (the file, the disk or the lock failed) as ``LedgerUnavailable``, saying what to
    do about a busy lock or a broken file."""
    if isinstance(exc, sqlite3.OperationalError) and is_busy(exc):
        hint = (
            f"could not get the write lock on {path!r} within "
            f"busy_timeout={busy_timeout:g}s: another connection holds it (a long "
            "transaction elsewhere); retry, keep transactions short, or raise busy_timeout"
        )
    else:
        hint = (
            f"check that {path!r} is a SQLite database on a local disk with free space "
            "and that its directory is writable, then retry"
        )
    return LedgerUnavailable(f"SQLite ledger error ({type(exc).__name__}: {exc}); {hint}")


def outbox_stage_error(path: str, exc: sqlite3.Error) -> Exception:
    """The outbox's ``stage`` failed inside the caller's transaction: ``ConfigurationError`` when
    its tables were never created (``migrate`` once), else ``LedgerUnavailable`` (the rows will
    not commit; retry the operation)."""
    if "no such table" in str(exc):
        return ConfigurationError(
            f"the outbox tables do not exist in {path!r}; call "
            "`await store.migrate()` once at start-up (it is idempotent)"
        )
    return LedgerUnavailable(
        f"SQLite outbox could not stage rows in {path!r} "
        f"({type(exc).__name__}: {exc}); the transaction will not commit them: let the error "
        "leave the block and retry the operation"
    )
