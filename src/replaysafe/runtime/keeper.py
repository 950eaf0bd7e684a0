"""The keeper: one task per driver that extends the leases (and broker visibility) of every
running handler before they lapse, and cuts the ones past their deadline.

One task instead of one watcher per message: it sleeps until the earliest beat or deadline (at
most half the shortest heartbeat), and a new run whose first beat is earlier (a visibility
timeout shorter than the heartbeat) wakes it. A failed extension or a passed deadline cancels the
run's task; :meth:`Keeper.execute` turns that cancel into :class:`~replaysafe.runtime.policy.Cut`
(or ``LeaseLost``), which the failure policy reads as "the effect may have happened".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from replaysafe import observe as o
from replaysafe.errors import LeaseLost
from replaysafe.runtime.policy import Cut

if TYPE_CHECKING:
    from replaysafe.app import Context, HandlerFn, HandlerSpec
    from replaysafe.brokers.base import Delivery
    from replaysafe.clock import Clock
    from replaysafe.ledger.base import Claim, Ledger


@dataclass(slots=True)
class Execution:
    """A running handler, as the keeper sees it."""

    spec: HandlerSpec
    delivery: Delivery
    claim: Claim | None
    deadline: float
    next_beat: float
    extend_visibility: bool
    cut: BaseException | None = None

    @classmethod
    def start(
        cls, spec: HandlerSpec, ctx: Context, claim: Claim | None, extend_visibility: bool,
        now: float,
    ) -> Execution:  # fmt: skip
        """A run starting ``now``: its deadline, and its first beat after one heartbeat, or
        halfway through a visibility timeout shorter than that."""
        first_beat = now + spec.heartbeat
        visible_until = ctx.delivery.settle_deadline
        if extend_visibility and visible_until is not None:
            first_beat = min(first_beat, now + max(visible_until - now, 0.0) / 2)
        return cls(spec, ctx.delivery, claim, now + spec.timeout, first_beat, extend_visibility)

    def extension_failed(self, exc: Exception) -> None:
        """No lease, no run: the run is cut (``LeaseLost`` as it is, anything else as a Cut)."""
        self.cut = exc if isinstance(exc, LeaseLost) else Cut(
            f"lease/visibility extension failed: {exc!r}")  # fmt: skip


class Keeper:
    """Leases and deadlines of the runs in progress (see the module docstring)."""

    def __init__(self, ledger: Ledger, clock: Clock, stats: o.Stats, tick: float) -> None:
        self._ledger = ledger
        self._clock = clock
        self._stats = stats
        #: longest sleep between two looks at the running set
        self._tick = tick
        self.running: dict[asyncio.Task[Any], Execution] = {}
        self._kick = asyncio.Event()
        self._wake = 0.0

    async def run(self) -> None:
        """Watch the running set until cancelled."""
        clock = self._clock
        while True:
            now = clock.now()
            wake = now + self._tick
            for ex in self.running.values():
                if ex.cut is None:
                    wake = min(wake, ex.next_beat, ex.deadline)
            self._wake = wake
            self._kick.clear()
            sleeper = asyncio.ensure_future(clock.sleep(max(wake - now, 0.01)))
            kicked = asyncio.ensure_future(self._kick.wait())
            try:
                await asyncio.wait({sleeper, kicked}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                kicked.cancel()
            now = clock.now()
            for task, ex in list(self.running.items()):
                if task.done() or ex.cut is not None:
                    continue
                if now >= ex.deadline:
                    ex.cut = Cut(f"handler exceeded its {ex.spec.timeout:.1f}s deadline")
                    task.cancel()
                elif now >= ex.next_beat:
                    await self._beat(ex, task)

    async def _beat(self, ex: Execution, task: asyncio.Task[Any]) -> None:
        spec = ex.spec
        try:
            if ex.claim is not None:
                ex.claim = await self._ledger.extend(ex.claim, spec.lease)
                self._stats.inc(o.LEASE_EXTENSIONS, handler=spec.name)
            if ex.extend_visibility:
                await ex.delivery.extend(spec.lease)
                self._stats.inc(o.VISIBILITY_EXTENSIONS, handler=spec.name)
            ex.next_beat = self._clock.now() + spec.heartbeat
        except Exception as exc:
            # cut the handler now, unless it finished while the extension was in flight: the
            # task has moved on (to its completion, its ack, or, in a Guard, the caller's own
            # code) and a cancel now would hit whatever it does next
            if self.running.get(task) is not ex:
                return
            ex.extension_failed(exc)
            task.cancel()

    async def execute(
        self,
        spec: HandlerSpec,
        fn: HandlerFn,
        ctx: Context,
        claim: Claim | None,
        *,
        extend_visibility: bool,
    ) -> Any:
        """Run ``fn(ctx)`` (the handler inside its middleware) under its deadline while the
        keeper extends its lease and, with ``extend_visibility``, the broker's visibility. A
        failed extension or a passed deadline cuts the run: it is cancelled and ``LeaseLost`` /
        :class:`Cut` is raised here. Any other cancel (shutdown, crash) goes on as it is."""
        # the keeper cancels the task running this delivery; no extra task per message
        task = asyncio.current_task()
        assert task is not None
        ex = Execution.start(spec, ctx, claim, extend_visibility, self._clock.now())
        self.running[task] = ex
        if min(ex.next_beat, ex.deadline) < self._wake:
            self._kick.set()
        try:
            return await fn(ctx)
        except asyncio.CancelledError:
            if ex.cut is not None and task.uncancel() == 0:
                raise ex.cut from None
            raise
        finally:
            del self.running[task]
