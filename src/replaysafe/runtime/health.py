"""What an orchestrator and an operator see of a running worker: readiness, a ledger outage that
lasts too long, and what a stop cut.

:class:`Health` probes the ledger (``Ledger.paused()``, the read every worker makes about once a
second anyway) and the broker (``Broker.check()``) every ``interval`` seconds, each bounded by
``probe_timeout`` (the broker only every fifth time: a Kafka probe builds an admin client).
``ready()`` answers ``/readyz``: ready while both answered their last probe and
the worker is not holding consumption paused for a ledger outage. The worker's own
pause-and-probe (no fetch while the ledger is down) is unchanged; this only makes it visible, and
after ``max_ledger_outage`` seconds without a ledger :meth:`Health.watch` returns, so that the
process can exit non-zero and its supervisor restart it (a worker that cannot claim anything is
not doing its job, and a restart re-runs the start-up check, which says why).

:class:`StopReport` is what :meth:`Worker.run` leaves behind: the handler runs a stop cut (drain
timeout, or a second signal), and :meth:`StopReport.describe` says what becomes of each on the
next start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from replaysafe.guarantees import Guarantee
from replaysafe.runtime.preflight import one_line

if TYPE_CHECKING:
    from replaysafe.app import App, HandlerSpec
    from replaysafe.runtime.worker import Worker

log = logging.getLogger("replaysafe.runtime")

#: seconds between two readiness probes of the ledger
HEALTH_INTERVAL = 1.0
#: the broker is probed every this many ledger probes (a Kafka probe builds an admin client)
BROKER_EVERY = 5
#: how long one probe may take before it counts as failed
PROBE_TIMEOUT = 5.0
#: default of ``replaysafe run --max-ledger-outage`` (seconds; 0 never exits)
MAX_LEDGER_OUTAGE = 300.0
#: how often a continuing outage is logged again (seconds)
OUTAGE_LOG_EVERY = 30.0


class Health:
    """Readiness of one worker and the clock of a ledger outage (see the module docstring).

    ``ready()`` and ``status()`` read plain attributes: safe to call from the HTTP server's
    thread."""

    def __init__(
        self,
        app: App,
        worker: Worker | None = None,
        *,
        interval: float = HEALTH_INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
        max_ledger_outage: float | None = MAX_LEDGER_OUTAGE,
    ) -> None:
        self.app = app
        self.worker = worker
        self.interval = interval
        self.probe_timeout = probe_timeout
        #: None or 0: never give up on the ledger
        self.max_ledger_outage = max_ledger_outage or None
        #: None while starting (before the first probe), then the last probe's error or ""
        self.ledger_error: str | None = None
        self.broker_error: str | None = None
        #: monotonic time of the first failed ledger probe of the current outage
        self.ledger_down_since: float | None = None
        self._logged_at = 0.0

    def outage(self) -> float:
        """Seconds the ledger has been unreachable (0 while it answers)."""
        since = self.ledger_down_since
        return 0.0 if since is None else time.monotonic() - since

    def status(self) -> tuple[bool, str]:
        """``(ready, body)`` for ``/readyz``: one line per component."""
        lines, ready = [], True
        for what, error in (("ledger", self.ledger_error), ("broker", self.broker_error)):
            if error is None:
                ready = False
                lines.append(f"{what}: not probed yet (starting)")
            elif error:
                ready = False
                lines.append(f"{what}: unreachable: {error}")
            else:
                lines.append(f"{what}: reachable")
        worker = self.worker
        since = None if worker is None else worker.ledger_down_since
        if worker is not None and worker.ledger_paused:
            ready = False
            paused = "" if since is None else f" for {time.monotonic() - since:.0f}s"
            lines.append(f"worker: consumption paused{paused} until its own ledger probe "
                         "succeeds")  # fmt: skip
        return ready, "\n".join(lines) + "\n"

    def ready(self) -> bool:
        return self.status()[0]

    async def probe(self, *, broker: bool = True) -> None:
        """Probe the ledger (and, with ``broker``, the broker at the same time) once and update
        the state."""
        checks = [self._one(self.app.ledger.paused())]
        if broker:
            checks.append(self._one(self.app.broker.check()))
        ledger, *rest = await asyncio.gather(*checks)
        if rest:
            self.broker_error = rest[0]
        now = time.monotonic()
        if ledger:
            if self.ledger_down_since is None:
                self.ledger_down_since = now
                self._logged_at = now
                log.warning("ledger unreachable (%s); no claim can be made, so consumption "
                            "pauses%s", ledger, self._deadline())  # fmt: skip
            elif now - self._logged_at >= OUTAGE_LOG_EVERY:
                self._logged_at = now
                log.warning("ledger still unreachable after %.0fs (%s)%s", self.outage(), ledger,
                            self._deadline())  # fmt: skip
        elif self.ledger_down_since is not None:
            log.warning("ledger reachable again after %.0fs", self.outage())
            self.ledger_down_since = None
        self.ledger_error = ledger

    def _deadline(self) -> str:
        if self.max_ledger_outage is None:
            return ""
        left = self.max_ledger_outage - self.outage()
        return f"; the worker exits in {max(left, 0.0):.0f}s if it stays unreachable"

    async def _one(self, probe: object) -> str:
        """'' when the probe succeeded, else its error on one line."""
        try:
            async with asyncio.timeout(self.probe_timeout):
                await probe  # type: ignore[misc]
        except TimeoutError:
            return f"no answer within {self.probe_timeout:g}s"
        except Exception as exc:
            return one_line(exc)
        return ""

    async def watch(self) -> float:
        """Probe every ``interval`` seconds; return the outage's length once the ledger has been
        unreachable for longer than ``max_ledger_outage`` (never, when that is None). The
        broker is probed every ``BROKER_EVERY`` rounds."""
        tick = 0
        while True:
            await self.probe(broker=tick % BROKER_EVERY == 0)
            tick += 1
            limit = self.max_ledger_outage
            if limit is not None and self.outage() > limit:
                return self.outage()
            await asyncio.sleep(self.interval)


@dataclass(frozen=True, slots=True)
class CutRun:
    """A handler run that a stop cut (cancelled before it finished)."""

    handler: str
    #: the run held a ledger claim (effectively-once)
    claimed: bool


@dataclass(slots=True)
class StopReport:
    """How :meth:`Worker.run` ended: drained, or with runs cut (drain timeout or a forced stop)."""

    #: the stop did not wait for the drain (a second signal)
    forced: bool = False
    #: the drain timeout passed with work still running
    timed_out: bool = False
    cut: list[CutRun] = field(default_factory=list)
    #: fetched batches still unsettled when the stop cut them (their runs are in ``cut``)
    batches: int = 0

    @property
    def drained(self) -> bool:
        return not self.cut and not self.batches

    def describe(self, app: App) -> str:
        """One line: what was cut and what the ledger and the broker do with it next time."""
        if self.drained:
            return "stopped after draining: nothing was cut"
        how = "stopped at once (second signal)" if self.forced else "drain timeout reached"
        if not self.cut:
            return (f"{how}: {self.batches} fetched batch(es) cut before any handler ran; "
                    "they were not completed at the broker, which delivers them again")  # fmt: skip
        by_handler: dict[str, list[CutRun]] = {}
        for run in self.cut:
            by_handler.setdefault(run.handler, []).append(run)
        parts = [
            f"{len(runs)} {name} run(s): {_next_time(app.handlers[name], runs)}"
            for name, runs in sorted(by_handler.items())
        ]
        return f"{how}; {len(self.cut)} handler run(s) cut: " + "; ".join(parts)


def _next_time(spec: HandlerSpec, runs: list[CutRun]) -> str:
    """What becomes of a cut run of ``spec`` (not completed at the broker: it comes back)."""
    if spec.guarantee is Guarantee.AT_MOST_ONCE:
        return "already completed at the broker, so their effect may be lost (at-most-once)"
    if spec.guarantee is Guarantee.AT_LEAST_ONCE:
        return "not completed at the broker: redelivered and run again (at-least-once)"
    if not any(r.claimed for r in runs):
        return "not claimed yet: redelivered and run normally"
    eff = spec.effect
    lease = f"their claims expire within {spec.lease:g}s, then the redelivered copy"
    if eff.kind == "transactional":
        return f"{lease} runs again (the cut transaction rolled back)"
    if eff.reruns_when_unknown:
        return f"{lease} runs again ({eff.describe()}: a re-run is harmless)"
    return (f"{lease} is quarantined as outcome_unknown ({eff.describe()} cannot tell whether "
            "the cut run's effect happened); see `replaysafe quarantine list`")  # fmt: skip
