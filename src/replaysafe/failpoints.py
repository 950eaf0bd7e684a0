"""Named failpoints: crash points at the boundaries, no-ops unless enabled.

The runtime calls ``await failpoints.hit(NAME, ctx)`` at each boundary. Nothing is enabled by
default and the disabled path is one dict lookup. Tests, the demo and the chaos harness enable them
programmatically, or through the ``REPLAYSAFE_FAILPOINTS`` environment variable for worker
processes (``"after_effect_before_ledger=sigkill;before_effect=sleep:2"``: ``name=action[:seconds]``
joined by ``;``, with the actions ``kill``, ``exit``, ``sigkill``, ``sleep:S`` and ``pause``).

It lives beside the runtime rather than under ``chaos/`` because the runtime calls it on every
message; the chaos harness only decides what to enable.

Actions:

- ``kill``: raise :class:`~replaysafe.errors.SimulatedCrash` — the current worker dies in-process
  with nothing settled, released or completed.
- ``exit``: ``os._exit(137)`` — the whole OS process dies at once, without cleanup, with exit
  status 137 (what a shell reports for SIGKILL); no signal is involved.
- ``sigkill``: ``os.kill(os.getpid(), SIGKILL)`` — the process really receives SIGKILL, as from the
  OOM killer or ``kill -9``: its parent sees it killed by signal 9 (``returncode == -9``). POSIX
  only.
- ``raise``: raise the given exception.
- ``sleep``: sleep on the clock (tail latency, lease overrun).
- ``pause``: wait until :meth:`Failpoints.resume` (a stalled process).
- ``call``: await ``fn(ctx)`` (code only): a fault that needs the event loop, e.g. stopping the
  process only once its ledger holds no lock.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from replaysafe.errors import ConfigurationError, SimulatedCrash

AFTER_CLAIM = "after_claim"
BEFORE_EFFECT = "before_effect"
AFTER_EFFECT_BEFORE_LEDGER = "after_effect_before_ledger"
AFTER_LEDGER_BEFORE_ACK = "after_ledger_before_ack"
AFTER_ACK = "after_ack"
AFTER_QUARANTINE_BEFORE_ACK = "after_quarantine_before_ack"
RELAY_AFTER_PUBLISH_BEFORE_MARK = "relay_after_publish_before_mark"
PUBLISH_BEFORE_ACCEPT = "publish_before_accept"
PUBLISH_AFTER_ACCEPT = "publish_after_accept"

NAMES = frozenset(
    {
        AFTER_CLAIM,
        BEFORE_EFFECT,
        AFTER_EFFECT_BEFORE_LEDGER,
        AFTER_LEDGER_BEFORE_ACK,
        AFTER_ACK,
        AFTER_QUARANTINE_BEFORE_ACK,
        RELAY_AFTER_PUBLISH_BEFORE_MARK,
        PUBLISH_BEFORE_ACCEPT,
        PUBLISH_AFTER_ACCEPT,
    }
)

ActionKind = Literal["kill", "exit", "sigkill", "raise", "sleep", "pause", "call"]
#: the actions ``REPLAYSAFE_FAILPOINTS`` accepts (``raise`` needs an exception object: code only)
ENV_ACTIONS = ("kill", "exit", "sigkill", "sleep", "pause")
#: decides per hit whether the failpoint fires; receives the hit's context (operation_id, attempt…)
Predicate = Callable[[Mapping[str, Any]], bool]
#: the ``call`` action: awaited with the hit's context
Action = Callable[[Mapping[str, Any]], Awaitable[None]]


@dataclass(slots=True)
class _Armed:
    kind: ActionKind
    when: Predicate | None
    times: int | None
    error: BaseException | None = None
    seconds: float = 0.0
    fn: Action | None = None
    resume: asyncio.Event = field(default_factory=asyncio.Event)


class Failpoints:
    """A registry of armed failpoints and how often each fired."""

    def __init__(self) -> None:
        self._armed: dict[str, _Armed] = {}
        #: whether any failpoint is armed (the hot path skips its hits, and their context, when
        #: none is): a plain attribute, read several times per message
        self.armed = False
        #: how many times each failpoint actually fired (a fault that never fired proves nothing)
        self.fired: Counter[str] = Counter()

    def enable(
        self,
        name: str,
        action: ActionKind,
        *,
        when: Predicate | None = None,
        times: int | None = None,
        error: BaseException | None = None,
        seconds: float = 0.0,
        fn: Action | None = None,
    ) -> None:
        """Arm ``name``. ``when`` filters hits; ``times`` bounds how often it fires."""
        if name not in NAMES:
            raise ConfigurationError(
                f"unknown failpoint {name!r}; known: {', '.join(sorted(NAMES))}"
            )
        if action == "raise" and error is None:
            raise ConfigurationError("failpoint action 'raise' needs error=<exception>")
        if action == "call" and fn is None:
            raise ConfigurationError("failpoint action 'call' needs fn=<async callable>")
        self._armed[name] = _Armed(action, when, times, error, seconds, fn)
        self.armed = True

    def disable(self, name: str | None = None) -> None:
        """Disarm one failpoint, or all of them."""
        if name is None:
            for armed in self._armed.values():
                armed.resume.set()
            self._armed.clear()
        elif name in self._armed:
            self._armed.pop(name).resume.set()
        self.armed = bool(self._armed)

    def resume(self, name: str) -> None:
        """Let the hits paused at ``name`` continue."""
        if (armed := self._armed.get(name)) is not None:
            armed.resume.set()

    def enable_from_env(self, value: str | None = None) -> None:
        """Arm failpoints from ``REPLAYSAFE_FAILPOINTS`` (``name=action[:seconds]`` joined by ;,
        actions :data:`ENV_ACTIONS`)."""
        spec = os.environ.get("REPLAYSAFE_FAILPOINTS", "") if value is None else value
        for item in filter(None, (p.strip() for p in spec.split(";"))):
            name, _, action = item.partition("=")
            kind, _, arg = action.partition(":")
            if kind not in ENV_ACTIONS:
                raise ConfigurationError(
                    f"REPLAYSAFE_FAILPOINTS: {item!r} needs an action "
                    "kill|exit|sigkill|sleep:S|pause"
                )
            self.enable(name.strip(), kind, seconds=float(arg or 0))  # type: ignore[arg-type]

    async def hit(self, name: str, ctx: Mapping[str, Any] | None = None) -> None:
        """Fire ``name`` if it is armed and its predicate accepts ``ctx``; otherwise return."""
        armed = self._armed.get(name)
        if armed is None:
            return
        if armed.when is not None and not armed.when(ctx or {}):
            return
        if armed.times is not None:
            if armed.times <= 0:
                return
            armed.times -= 1
        self.fired[name] += 1
        if armed.kind == "kill":
            raise SimulatedCrash(name)
        if armed.kind == "exit":
            os._exit(137)
        if armed.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
            os._exit(137)  # pragma: no cover - SIGKILL cannot be caught; never reached
        if armed.kind == "raise":
            assert armed.error is not None
            raise armed.error
        if armed.kind == "sleep":
            sleep = (ctx or {}).get("sleep")
            await (sleep(armed.seconds) if callable(sleep) else asyncio.sleep(armed.seconds))
        elif armed.kind == "pause":
            await armed.resume.wait()
        elif armed.kind == "call":
            assert armed.fn is not None
            await armed.fn(ctx or {})


#: the process-wide registry the runtime uses unless an app is given its own
FAILPOINTS = Failpoints()
