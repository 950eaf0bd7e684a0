"""redis-py errors mapped to the replaysafe tree: what happened, whether the server may have run
the call, and what to do next. One mapping for the async ledger and its sync twin."""

from __future__ import annotations

import re
from typing import Any, Final

from replaysafe._redact import scrub
from replaysafe.errors import (
    ConfigurationError,
    LedgerDataError,
    LedgerError,
    LedgerUnavailable,
)

#: how Redis words an error raised inside a Lua script (7.x: "user_script:12: …" or "… on
#: @user_script:12."; 6.x: "Error running script …"), as opposed to a reply about its own state
_LUA_ERROR: Final = re.compile(r"user_script:\d+|Error running script")
#: an error code redis-py keeps in the message (it strips only the codes it maps to a class, ERR
#: among them): MISCONF, NOREPLICAS, BUSY … say the server cannot write now, whatever the data
_STATE_CODE: Final = re.compile(r"[A-Z]{2,} ")


def ledger_error(
    errors: Any,
    exc: BaseException,
    what: str,
    *,
    display: str,
    prefix: str,
    secrets: tuple[str, ...],
    sent: bool,
    batch: bool = False,
) -> LedgerError | ConfigurationError:
    """Map ``exc`` (a redis-py error; ``errors`` is ``redis.exceptions``) raised by the call
    ``what`` on the ledger at ``display`` (its URL, redacted) under ``prefix``: what happened,
    what to do next. ``secrets`` (the URL's password spellings) are scrubbed from the driver's
    words. ``sent``: the call may have reached the server (a lost reply then says the script
    may or may not have run); ``batch``: it carried several items."""
    e = errors
    text = scrub(f"{type(exc).__name__}: {exc}", secrets)
    where = f"Redis ledger at {display}: {what} failed ({text})"
    if isinstance(exc, e.ResponseError) and str(exc).startswith("WRONGTYPE"):
        return ConfigurationError(
            f"{where}; a key under prefix {prefix!r} holds a value the ledger did not "
            "write: another program uses this prefix; give the ledger a prefix of its own"
        )
    if isinstance(exc, e.ResponseError) and "replaysafe bug" in str(exc):
        return LedgerError(f"{where}; nothing was written; please report this replaysafe bug")
    if isinstance(exc, e.DataError) or (
        type(exc) is e.ResponseError  # not OOM, READONLY, NOPERM …: the server's state
        and _LUA_ERROR.search(str(exc)) is not None
        and _STATE_CODE.match(str(exc)) is None
    ):
        # a value redis-py cannot send, or a ledger script that failed on this call's data:
        # the server is up and a retry fails the same way
        done = "nothing was sent" if isinstance(exc, e.DataError) else (
            "Redis does not roll a failed script back: its writes before the failure stay"
        )  # fmt: skip
        return LedgerDataError(
            f"{where}; the ledger refused this call's data ({done}); a retry fails the same "
            "way: set the message aside (quarantine or dead-letter it) and report the value "
            "if it looks ordinary"
        )
    if isinstance(exc, e.AuthenticationError | e.AuthorizationError | e.NoPermissionError):
        hint = (
            "check the URL's username and password and the user's ACL (the ledger needs "
            "EVALSHA, SCRIPT LOAD, HGETALL, ZRANGE and, for explain, CONFIG GET), then retry"
        )
    elif isinstance(exc, e.BusyLoadingError):
        hint = "Redis is loading its dataset after a restart; retry in a moment"
    elif isinstance(exc, e.ReadOnlyError):
        hint = (
            "the server is a read-only replica (after a failover?); point the ledger at the "
            "primary, then retry"
        )
    elif isinstance(exc, e.OutOfMemoryError):
        hint = (
            "Redis reached maxmemory and refuses writes (the ledger wants noeviction rather "
            "than losing records); free memory or raise maxmemory, then retry"
        )
    elif isinstance(exc, e.ResponseError) and str(exc).startswith("MISCONF"):
        hint = "Redis cannot persist to disk and refuses writes; fix its disk, then retry"
    else:
        hint = "check that Redis is running and reachable, then retry"
    lost = isinstance(exc, e.ConnectionError | e.TimeoutError) and not isinstance(
        exc, e.AuthenticationError | e.AuthorizationError | e.BusyLoadingError
    )
    if sent and lost:
        hint += (
            "; the reply was lost, so the script may or may not have run"
            + (" (for any item of the batch)" if batch else "")
            + ": an unknown claim expires with its lease and the next claim reports "
            "recovered=True; an unknown completion shows as AlreadyDone to the next claim; "
            "do not complete at the broker"
        )
    elif batch:
        hint += "; items before the failing one in the batch may have been applied"
    return LedgerUnavailable(f"{where}; {hint}")
