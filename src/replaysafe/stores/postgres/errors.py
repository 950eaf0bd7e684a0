"""Driver errors to replaysafe errors, for the ledger and its sync twin: what failed, on which
server (password redacted, every spelling of it scrubbed from the driver's text), and what to do
next. A refused value is ``LedgerDataError`` (a retry fails the same way); everything else is
``LedgerUnavailable`` (a write in flight may or may not have committed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from replaysafe._redact import scrub
from replaysafe.errors import (
    ConfigurationError,
    LedgerDataError,
    LedgerError,
    LedgerUnavailable,
    ReplaysafeError,
)
from replaysafe.stores.postgres.driver import driver, psycopg_module

#: why a failed COMMIT leaves the outcome unknown, and how to learn it
COMMIT_HINT: Final = (
    "the transaction may or may not have committed; the next claim of the operation tells "
    "(AlreadyDone if it did)"
)


class PgErrors:
    """The error mapping of :class:`~replaysafe.stores.postgres.connection.Shared` (one instance
    per ledger, shared with its sync twin): needs only the redacted DSN, the password's spellings
    and the options the messages name."""

    redacted: str
    secret_words: list[str]
    schema: str
    max_size: int
    connect_timeout: float
    acquire_timeout: float

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

    def scrub(self, text: str) -> str:
        """``text`` with every spelling of the DSN's password replaced by ``***``."""
        return scrub(text, self.secret_words)

    def error(self, action: str, exc: BaseException, hint: str | None = None) -> LedgerError:
        """A failed statement's error in the replaysafe tree: ``LedgerDataError`` when the server
        (or the driver, while encoding a parameter) refused this call's data — a NUL byte or a
        lone surrogate in a key or result, a number out of range, a violated constraint — which a
        retry cannot change; else :meth:`unavailable`."""
        psycopg, _ = driver()
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
        psycopg, _ = driver()
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


def outbox_error(
    what: str,
    exc: BaseException,
    table: str,
    redacted: str,
    scrub: Callable[[str], str],
    hint: str | None = None,
) -> ReplaysafeError:
    """A failed outbox statement's error: ``ConfigurationError`` naming the command to run when
    the outbox table (or its schema) is missing, else ``LedgerUnavailable`` with the driver's
    first line (``scrub`` removes the password's spellings) and ``hint``, or a hint that says
    whether to retry."""
    psycopg = psycopg_module()
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
        return ConfigurationError(
            f"the outbox table {table} does not exist on {redacted}; run "
            "`await store.migrate()` (or `replaysafe outbox migrate`) once"
        )
    text = str(exc).strip()
    detail = scrub(text.splitlines()[0] if text else "")
    if hint is None:
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            hint = (
                "the connection failed or was closed; nothing of this call is assumed "
                "committed: retry, the pool reconnects"
            )
        else:
            hint = "retry; if it persists, check the server log for this error"
    return LedgerUnavailable(
        f"PostgreSQL outbox {what} failed on {redacted} ({type(exc).__name__}: {detail}); {hint}"
    )
