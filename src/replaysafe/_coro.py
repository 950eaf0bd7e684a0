"""Running a coroutine to its end without an event loop, when it never suspends.

The sync path (``Ledger.sync()`` twins, the sync :class:`~replaysafe.Guard`) runs the same async
pipeline code as the Worker, with I/O edges that do their work synchronously (a sync ledger
twin, a thread keeper): every ``await`` then completes at once, and :func:`at_once` drives the
coroutine in the caller's thread at the cost of a function call. A coroutine that does suspend
(it awaited real asyncio I/O) is an error of the caller, reported as such.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from replaysafe.errors import ConfigurationError

T = TypeVar("T")


def at_once(coro: Coroutine[Any, Any, T]) -> T:
    """The value of ``coro``, run here to its end; raises what it raises. Raises
    ``ConfigurationError`` when it suspends (awaits asyncio I/O): on the sync path every
    ``await`` must complete at once."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise ConfigurationError(
        f"{getattr(coro, '__qualname__', coro)} suspended on the sync path: something it awaits "
        "does asyncio I/O (an async middleware that awaits I/O, an async ack callback, an armed "
        "failpoint that sleeps). Use plain functions on a sync guard, or the async API "
        "(Guard.run)"
    )
