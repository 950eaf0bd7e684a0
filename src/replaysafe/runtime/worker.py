"""The Worker: one driver of the pipeline. It fetches, bounds concurrency, batches, and settles
what the pipeline decides; the decisions live in ``runtime.pipeline`` and ``runtime.policy``, the
broker calls in ``runtime.settle``.

Work moves in fetched batches: a batch of deliveries is decoded, claimed in ONE ledger round trip
(``claim_many``), run concurrently, and completed through a coalescing ``complete_many``, so the
ledger costs round trips per batch, not per message. One keeper task per worker
(``runtime.keeper``) extends the leases (and broker visibility) of every running handler and cuts
the ones past their deadline; one control task (``runtime.control``) closes the fetch gate of a
handler paused through its ledger control flag, and a ledger outage holds every fetch.

A redelivered copy whose operation the ledger still holds in flight is a suspect (its previous
attempt may have killed its process): it claims and runs alone in this process (see
``runtime._isolation``). A :class:`~replaysafe.errors.SimulatedCrash` from a failpoint kills the
whole worker: nothing is settled, released or completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from typing import Any

from replaysafe import observe as o
from replaysafe.app import App, HandlerSpec
from replaysafe.brokers.base import Delivery, Subscription
from replaysafe.envelope import Envelope
from replaysafe.errors import ConfigurationError, LedgerUnavailable, SimulatedCrash
from replaysafe.guarantees import Guarantee
from replaysafe.ledger.base import OpKey, PauseState, State, TransactionalLedger
from replaysafe.observe import otel
from replaysafe.runtime._isolation import SuspectLock
from replaysafe.runtime.batch import FETCH_LINGER, Slots, run_all
from replaysafe.runtime.control import CONTROL_INTERVAL, Control, LedgerWatch
from replaysafe.runtime.health import CutRun, StopReport
from replaysafe.runtime.keeper import Keeper
from replaysafe.runtime.pipeline import Pipeline
from replaysafe.runtime.policy import LEDGER_RETRY_DELAY, Nack, Quarantine, Verdict
from replaysafe.runtime.settle import Settler

log = logging.getLogger("replaysafe.runtime")
#: one delivery's next step in a batch, run when the batch runs
_Step = tuple[Delivery, Callable[[], Coroutine[Any, Any, None]]]

__all__ = ["CONTROL_INTERVAL", "Worker"]


class Worker:
    """Consumes the app's handlers' sources until stopped or crashed.

    ``run()`` returns after a graceful :meth:`stop` and raises ``SimulatedCrash`` when a failpoint
    killed the worker (after abandoning its subscriptions, as a dead process would).
    """

    def __init__(
        self,
        app: App,
        *,
        owner: str | None = None,
        handlers: Sequence[str] | None = None,
        control_interval: float = CONTROL_INTERVAL,
    ) -> None:
        names = list(handlers) if handlers is not None else list(app.handlers)
        missing = [n for n in names if n not in app.handlers]
        if missing:
            raise ConfigurationError(f"unknown handler(s) {missing}; known: {sorted(app.handlers)}")
        if not names:
            raise ConfigurationError(
                "the app has no handlers to run; register one with @app.handler"
            )
        if not control_interval > 0:
            raise ConfigurationError("control_interval must be positive seconds")
        self.app = app
        self.specs = [app.handlers[n] for n in names]
        self.owner = owner or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.stats = o.Stats()
        self._tracing = otel.tracing_for(app.tracing, app.tracer_provider)
        self._stopping = asyncio.Event()
        #: set by ``stop(now=True)``: the stop does not wait for the drain
        self._forced = asyncio.Event()
        #: how the last ``run()`` ended (what a stop cut); None before it returned
        self.stop_report: StopReport | None = None
        self._crash: SimulatedCrash | None = None
        self._crashed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Subscription] = []
        self._started = False
        #: source -> the broker can extend its visibility (capabilities are fixed: asked once)
        self._extendable: dict[str, bool] = {}
        #: recovered claims run alone in this process (see runtime._isolation)
        self._suspects = SuspectLock()
        self.watch = LedgerWatch(app.ledger, app.clock)
        self.control = Control(app.ledger, app.clock, self.stats, self.specs, control_interval)
        self.keeper = Keeper(
            app.ledger, app.clock, self.stats, min(s.heartbeat for s in self.specs) / 2
        )
        self.settler = Settler(ledger=app.ledger, clock=app.clock, stats=self.stats,
                               tracing=self._tracing, failpoints=app.failpoints,
                               redact=app.redact)  # fmt: skip
        self.pipeline = Pipeline(
            ledger=app.ledger, clock=app.clock, stats=self.stats, tracing=self._tracing,
            failpoints=app.failpoints, settler=self.settler, keeper=self.keeper,
            owner=self.owner, horizon=app.horizon, max_clock_skew=app.max_clock_skew,
            can_extend=self._can_extend, on_ledger_down=self.watch.down,
        )  # fmt: skip
        for spec in self.specs:
            self.settler.track(spec.name)
        self.stats.set(o.HORIZON_SECONDS, app.horizon)

    # ------------------------------------------------------------------ what operators read

    @property
    def in_flight(self) -> int:
        """Handler runs in progress now (what a stop would wait for)."""
        return len(self.keeper.running)

    @property
    def paused(self) -> dict[str, PauseState]:
        """This worker's handlers that it currently holds paused (as of its last control read)."""
        return self.control.paused

    @property
    def control_interval(self) -> float:
        """Seconds between two reads of the handler control flags (pause/resume) in the ledger."""
        return self.control.interval

    @property
    def ledger_paused(self) -> bool:
        """Consumption is paused because the ledger did not answer."""
        return self.watch.paused

    @property
    def ledger_down_since(self) -> float | None:
        """``time.monotonic()`` when consumption paused for a ledger outage (None while it runs)."""
        return self.watch.down_since

    # ------------------------------------------------------------------ lifecycle

    def _validate(self) -> None:
        """Check the handlers against the ledger and the broker's capabilities at start-up."""
        for spec in self.specs:
            caps = self.app.broker.capabilities(spec.source)
            if spec.lease <= spec.heartbeat:
                raise ConfigurationError(f"{spec.name}: heartbeat must be shorter than the lease")
            transactional = spec.effect.kind == "transactional"
            if transactional and not isinstance(self.app.ledger, TransactionalLedger):
                raise ConfigurationError(
                    f"{spec.name}: a transactional effect needs a TransactionalLedger "
                    "(SQLiteLedger, PostgresLedger)"
                )
            if spec.guarantee is not Guarantee.AT_MOST_ONCE and not caps.delayed_nack:
                log.warning(
                    "%s: %s cannot delay a nack; retries and in-flight overlaps are redelivered "
                    "at once",
                    spec.name,
                    spec.source,
                )

    def _can_extend(self, spec: HandlerSpec, delivery: Delivery) -> bool:
        known = self._extendable.get(spec.source)
        if known is None:
            caps = self.app.broker.capabilities(spec.source)
            known = self._extendable[spec.source] = caps.extend_visibility
        return known

    async def run(self, *, drain_timeout: float = 30.0) -> None:
        """Consume until :meth:`stop` (then drain in-flight work for up to ``drain_timeout``
        seconds and settle what finished) or until a simulated crash (then raise it).

        Work still running when the drain timeout passes (or at once after ``stop(now=True)``)
        is cancelled, unsettled: the broker delivers it again and its claim expires with its
        lease. :attr:`stop_report` then says what was cut."""
        if self._started:
            raise ConfigurationError("a Worker runs once; create a new one: Worker(app)")
        self._started = True
        self._validate()
        self.pipeline.prepare(self.specs)
        try:
            await self._run(drain_timeout)
        finally:
            self.pipeline.close()

    async def _run(self, drain_timeout: float) -> None:
        for spec in self.specs:
            self._subs.append(
                await self.app.broker.subscribe(spec.source, spec.group, prefetch=spec.concurrency)
            )
        loops = [
            asyncio.create_task(self._consume(spec, sub), name=f"consume:{spec.name}")
            for spec, sub in zip(self.specs, self._subs, strict=True)
        ]
        keeper = asyncio.create_task(self.keeper.run(), name="keeper")
        control = asyncio.create_task(self.control.run(), name="control")
        stop = asyncio.create_task(self._stopping.wait())
        crash = asyncio.create_task(self._crashed.wait())
        try:
            await asyncio.wait([stop, crash, *loops], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            crash.cancel()
        if self._crash is not None:
            await self._die([*loops, keeper, control])
            raise self._crash
        # graceful: stop fetching, drain, settle what finished
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        report = StopReport()
        pending = await self._drain(drain_timeout)
        if pending:
            # cut: what was running is reported before the cancel unwinds it
            report.forced = self._forced.is_set()
            report.timed_out = not report.forced
            report.batches = len(pending)
            report.cut = [CutRun(ex.spec.name, ex.claim is not None)
                          for ex in self.keeper.running.values()]  # fmt: skip
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        probe = self.watch.probe
        background = [keeper, control, *([probe] if probe else [])]
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for sub in self._subs:
            # a forced stop does not wait for the broker: unsettled work is left to it, as
            # after a crash (requeue, visibility timeout, rewind to the committed offset)
            await sub.close(abandon=self._forced.is_set())
        self.stop_report = report
        if self._crash is not None:
            raise self._crash

    async def _drain(self, seconds: float) -> set[asyncio.Task[None]]:
        """Wait up to ``seconds`` for the fetched batches to settle, less if
        ``stop(now=True)`` comes meanwhile; returns the batches still running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        pending = set(self._tasks)
        forced = self._forced
        while pending and not forced.is_set():
            left = deadline - loop.time()
            if left <= 0:
                break
            waiter = asyncio.ensure_future(forced.wait())
            try:
                done, _ = await asyncio.wait(
                    {*pending, waiter}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                waiter.cancel()
            pending -= done
        return pending

    def stop(self, *, now: bool = False) -> None:
        """Ask the worker to stop fetching and drain (safe to call from a signal handler).
        ``now=True`` (a second Ctrl-C) does not wait for the drain: running handlers are
        cancelled and left unsettled, as :meth:`run` describes."""
        if now:
            self._forced.set()
        self._stopping.set()

    async def _die(self, loops: list[asyncio.Task[None]]) -> None:
        # As after SIGKILL: no settle, no release. Leases run out in the ledger; the broker
        # recovers the unsettled deliveries its own way (requeue, visibility, offset rewind).
        probe = self.watch.probe
        doomed = [*loops, *self._tasks, *([probe] if probe else [])]
        for t in doomed:
            t.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)
        for sub in self._subs:
            await sub.close(abandon=True)

    def _crashed_by(self, crash: SimulatedCrash) -> None:
        """A failpoint killed the worker: the first crash is the one ``run()`` raises."""
        if self._crash is None:
            self._crash = crash
        self._crashed.set()

    # ------------------------------------------------------------------ fetch

    async def _consume(self, spec: HandlerSpec, sub: Subscription) -> None:
        slots = Slots(spec.concurrency)
        half = max(1, spec.concurrency // 2)
        gate = self.control.gates[spec.name]
        gate.task = asyncio.current_task()
        ledger_ok = self.watch.ok
        await self.control.first_read.wait()
        while True:
            await slots.wait_free()
            free = await slots.gather_room(half, FETCH_LINGER)
            await ledger_ok.wait()
            await gate.open.wait()  # closed while the handler is paused
            if self._crash is not None:
                return
            gate.fetching = True
            try:
                batch = await sub.next_batch(free)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if gate.fetch_interrupted():
                    continue  # paused while waiting: nothing was taken
                raise
            finally:
                gate.fetching = False
            if gate.interrupted:  # the adapter swallowed the interrupt: the batch is in flight
                gate.fetch_interrupted()
            slots.take(len(batch))
            # fetched while the ledger went down: hold it (unsettled) rather than churn nacks
            await ledger_ok.wait()
            task = asyncio.create_task(self._guarded(spec, batch, slots))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ one batch

    async def _guarded(self, spec: HandlerSpec, batch: list[Delivery], slots: Slots) -> None:
        try:
            await self._process_batch(spec, batch, slots)
        except SimulatedCrash as crash:
            self._crashed_by(crash)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in the pipeline must not kill the worker or lose the message
            log.exception("%s: pipeline error on a batch of %d; leaving it to redelivery",
                          spec.name, len(batch))  # fmt: skip
            for d in batch:
                if not d.settled:
                    await self._give_back(spec, d)

    async def _give_back(self, spec: HandlerSpec, delivery: Delivery) -> None:
        """After a bug of our own: the copy goes back to the broker, counted as failed."""
        with contextlib.suppress(Exception):
            verdict = Nack(LEDGER_RETRY_DELAY, o.FAILED)
            await self.settler.settle(spec, delivery, None, verdict)

    async def _settle(
        self, spec: HandlerSpec, delivery: Delivery, env: Envelope | None, verdict: Verdict
    ) -> None:
        await self.settler.settle(spec, delivery, env, verdict)

    async def _decided(
        self,
        spec: HandlerSpec,
        delivery: Delivery,
        env: Envelope | None,
        decide: Callable[[], Coroutine[Any, Any, Verdict]],
    ) -> None:
        """One copy's pipeline, then its settle."""
        await self.settler.settle(spec, delivery, env, await decide())

    async def _item(
        self,
        spec: HandlerSpec,
        delivery: Delivery,
        step: Callable[[], Coroutine[Any, Any, None]],
        slots: Slots,
    ) -> None:
        """Run one delivery's step; a pipeline bug is logged and the delivery nacked."""
        try:
            if self._tracing.enabled:
                with self._tracing.span(otel.DELIVERY, handler=spec.name,
                                        guarantee=spec.guarantee.value,
                                        delivery_id=delivery.delivery_id,
                                        attempt=delivery.attempt):  # fmt: skip
                    await step()
            else:
                await step()
        except SimulatedCrash as crash:
            # known to run() at once, whichever delivery of the batch it waits for
            self._crashed_by(crash)
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: pipeline error on %s; leaving it to redelivery", spec.name,
                          delivery.delivery_id)  # fmt: skip
            await self._give_back(spec, delivery)
        finally:
            slots.give()

    async def _process_batch(self, spec: HandlerSpec, batch: list[Delivery], slots: Slots) -> None:
        # steps are (delivery, zero-argument coroutine function): coroutines are only created
        # when they run, so a crash in the middle of a batch leaves none un-awaited
        pipe = self.pipeline
        steps: list[_Step] = []
        decoded: list[tuple[Delivery, Envelope]] = []
        self.stats.inc(o.RECEIVED, len(batch), handler=spec.name)
        now = self.app.clock.now()
        ages: list[float] = []
        for delivery in batch:
            env = pipe.decode(spec, delivery)
            if isinstance(env, Quarantine):
                steps.append((delivery, partial(self._settle, spec, delivery, None, env)))
                continue
            pipe.delivered(spec, delivery, env, now, ages)
            if spec.guarantee is Guarantee.AT_MOST_ONCE:
                decide = partial(pipe.at_most_once, spec, delivery, env)
            elif spec.guarantee is Guarantee.AT_LEAST_ONCE:
                decide = partial(pipe.at_least_once, spec, delivery, env)
            else:
                decoded.append((delivery, env))
                continue
            steps.append((delivery, partial(self._decided, spec, delivery, env, decide)))
        if ages:
            self.stats.observe_many(o.REPLAY_AGE, ages, handler=spec.name)
        suspects: list[tuple[Delivery, Envelope]] = []
        if decoded and any(d.redelivered for d, _ in decoded):
            decoded, suspects = await self._split_suspects(spec, decoded)
        if decoded:
            # shared with every other batch of this process from the claim to the last settle:
            # a suspect (below) claims and runs only while no claim of this process is open
            await self._suspects.shared_acquire()
            try:
                steps.extend(await self._claimed(spec, decoded))
                await self._run_all(spec, steps, slots)
            finally:
                self._suspects.shared_release()
        elif steps:
            await self._run_all(spec, steps, slots)
        for delivery, env in suspects:
            await self._isolated(spec, delivery, env, slots)

    async def _claimed(
        self, spec: HandlerSpec, decoded: list[tuple[Delivery, Envelope]]
    ) -> list[_Step]:
        """One claim for the batch; each copy's next step runs from its claim's outcome."""
        outcomes = await self.pipeline.claim(spec, decoded)
        return [
            (d, partial(self._decided, spec, d, env,
                        partial(self.pipeline.after_claim, spec, d, env, outcome)))
            for (d, env), outcome in zip(decoded, outcomes, strict=True)
        ]  # fmt: skip

    async def _run_all(self, spec: HandlerSpec, steps: list[_Step], slots: Slots) -> None:
        if len(steps) == 1:
            await self._item(spec, steps[0][0], steps[0][1], slots)
        else:
            await run_all([partial(self._item, spec, d, run, slots) for d, run in steps])

    async def _split_suspects(
        self, spec: HandlerSpec, decoded: list[tuple[Delivery, Envelope]]
    ) -> tuple[list[tuple[Delivery, Envelope]], list[tuple[Delivery, Envelope]]]:
        """(ordinary, suspects): a suspect is a redelivered copy whose operation the ledger
        holds IN_FLIGHT, i.e. a previous attempt neither completed nor released it (its worker
        died or stalled; see runtime._isolation). A copy that came back after a clean release (a
        retry) is ordinary. A ledger that cannot answer leaves the copy ordinary: the claim
        that follows meets the same outage and handles it. One read per redelivered copy, one
        after the other: gathering them measured slower on SQLite (64 reads: 2.8 ms in turn,
        7.1 ms gathered) and no faster on PostgreSQL (17.0 / 16.3 ms); a batched ``get_many``
        in the ledger contract is what would make it one round trip."""
        ordinary, suspects = [], []
        for delivery, env in decoded:
            if delivery.redelivered:
                try:
                    rec = await self.app.ledger.get(OpKey(spec.scope, env.operation_id))
                except LedgerUnavailable:
                    rec = None
                if rec is not None and rec.state is State.IN_FLIGHT:
                    suspects.append((delivery, env))
                    continue
            ordinary.append((delivery, env))
        return ordinary, suspects

    async def _isolated(
        self, spec: HandlerSpec, delivery: Delivery, env: Envelope, slots: Slots
    ) -> None:
        """Claim and run one suspect while no other claim of this process is open, so that if
        it is the poison that kills the process, no other operation's attempt is charged. A
        suspect waiting here holds no claim."""
        await self._suspects.exclusive_acquire()
        try:
            for d, run in await self._claimed(spec, [(delivery, env)]):
                await self._item(spec, d, run, slots)
        finally:
            self._suspects.exclusive_release()
