"""What opens and closes a driver's fetching: the handler control flags in the ledger (``replaysafe
handler pause``) and a ledger outage.

:class:`Control` reads the flags every ``interval`` seconds and closes a paused handler's fetch
gate, interrupting a fetch that is waiting; work in flight settles normally, and resuming opens
the gate again. :class:`LedgerWatch` pauses fetching on every handler while the ledger does not
answer (no effect may start without a confirmed claim, and fetching only to nack would churn the
broker) and probes it until it does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from replaysafe import observe as o
from replaysafe.errors import LedgerUnavailable
from replaysafe.ledger.base import OpKey, PauseState
from replaysafe.runtime.policy import LEDGER_RETRY_DELAY

if TYPE_CHECKING:
    from replaysafe.app import HandlerSpec
    from replaysafe.clock import Clock
    from replaysafe.ledger.base import HandlerControls, Ledger

log = logging.getLogger("replaysafe.runtime")

#: how often (seconds, app clock) a worker reads the handler control flags (pause/resume) from
#: the ledger; ``Worker(control_interval=…)`` changes it
CONTROL_INTERVAL = 1.0
#: longest wait between two probes of a ledger that is down (the probe backs off up to it)
LEDGER_PROBE_MAX_DELAY = 5.0


@dataclass(slots=True, eq=False)
class Gate:
    """One handler's fetch gate: open while the handler runs, closed while its ledger control
    flag says paused. A fetch already waiting when the gate closes is interrupted (cancelled:
    every adapter's ``next_batch`` takes nothing before its wait returns)."""

    open: asyncio.Event = field(default_factory=asyncio.Event)
    #: the consume task is inside ``next_batch``
    fetching: bool = False
    #: the control loop cancelled that fetch (the consume loop swallows exactly that cancel)
    interrupted: bool = False
    task: asyncio.Task[None] | None = None
    pause: PauseState | None = None

    def fetch_interrupted(self) -> bool:
        """Consume the control loop's interrupt of a fetch: True when the CancelledError being
        handled was that interrupt alone (any other cancel, a stop or a crash, goes on)."""
        if not self.interrupted:
            return False
        self.interrupted = False
        task = asyncio.current_task()
        return task is not None and task.uncancel() == 0


class Control:
    """The handler control flags of one driver's handlers (see the module docstring)."""

    def __init__(
        self,
        ledger: HandlerControls,
        clock: Clock,
        stats: o.Stats,
        specs: Sequence[HandlerSpec],
        interval: float = CONTROL_INTERVAL,
    ) -> None:
        self._ledger = ledger
        self._clock = clock
        self._stats = stats
        self._specs = list(specs)
        self.interval = interval
        self.gates: dict[str, Gate] = {}
        for spec in self._specs:
            gate = self.gates[spec.name] = Gate()
            gate.open.set()
            stats.set(o.HANDLER_PAUSED, 0.0, handler=spec.name)
        #: set once the first read finished (or failed): no fetch happens before it
        self.first_read = asyncio.Event()

    @property
    def paused(self) -> dict[str, PauseState]:
        """The handlers held paused (as of the last read)."""
        return {name: g.pause for name, g in self.gates.items() if g.pause is not None}

    async def run(self) -> None:
        """Read the flags every ``interval`` seconds until cancelled. Its own task, so that a slow
        or failing read never delays the keeper's lease extensions. A failed read keeps the last
        known state (consumption itself pauses on ledger trouble through the claim path)."""
        failures = 0
        while True:
            try:
                flags = await self._ledger.paused()
            except Exception as exc:
                failures += 1
                if isinstance(exc, LedgerUnavailable):
                    # every handler's flag is now stale: counted where operators already look
                    for spec in self._specs:
                        self._stats.inc(o.LEDGER_UNAVAILABLE, handler=spec.name)
                if failures == 1 or failures % 60 == 0:
                    log.warning("cannot read the handler control flags (%d times in a row): %s; "
                                "keeping the last known state", failures, exc,
                                exc_info=not isinstance(exc, LedgerUnavailable))  # fmt: skip
            else:
                failures = 0
                self.apply(flags)
            self.first_read.set()
            await self._clock.sleep(self.interval)

    def apply(self, flags: dict[str, PauseState]) -> None:
        """Open or close each handler's gate as ``flags`` say."""
        for spec in self._specs:
            gate = self.gates[spec.name]
            state = flags.get(spec.name)
            if state is None:
                if gate.pause is not None:
                    gate.pause = None
                    gate.open.set()
                    self._stats.set(o.HANDLER_PAUSED, 0.0, handler=spec.name)
                    log.warning("%s: resumed; fetching from %s again", spec.name, spec.source)
                continue
            if gate.pause is None:
                gate.open.clear()
                self._stats.set(o.HANDLER_PAUSED, 1.0, handler=spec.name)
                log.warning(
                    "%s: paused by %s (%s); no new fetches from %s, in-flight work settles",
                    spec.name, state.by or "?", state.reason or "no reason given", spec.source,
                )  # fmt: skip
                task = gate.task
                if gate.fetching and not gate.interrupted and task is not None and not task.done():
                    gate.interrupted = True
                    task.cancel()
            gate.pause = state


class LedgerWatch:
    """Consumption held while the ledger does not answer (see the module docstring)."""

    def __init__(self, ledger: Ledger, clock: Clock) -> None:
        self._ledger = ledger
        self._clock = clock
        self.ok = asyncio.Event()
        self.ok.set()
        #: ``time.monotonic()`` when consumption paused for a ledger outage (None while it runs)
        self.down_since: float | None = None
        self.probe: asyncio.Task[None] | None = None

    @property
    def paused(self) -> bool:
        return not self.ok.is_set()

    def down(self) -> None:
        """Pause fetching on every handler until the ledger answers again."""
        if not self.ok.is_set():
            return
        self.ok.clear()
        self.down_since = time.monotonic()
        self.probe = asyncio.create_task(self._probe())

    async def _probe(self) -> None:
        """Read the ledger every second, backing off to LEDGER_PROBE_MAX_DELAY, until it
        answers; then resume fetching. Short enough a back-off that a ledger back after a long
        outage is used within seconds (``replaysafe run``'s /readyz waits for it)."""
        delay = LEDGER_RETRY_DELAY
        probe = OpKey("replaysafe", "ledger-probe")
        while True:
            await self._clock.sleep(delay)
            try:
                await self._ledger.get(probe)
            except LedgerUnavailable:
                delay = min(delay * 2, LEDGER_PROBE_MAX_DELAY)
                continue
            log.warning("ledger reachable again; resuming consumption")
            self.down_since = None
            self.ok.set()
            return
