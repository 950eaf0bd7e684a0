"""Start-up check of a worker: refuse to run when the broker or the ledger is not usable, and
say where each handler's messages wait.

``replaysafe run`` calls :func:`preflight` before the worker subscribes. It probes, at the same
time and within ``within`` seconds:

- the ledger: :meth:`Ledger.probe` (reachable, schema version current, may read the control flags
  and the quarantine, may claim and complete an operation of its own);
- the broker: :meth:`Broker.check`, then :meth:`Broker.group_state` of every handler of the app
  (the queue/group each one reads, how many messages wait there, how many consumers it has).

Either failing raises :class:`~replaysafe.errors.ConfigurationError` whose message is one
paragraph naming the fix (the components' own errors say what to do: the DSN, the role's grants,
``replaysafe ledger migrate``, the AMQP credentials …): a worker that cannot claim or cannot
consume must not look healthy while it loops on the error. Nothing has been consumed then.

Then, without failing, it looks for messages nobody reads (:func:`queue_warnings`):

- ``RS122``: a handler of the app that this worker does not run (``--handler``) has messages
  waiting and no consumer;
- ``RS123``: another group on a handler's source, named like this app's groups
  (``"<app name>.<…>"``), has messages and no consumer, and no handler of the app reads it: the
  group of a handler that was renamed or removed (the default group is
  ``"<app name>.<function name>"``), whose messages are no longer read.

What each broker can tell is its adapter's business (``group_state`` / ``stray_groups``): SQS
cannot count consumers (and has no groups: every handler of a queue reads the same one), Kafka
counts a group's lag and members, RabbitMQ lists queues only through its management HTTP API.
``explain`` reports the same findings (:func:`queue_warnings` is the one place they are decided).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from replaysafe.app import App, HandlerSpec
from replaysafe.brokers.base import GroupState
from replaysafe.errors import ConfigurationError, ReplaysafeError

log = logging.getLogger("replaysafe.runtime")
T = TypeVar("T")

#: seconds the start-up probes may take (together: they run at the same time); with the
#: interpreter's start this keeps a worker that cannot run under 10 s from launch to exit
STARTUP_TIMEOUT = 7.0
#: seconds the search for stray groups may take (it never fails the start)
STRAY_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class QueueWarning:
    """Messages that nobody reads: ``id`` is the explain finding (RS122 / RS123)."""

    id: str
    #: the handlers it concerns (the handler itself for RS122; the source's handlers for RS123)
    handlers: tuple[str, ...]
    message: str


@dataclass(slots=True)
class Preflight:
    """What the start-up check found: each handler's group (by handler name, every handler of
    the app) and the warnings about unread messages."""

    groups: dict[str, GroupState] = field(default_factory=dict)
    warnings: list[QueueWarning] = field(default_factory=list)


def one_line(exc: BaseException) -> str:
    """An error as one paragraph: its message with line breaks folded (never a traceback; the
    type's name when it has no message). For start-up errors, /readyz and CLI errors."""
    return " ".join(str(exc).split()) or type(exc).__name__


async def _bounded(what: str, aw: Awaitable[T], within: float) -> T:
    try:
        async with asyncio.timeout(within):
            return await aw
    except TimeoutError:
        raise ConfigurationError(
            f"{what} did not answer within {within:g}s; check that it runs and is reachable "
            "from here (host, port, firewall)"
        ) from None


async def group_states(app: App, specs: Sequence[HandlerSpec]) -> dict[str, GroupState]:
    """Each handler's :class:`GroupState`, by handler name: one broker request per handler, all
    at once (the start-up check has one time limit for the whole app; a Kafka group's state takes
    ~0.7 s on Tansu, so in turn ten handlers would not fit in it)."""
    states = await asyncio.gather(*(app.broker.group_state(s.source, s.group) for s in specs))
    return {s.name: state for s, state in zip(specs, states, strict=True)}


async def stray_groups(app: App, specs: Sequence[HandlerSpec]) -> list[GroupState]:
    """Groups on the handlers' sources named like this app's (``"<app name>."`` prefix) that no
    handler of the app reads. Never raises: a broker that cannot list them gives nothing."""
    ours = {(s.source, s.group) for s in app.handlers.values()}
    found: list[GroupState] = []
    for source in sorted({s.source for s in specs}):
        try:
            async with asyncio.timeout(STRAY_TIMEOUT):
                groups = await app.broker.stray_groups(source, f"{app.name}.")
        except (ReplaysafeError, TimeoutError, OSError) as exc:
            log.debug("cannot list the groups of %s: %s", source, exc)
            continue
        found.extend(g for g in groups if (g.source, g.group) not in ours)
    return found


def queue_warnings(
    app: App,
    states: Mapping[str, GroupState],
    strays: Sequence[GroupState],
    running: Collection[str] | None = None,
) -> list[QueueWarning]:
    """RS122 for a handler whose group has messages and no consumer (only handlers NOT in
    ``running``: a worker's own queues are about to get their consumer; ``None`` for
    ``explain``, which judges every handler), RS123 for each stray group with messages and no
    consumer."""
    out: list[QueueWarning] = []
    for name, state in states.items():
        if not state.unread or (running is not None and name in running):
            continue
        why = (
            "this worker does not run it (--handler): start a worker that does"
            if running is not None
            else "no worker runs this handler now: start one (`replaysafe run`)"
        )
        out.append(QueueWarning("RS122", (name,), f"{name}: {state.name} holds {state.messages} "
                                f"message(s) and has no consumer; {why}"))  # fmt: skip
    for g in strays:
        if not g.unread:
            continue
        handlers = tuple(sorted(n for n, s in app.handlers.items() if s.source == g.source))
        out.append(QueueWarning("RS123", handlers, (
            f"{g.name} holds {g.messages} message(s) published to {g.source!r} and has no "
            f"consumer, and no handler of {app.name} reads group {g.group!r}: the group of a "
            "handler that was renamed or removed (a handler's default group is "
            f"'{app.name}.<function name>')? Its messages are not read: give the handler "
            f"group={g.group!r} to read them again, or move them and delete that queue"
        )))  # fmt: skip
    return out


async def preflight(
    app: App, specs: Sequence[HandlerSpec], owner: str, *, within: float = STARTUP_TIMEOUT
) -> Preflight:
    """Probe the ledger and the broker for a worker that runs ``specs`` (see the module
    docstring); raises ``ConfigurationError`` with one paragraph when either is not usable."""
    ledger_probe = _bounded(f"the ledger ({app.ledger!r})", app.ledger.probe(owner), within)

    async def broker_probe() -> dict[str, GroupState]:
        await app.broker.check()
        return await group_states(app, list(app.handlers.values()))

    broker_what = f"the broker ({app.broker!r})"
    ledger_result, broker_result = await asyncio.gather(
        ledger_probe, _bounded(broker_what, broker_probe(), within), return_exceptions=True
    )
    problems = []
    for what, result in (("the ledger", ledger_result), ("the broker", broker_result)):
        if isinstance(result, ReplaysafeError | OSError):
            problems.append(f"{what} is not usable: {one_line(result)}")
        elif isinstance(result, BaseException):
            raise result
    if problems:
        raise ConfigurationError(
            f"{' Also, '.join(problems)}. Nothing was consumed; fix this and start the worker "
            "again."
        )
    assert isinstance(broker_result, dict)
    strays = await stray_groups(app, specs)
    running = {s.name for s in specs}
    return Preflight(broker_result, queue_warnings(app, broker_result, strays, running))
