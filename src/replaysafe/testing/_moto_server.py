"""moto's server with its SQS queue operations serialised per queue:
``python -m replaysafe.testing._moto_server -H 127.0.0.1 -p PORT`` (what :func:`local_sqs` runs).

Why: moto 5.2's SQS model changes a queue's message list without its lock. ``delete_message``
rebuilds the list from a snapshot and assigns it back, so a message sent by another request
thread in between is dropped (accepted, never delivered), and two deletes at once put back the
message the other one deleted (delivered again); two receives at once can hand out the same
message. The worker server serves each request on its own thread, so our chaos runs saw exactly
that under load: a confirmed publish that no consumer ever received and the queue no longer held
(``lost``), and duplicates under at-most-once. Measured in-process (3 consumer and 2 producer
threads, 1,000 messages, a 10 us thread switch interval): without this patch 1 message lost in
4 runs and 2-5 handed out twice in every run; with it 0 and 0 in 3 runs. Real SQS does not drop
an accepted message; testing against a fake that does would blame the code under test.

The patch holds the queue's own lock (moto's ``Condition``, reentrant; a long poll's wait
releases it) around every operation that reads and then changes the message list.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["patch_sqs"]

_PATCHED = "_replaysafe_serialised"


def _per_queue(method: Callable[..., Any]) -> Callable[..., Any]:
    """A backend method ``(self, queue_name, ...)`` run under that queue's lock."""

    @functools.wraps(method)
    def locked(self: Any, queue_name: str, *args: Any, **kwargs: Any) -> Any:
        with self.get_queue(queue_name)._messages_lock:
            return method(self, queue_name, *args, **kwargs)

    return locked


def _on_queue(method: Callable[..., Any]) -> Callable[..., Any]:
    """A ``Queue`` method run under the queue's own lock."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._messages_lock:
            return method(self, *args, **kwargs)

    return locked


def patch_sqs() -> None:
    """Serialise moto's SQS queue operations (idempotent)."""
    from moto.sqs import models

    backend: Any = models.SQSBackend
    queue: Any = models.Queue
    if getattr(backend, _PATCHED, False):
        return
    for name in ("receive_message", "change_message_visibility", "purge_queue"):
        setattr(backend, name, _per_queue(getattr(backend, name)))
    queue.delete_message = _on_queue(queue.delete_message)
    setattr(backend, _PATCHED, True)


def main(argv: list[str] | None = None) -> None:
    from moto.server import main as moto_main

    patch_sqs()
    moto_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
