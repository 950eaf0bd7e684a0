"""The consumer runtime: subscriptions, bounded concurrency, the fixed pipeline per guarantee,
graceful drain and crash semantics.

The pipeline is owned here; user code only runs inside it (DESIGN §2):

- AT_MOST_ONCE: decode → complete at broker → handler. Errors are counted, never retried.
- AT_LEAST_ONCE: decode → handler → complete. Error → retry budget → nack(delay) or quarantine.
- EFFECTIVELY_ONCE: decode + fingerprint → horizon → claim →
  AlreadyDone: complete (duplicate hit) · InFlight: nack with delay >= remaining lease ·
  Conflict: quarantine key_reuse_conflict, complete · Quarantined: complete ·
  Acquired: handler (lease and visibility extended while it runs) → ledger complete (or
  ``complete_in`` the handler's transaction) → complete at broker.

Work moves in fetched batches: a batch of deliveries is decoded, claimed in ONE ledger round trip
(``claim_many``), run concurrently, and completed through a coalescing ``complete_many``, so the
ledger costs round trips per batch, not per message. One keeper task per worker extends the leases
(and broker visibility) of every running handler and cuts the ones past their deadline.

A handler paused through its ledger control flag (``replaysafe handler pause``) gets no new
fetch: a control task reads the flags every ``control_interval`` seconds and closes the handler's
fetch gate (interrupting a fetch that is waiting); work in flight settles normally. Resuming
opens the gate again.

Bad input is quarantined on the first attempt and then completed; quarantine is durable before
the original is completed at the broker. A :class:`~replaysafe.errors.SimulatedCrash` from a
failpoint kills the whole worker: nothing is settled, released or completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from types import CoroutineType
from typing import Any, Generic, TypeVar

from replaysafe import failpoints as fp
from replaysafe import observe as o
from replaysafe.app import App, Context, HandlerSpec
from replaysafe.brokers.base import Delivery, Subscription
from replaysafe.envelope import HEADER_OPERATION_ID, Envelope, decode_wire
from replaysafe.errors import (
    BadInput,
    BrokerError,
    ConfigurationError,
    LeaseLost,
    LedgerDataError,
    LedgerUnavailable,
    OutcomeUnknown,
    SimulatedCrash,
)
from replaysafe.guarantees import Guarantee
from replaysafe.ledger.base import (
    Acquired,
    AlreadyDone,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    Conflict,
    InFlight,
    OpKey,
    PauseState,
    Quarantined,
    QuarantineRequest,
    State,
    TransactionalLedger,
)
from replaysafe.observe import otel
from replaysafe.quarantine import Disclosure, EffectRisk, QuarantineReason, disclose, shown_text
from replaysafe.runtime._isolation import SuspectLock
from replaysafe.runtime.health import CutRun, StopReport

log = logging.getLogger("replaysafe.runtime")
#: one delivery's next step in a batch, run when the batch runs
_Step = tuple[Delivery, Callable[[], Awaitable[None]]]
T = TypeVar("T")
R = TypeVar("R")

#: results larger than this are not stored in the ledger (the effect still counts as done)
MAX_RESULT_BYTES = 16 * 1024
#: how long a busy consumer waits for half its slots before fetching (see _Slots.gather_room)
FETCH_LINGER = 0.002
#: delay before retrying when the ledger is unavailable (no effect without a confirmed claim)
LEDGER_RETRY_DELAY = 1.0
#: longest wait between two probes of a ledger that is down (the probe backs off up to it)
LEDGER_PROBE_MAX_DELAY = 5.0
#: real seconds the app's redaction hook may take on one quarantined message (see _disclose)
REDACT_TIMEOUT = 5.0
#: how often (seconds, app clock) a worker reads the handler control flags (pause/resume) from
#: the ledger; ``Worker(control_interval=…)`` changes it
CONTROL_INTERVAL = 1.0


class _Cut(Exception):
    """The handler's deadline was cut: timeout, or the lease could not be extended."""

    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(why)


def _transport_identity(delivery: Delivery, *, withheld: bool = False) -> str:
    """What the transport says about an undecodable message, stable across its redeliveries
    (broker-added headers such as delivery counts are left out on purpose). ``withheld``: no
    copy of the body is stored (the redaction hook failed), so the entry id, which hashes the
    copy, gets the body's digest here instead: two different bodies stay two entries."""
    raw_op = delivery.headers.get(HEADER_OPERATION_ID, "")
    ctype = delivery.content_type or delivery.headers.get("content-type", "")
    names = ",".join(sorted(k for k in delivery.headers if not k.lower().startswith("x-")))
    digest = hashlib.sha256(names.encode()).hexdigest()
    body = f"\x00{hashlib.sha256(delivery.body).hexdigest()}" if withheld else ""
    return f"{raw_op[:512]}\x00{ctype[:200]}\x00{digest}{body}"


def _marks_start(spec: HandlerSpec) -> bool:
    """Whether the handler's claims record when its effect starts (``Ledger.mark_started``): an
    unkeyed effect under effectively-once that quarantines unknown outcomes, whose recovered
    claim is re-run only when the previous attempt provably never started. Nowhere else: a keyed
    or transactional effect re-runs anyway, at-least-once keeps no claim."""
    eff = spec.effect
    return (
        spec.guarantee is Guarantee.EFFECTIVELY_ONCE
        and eff.kind == "unkeyed"
        and eff.on_unknown == "quarantine"
    )


def _evidence(exc: BaseException) -> str:
    """``exc`` as quarantine evidence: its type (qualified unless built in) and message."""
    cls = type(exc)
    name = cls.__qualname__
    if cls.__module__ != "builtins":
        name = f"{cls.__module__}.{name}"
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not lose the quarantine
        text = "<its message could not be read>"
    return f"{name}: {text}" if text else name


def _bare(request: QuarantineRequest, exc: LedgerDataError) -> QuarantineRequest:
    """``request`` without the bytes and text that came from outside (the message copy and its
    content type), for a ledger that refused its data. The operation id and fingerprint stay:
    ``decode_wire`` validated the one and computed the other. The identity gets the body's digest,
    so two bodies refused alike stay two entries."""
    digest = hashlib.sha256(request.message or b"").hexdigest()
    return replace(
        request,
        message=None,
        content_type=None,
        identity=f"{request.identity}\x00refused:{digest}",
        detail=f"{request.detail[:1500]}; the ledger refused this entry's data "
        f"({type(exc).__name__}), so it is stored without the message copy and content type",
    )


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a task's exception as seen (a batch that ended early does not await the rest)."""
    if not task.cancelled():
        task.exception()


def _encode_result(value: Any) -> str | None:
    """The handler's result as stored in the ledger, or None when it is not stored (None, too
    large, or it cannot be encoded). Never raises: the effect is done when this runs, and a result
    that cannot be stored must not turn into a failed attempt (a retry would run the effect
    again)."""
    if value is None:
        return None
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    except Exception:  # TypeError, ValueError, a __str__ that raises, RecursionError
        return None
    return text if len(text.encode()) <= MAX_RESULT_BYTES else None


class _NotAwaitable(OutcomeUnknown):
    """The handler returned something that cannot be awaited: it ran as a plain function, so its
    body (and its effect) already ran. An unknown outcome: registration refuses plain ``def``
    handlers, but a wrapper can still return a non-awaitable at run time."""


def _awaitable(out: Any, spec: HandlerSpec) -> Any:
    """``out`` (what calling the handler returned) when it can be awaited; else ``_NotAwaitable``
    (and no ``TypeError`` from the ``await``, which would read as a clean failure)."""
    if type(out) is CoroutineType or inspect.isawaitable(out):
        return out
    raise _NotAwaitable(
        f"handler {spec.name!r} returned {type(out).__name__}, not an awaitable: its body ran as "
        "a plain function (its effect may be done); write it as `async def`"
    )


@dataclass(slots=True)
class _Execution:
    """A running handler, as the keeper sees it."""

    spec: HandlerSpec
    delivery: Delivery
    claim: Claim | None
    deadline: float
    next_beat: float
    extend_visibility: bool
    cut: BaseException | None = None


@dataclass(slots=True, eq=False)
class _Gate:
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


class _Slots:
    """In-flight deliveries per handler: a fetch never takes more than there is room for."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._changed = asyncio.Event()

    async def wait_free(self) -> int:
        while self._free <= 0:
            self._changed.clear()
            await self._changed.wait()
        return self._free

    async def gather_room(self, want: int, linger: float) -> int:
        """Free slots, waiting up to ``linger`` seconds (loop time) for at least ``want`` of
        them: under load, fetching as soon as ONE slot frees gives one-message batches and a
        ledger round trip per message; a short linger lets the batch (and its claim) grow."""
        if self._free >= want:
            return self._free
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(linger):
                while self._free < want:
                    self._changed.clear()
                    await self._changed.wait()
        return self._free

    def take(self, n: int) -> None:
        self._free -= n

    def give(self) -> None:
        self._free += 1
        self._changed.set()


class _Coalescer(Generic[T, R]):
    """Turns concurrent single calls into batch calls: everything submitted while a batch is in
    flight goes out together in the next one (one ledger round trip per batch, not per message).
    """

    def __init__(
        self,
        many: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        limit: int = 500,
        *,
        drop_cancelled: bool = False,
    ):
        self._many = many
        self._limit = limit
        #: leave out the items whose caller was cancelled before their batch went out (a mark
        #: of an effect that will never start); by default they still go out (a completion)
        self._drop_cancelled = drop_cancelled
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        # no shield (an outer future per item): a cancelled caller's item still goes out with
        # its batch, the flush just finds its future done and skips it
        return await fut

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other handlers that finished this tick join the batch
        while self._queue:
            batch, self._queue = self._queue[: self._limit], self._queue[self._limit :]
            if self._drop_cancelled:
                batch = [(item, fut) for item, fut in batch if not fut.cancelled()]
                if not batch:
                    continue
            try:
                results = await self._many([item for item, _ in batch])
            except BaseException as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)


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
        self._rng = random.Random()
        self._stopping = asyncio.Event()
        #: set by ``stop(now=True)``: the stop does not wait for the drain
        self._forced = asyncio.Event()
        #: how the last ``run()`` ended (what a stop cut); None before it returned
        self.stop_report: StopReport | None = None
        #: ``time.monotonic()`` when consumption paused for a ledger outage (None while it runs)
        self.ledger_down_since: float | None = None
        self._crash: SimulatedCrash | None = None
        self._crashed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Subscription] = []
        self._started = False
        self._running: dict[asyncio.Task[Any], _Execution] = {}
        #: source -> the broker can extend its visibility (capabilities are fixed: asked once)
        self._extendable: dict[str, bool] = {}
        self._completer = _Coalescer(app.ledger.complete_many)
        #: unkeyed effects: "about to start" marks, one mark_started per batch of handlers
        self._starter = _Coalescer(app.ledger.mark_started, drop_cancelled=True)
        #: recovered claims run alone in this process (see runtime._isolation)
        self._suspects = SuspectLock()
        self._ledger_ok = asyncio.Event()
        self._ledger_ok.set()
        self._kick = asyncio.Event()
        self._keeper_wake = 0.0
        #: (handler, operation id) -> when its effect was recorded, until the broker completes it
        self._ambiguous: dict[tuple[str, str], float] = {}
        for spec in self.specs:
            self.stats.track(o.OPEN_AMBIGUITY, self._open_count(spec.name), handler=spec.name)
            self.stats.track(o.OPEN_AMBIGUITY_AGE, self._open_age(spec.name), handler=spec.name)
        self.stats.set(o.HORIZON_SECONDS, app.horizon)
        self._probe: asyncio.Task[None] | None = None
        #: seconds between two reads of the handler control flags (pause/resume) in the ledger
        self.control_interval = control_interval
        self._gates: dict[str, _Gate] = {}
        for spec in self.specs:
            self._gates[spec.name] = _Gate()
            self._gates[spec.name].open.set()
            self.stats.set(o.HANDLER_PAUSED, 0.0, handler=spec.name)
        #: set once the first control read finished (or failed): no fetch happens before it
        self._control_read = asyncio.Event()

    # ------------------------------------------------------------------ signals

    def _open_count(self, handler: str) -> Callable[[], float]:
        return lambda: float(sum(1 for h, _ in self._ambiguous if h == handler))

    def _open_age(self, handler: str) -> Callable[[], float]:
        def age() -> float:
            times = [t for (h, _), t in self._ambiguous.items() if h == handler]
            return self.app.clock.now() - min(times) if times else 0.0

        return age

    async def _settle_effected(
        self, spec: HandlerSpec, delivery: Delivery, env: Envelope, point: str, ctx: dict[str, Any]
    ) -> None:
        """EFFECTED → COMPLETED: the ambiguity window, counted open until the broker completes."""
        effected = self.app.clock.now()
        key = (spec.name, env.operation_id)
        self._ambiguous[key] = effected
        try:
            await self.app.failpoints.hit(point, ctx)
            if not self._tracing.enabled:
                await delivery.ack()
            else:
                with self._tracing.span(otel.BROKER_COMPLETE, handler=spec.name):
                    await delivery.ack()
        finally:
            self._ambiguous.pop(key, None)
        self.stats.observe(o.AMBIGUITY_WINDOW, self.app.clock.now() - effected, handler=spec.name)
        self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.APPLIED)

    def _delivered(
        self, spec: HandlerSpec, delivery: Delivery, env: Envelope, now: float, ages: list[float]
    ) -> None:
        """Signals at DELIVERED: redeliveries by key, and the copy's age against the horizon
        (collected into ``ages``: the batch records them at once)."""
        if env.published_at is not None:
            ages.append(max(now - env.published_at, 0.0))
        if delivery.attempt > 1 or delivery.redelivered:
            self.stats.inc(o.REDELIVERIES, handler=spec.name)
            self.stats.hit(o.REDELIVERED_KEYS, env.operation_id, handler=spec.name)

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

    async def run(self, *, drain_timeout: float = 30.0) -> None:
        """Consume until :meth:`stop` (then drain in-flight work for up to ``drain_timeout``
        seconds and settle what finished) or until a simulated crash (then raise it).

        Work still running when the drain timeout passes (or at once after ``stop(now=True)``)
        is cancelled, unsettled: the broker delivers it again and its claim expires with its
        lease. :attr:`stop_report` then says what was cut."""
        if self._started:
            raise ConfigurationError("a Worker runs once; create a new one with app.worker()")
        self._started = True
        self._validate()
        for spec in self.specs:
            self._subs.append(
                await self.app.broker.subscribe(spec.source, spec.group, prefetch=spec.concurrency)
            )
        loops = [
            asyncio.create_task(self._consume(spec, sub), name=f"consume:{spec.name}")
            for spec, sub in zip(self.specs, self._subs, strict=True)
        ]
        keeper = asyncio.create_task(self._keep(), name="keeper")
        control = asyncio.create_task(self._control(), name="control")
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
                          for ex in self._running.values()]  # fmt: skip
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        background = [keeper, control, *([self._probe] if self._probe else [])]
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

    @property
    def in_flight(self) -> int:
        """Handler runs in progress now (what a stop would wait for)."""
        return len(self._running)

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
        doomed = [*loops, *self._tasks, *([self._probe] if self._probe else [])]
        for t in doomed:
            t.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)
        for sub in self._subs:
            await sub.close(abandon=True)

    async def _consume(self, spec: HandlerSpec, sub: Subscription) -> None:
        slots = _Slots(spec.concurrency)
        half = max(1, spec.concurrency // 2)
        gate = self._gates[spec.name]
        gate.task = asyncio.current_task()
        await self._control_read.wait()
        while True:
            await slots.wait_free()
            free = await slots.gather_room(half, FETCH_LINGER)
            await self._ledger_ok.wait()
            await gate.open.wait()  # closed while the handler is paused
            if self._crash is not None:
                return
            gate.fetching = True
            try:
                batch = await sub.next_batch(free)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if self._fetch_interrupted(gate):
                    continue  # paused while waiting: nothing was taken
                raise
            finally:
                gate.fetching = False
            if gate.interrupted:  # the adapter swallowed the interrupt: the batch is in flight
                self._fetch_interrupted(gate)
            slots.take(len(batch))
            # fetched while the ledger went down: hold it (unsettled) rather than churn nacks
            await self._ledger_ok.wait()
            task = asyncio.create_task(self._guarded(spec, batch, slots))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _crashed_by(self, crash: SimulatedCrash) -> None:
        """A failpoint killed the worker: the first crash is the one ``run()`` raises."""
        if self._crash is None:
            self._crash = crash
        self._crashed.set()

    async def _guarded(self, spec: HandlerSpec, batch: list[Delivery], slots: _Slots) -> None:
        try:
            await self._process_batch(spec, batch, slots)
        except SimulatedCrash as crash:
            self._crashed_by(crash)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in the pipeline must not kill the worker or lose the message
            log.exception(
                "%s: pipeline error on a batch of %d; leaving it to redelivery",
                spec.name,
                len(batch),
            )
            for d in batch:
                if not d.settled:
                    self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.FAILED)
                    with contextlib.suppress(Exception):
                        await d.nack(delay=LEDGER_RETRY_DELAY)

    async def _item(
        self,
        spec: HandlerSpec,
        delivery: Delivery,
        step: Callable[[], Awaitable[None]],
        slots: _Slots,
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
            log.exception(
                "%s: pipeline error on %s; leaving it to redelivery",
                spec.name,
                delivery.delivery_id,
            )
            self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.FAILED)
            with contextlib.suppress(Exception):
                await delivery.nack(delay=LEDGER_RETRY_DELAY)
        finally:
            slots.give()

    async def _keep(self) -> None:
        """Extend leases and visibility of running handlers before they lapse; cut the ones past
        their deadline. One task per worker instead of one watcher per message: it sleeps until
        the earliest beat or deadline (at most ``tick``), and a new handler whose first beat is
        earlier (a visibility timeout shorter than the heartbeat) wakes it."""
        clock = self.app.clock
        tick = min(spec.heartbeat for spec in self.specs) / 2
        while True:
            now = clock.now()
            wake = now + tick
            for ex in self._running.values():
                if ex.cut is None:
                    wake = min(wake, ex.next_beat, ex.deadline)
            self._keeper_wake = wake
            self._kick.clear()
            sleeper = asyncio.ensure_future(clock.sleep(max(wake - now, 0.01)))
            kicked = asyncio.ensure_future(self._kick.wait())
            try:
                await asyncio.wait({sleeper, kicked}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                kicked.cancel()
            now = clock.now()
            for task, ex in list(self._running.items()):
                if task.done() or ex.cut is not None:
                    continue
                if now >= ex.deadline:
                    ex.cut = _Cut(f"handler exceeded its {ex.spec.timeout:.1f}s deadline")
                    task.cancel()
                elif now >= ex.next_beat:
                    await self._beat(ex, task)

    async def _beat(self, ex: _Execution, task: asyncio.Task[Any]) -> None:
        spec = ex.spec
        try:
            if ex.claim is not None:
                ex.claim = await self.app.ledger.extend(ex.claim, spec.lease)
                self.stats.inc(o.LEASE_EXTENSIONS, handler=spec.name)
            if ex.extend_visibility:
                await ex.delivery.extend(spec.lease)
                self.stats.inc(o.VISIBILITY_EXTENSIONS, handler=spec.name)
            ex.next_beat = self.app.clock.now() + spec.heartbeat
        except Exception as exc:
            # no lease, no run: cut the handler's deadline now
            ex.cut = (
                exc
                if isinstance(exc, LeaseLost)
                else _Cut(f"lease/visibility extension failed: {exc!r}")
            )
            task.cancel()

    # ------------------------------------------------------------------ handler control

    @property
    def paused(self) -> dict[str, PauseState]:
        """This worker's handlers that it currently holds paused (as of its last control read)."""
        return {name: g.pause for name, g in self._gates.items() if g.pause is not None}

    async def _control(self) -> None:
        """Read the handler control flags from the ledger every ``control_interval`` seconds
        and open or close each handler's fetch gate. Its own task, so that a slow or failing
        read never delays the keeper's lease extensions. A failed read keeps the last known
        state (consumption itself pauses on ledger trouble through the claim path)."""
        failures = 0
        while True:
            try:
                flags = await self.app.ledger.paused()
            except Exception as exc:
                failures += 1
                if isinstance(exc, LedgerUnavailable):
                    # every handler's flag is now stale: counted where operators already look
                    for spec in self.specs:
                        self.stats.inc(o.LEDGER_UNAVAILABLE, handler=spec.name)
                if failures == 1 or failures % 60 == 0:
                    log.warning("cannot read the handler control flags (%d times in a row): %s; "
                                "keeping the last known state", failures, exc,
                                exc_info=not isinstance(exc, LedgerUnavailable))  # fmt: skip
            else:
                failures = 0
                self._apply_control(flags)
            self._control_read.set()
            await self.app.clock.sleep(self.control_interval)

    def _apply_control(self, flags: dict[str, PauseState]) -> None:
        for spec in self.specs:
            gate = self._gates[spec.name]
            state = flags.get(spec.name)
            if state is None:
                if gate.pause is not None:
                    gate.pause = None
                    gate.open.set()
                    self.stats.set(o.HANDLER_PAUSED, 0.0, handler=spec.name)
                    log.warning("%s: resumed; fetching from %s again", spec.name, spec.source)
                continue
            if gate.pause is None:
                gate.open.clear()
                self.stats.set(o.HANDLER_PAUSED, 1.0, handler=spec.name)
                log.warning(
                    "%s: paused by %s (%s); no new fetches from %s, in-flight work settles",
                    spec.name, state.by or "?", state.reason or "no reason given", spec.source,
                )  # fmt: skip
                task = gate.task
                if gate.fetching and not gate.interrupted and task is not None and not task.done():
                    gate.interrupted = True
                    task.cancel()
            gate.pause = state

    @staticmethod
    def _fetch_interrupted(gate: _Gate) -> bool:
        """Consume the control loop's interrupt of a fetch: True when the CancelledError being
        handled was that interrupt alone (any other cancel, a stop or a crash, goes on)."""
        if not gate.interrupted:
            return False
        gate.interrupted = False
        task = asyncio.current_task()
        return task is not None and task.uncancel() == 0

    # ------------------------------------------------------------------ pipeline

    def _ctx(self, spec: HandlerSpec, env: Envelope | None, attempt: int) -> dict[str, Any]:
        return {
            "handler": spec.name,
            "guarantee": spec.guarantee.value,
            "operation_id": env.operation_id if env else None,
            "attempt": attempt,
            "sleep": self.app.clock.sleep,
        }

    async def _process_batch(self, spec: HandlerSpec, batch: list[Delivery], slots: _Slots) -> None:
        # steps are (delivery, zero-argument coroutine function): coroutines are only created
        # when they run, so a crash in the middle of a batch leaves none un-awaited
        steps: list[_Step] = []
        decoded: list[tuple[Delivery, Envelope]] = []
        self.stats.inc(o.RECEIVED, len(batch), handler=spec.name)
        # only the ledger compares fingerprints: elsewhere it is computed if something reads it
        check_fp = spec.guarantee is Guarantee.EFFECTIVELY_ONCE
        now = self.app.clock.now()
        ages: list[float] = []
        for delivery in batch:
            try:
                env = decode_wire(
                    delivery.body,
                    delivery.headers,
                    content_type=delivery.content_type,
                    key=delivery.key,
                    broker_timestamp=delivery.broker_timestamp,
                    key_extractor=spec.key,
                    limits=spec.limits,
                    check_fingerprint=check_fp,
                )
            except BadInput as bad:
                q = partial(self._quarantine, spec, delivery, None, bad.reason, str(bad),
                            attempts=delivery.attempt)  # fmt: skip
                steps.append((delivery, q))
                continue
            self._delivered(spec, delivery, env, now, ages)
            if spec.guarantee is Guarantee.AT_MOST_ONCE:
                steps.append((delivery, partial(self._at_most_once, spec, delivery, env)))
            elif spec.guarantee is Guarantee.AT_LEAST_ONCE:
                steps.append((delivery, partial(self._at_least_once, spec, delivery, env)))
            else:
                decoded.append((delivery, env))
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
                steps.extend(await self._claim_batch(spec, decoded))
                await self._run_all(spec, steps, slots)
            finally:
                self._suspects.shared_release()
        elif steps:
            await self._run_all(spec, steps, slots)
        for delivery, env in suspects:
            await self._isolated(spec, delivery, env, slots)

    async def _run_all(self, spec: HandlerSpec, steps: list[_Step], slots: _Slots) -> None:
        if len(steps) == 1:
            await self._item(spec, steps[0][0], steps[0][1], slots)
        else:
            await self._run_steps(spec, steps, slots)

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
        self, spec: HandlerSpec, delivery: Delivery, env: Envelope, slots: _Slots
    ) -> None:
        """Claim and run one suspect while no other claim of this process is open, so that if
        it is the poison that kills the process, no other operation's attempt is charged. A
        suspect waiting here holds no claim."""
        await self._suspects.exclusive_acquire()
        try:
            for d, run in await self._claim_batch(spec, [(delivery, env)]):
                await self._item(spec, d, run, slots)
        finally:
            self._suspects.exclusive_release()

    async def _run_steps(self, spec: HandlerSpec, steps: list[_Step], slots: _Slots) -> None:
        """Run every step in its own task, all at once (the handler's concurrency: the batch
        never exceeds its free slots), and return when all have finished.

        What ``asyncio.gather`` does, for about half its cost per message: the tasks are awaited
        in order, and a task already finished costs no wake-up. A step's crash does not wait for
        that order: ``_item`` reports it to ``run()`` at once. Cancelled (a drain timeout, a
        crash), this cancels every task of the batch and returns once they have all finished, as
        ``gather`` would. Any other exception (a crash) is raised at once and leaves the other
        steps running, as ``gather`` would; their own exceptions are retrieved, never logged as
        lost."""
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._item(spec, d, run, slots)) for d, run in steps]
        try:
            for task in tasks:
                await task
        except BaseException:
            this = asyncio.current_task()
            if this is not None and this.cancelling():
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks)
            for task in tasks:
                task.add_done_callback(_retrieve)
            raise

    async def _claim_batch(
        self, spec: HandlerSpec, decoded: list[tuple[Delivery, Envelope]]
    ) -> list[_Step]:
        """Horizon check, then one ``claim_many`` for the whole batch; returns the next steps."""
        app, ledger = self.app, self.app.ledger
        now = app.clock.now()
        steps: list[_Step] = []
        fresh: list[tuple[Delivery, Envelope]] = []
        for delivery, env in decoded:
            if env.published_at is not None and now - env.published_at > app.horizon:
                why = (
                    f"published {now - env.published_at:.0f}s ago, beyond the replay horizon of "
                    f"{app.horizon:.0f}s: the ledger may have forgotten it, so it cannot be "
                    "proven new"
                )
                reason = QuarantineReason.BEYOND_HORIZON
                q = partial(self._quarantine, spec, delivery, env, reason, why,
                            attempts=delivery.attempt)  # fmt: skip
                steps.append((delivery, q))
            elif env.published_at is not None and env.published_at - now > app.max_clock_skew:
                why = (
                    f"published {env.published_at - now:.0f}s in the future, beyond the allowed "
                    f"clock skew of {app.max_clock_skew:.0f}s: fix the producer's clock"
                )
                reason = QuarantineReason.FUTURE_TIMESTAMP
                q = partial(self._quarantine, spec, delivery, env, reason, why,
                            attempts=delivery.attempt)  # fmt: skip
                steps.append((delivery, q))
            else:
                fresh.append((delivery, env))
        if not fresh:
            return steps
        marks = _marks_start(spec)
        requests = [
            ClaimRequest(
                OpKey(spec.scope, env.operation_id), env.fingerprint, self.owner, spec.lease, marks
            )
            for _, env in fresh
        ]
        try:
            with self._tracing.span(otel.CLAIM, handler=spec.name, batch=len(requests)):
                if len(requests) == 1 and not marks:  # claim() does not carry marks_start
                    r = requests[0]
                    outcomes: list[ClaimOutcome] = [
                        await ledger.claim(r.key, r.fingerprint, r.owner, r.lease)
                    ]
                else:
                    outcomes = await ledger.claim_many(requests)
        except LedgerDataError as exc:
            if len(fresh) > 1:
                # one copy's data was refused: claim each alone, so the others still run
                for one in fresh:
                    steps.extend(await self._claim_batch(spec, [one]))
                return steps
            delivery, env = fresh[0]
            why = (
                f"the ledger refused to claim operation {env.operation_id!r} ({exc}); nothing "
                "ran. Fix what the producer sends as the operation id and resend"
            )
            q = partial(self._quarantine, spec, delivery, env,
                        QuarantineReason.INVALID_OPERATION_ID, why,
                        attempts=delivery.attempt)  # fmt: skip
            steps.append((delivery, q))
            return steps
        except LedgerUnavailable as exc:
            # no effect without a confirmed claim: give the messages back and try later
            log.warning(
                "%s: ledger unavailable (%s); nacking %d deliveries", spec.name, exc, len(fresh)
            )
            self.stats.inc(o.LEDGER_UNAVAILABLE, handler=spec.name)
            self._ledger_down()
            for delivery, _ in fresh:
                self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.UNAVAILABLE)
                steps.append((delivery, partial(delivery.nack, delay=LEDGER_RETRY_DELAY)))
            return steps
        for (delivery, env), outcome in zip(fresh, outcomes, strict=True):
            steps.append((delivery, partial(self._after_claim, spec, delivery, env, outcome)))
        return steps

    async def _at_most_once(self, spec: HandlerSpec, delivery: Delivery, env: Envelope) -> None:
        ctx = self._ctx(spec, env, delivery.attempt)
        try:
            # confirmed, not merely requested: a completion still in flight when the process
            # dies brings the message back, and the effect below would run twice
            await delivery.ack_confirmed()
        except BrokerError as exc:
            log.warning("%s: %s", spec.name, self._shown(
                f"at-most-once: {exc}; the effect of {env.operation_id} is not run (it may come "
                "back, or be lost)"))  # fmt: skip
            self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.UNCONFIRMED)
            return
        await self.app.failpoints.hit(fp.AFTER_ACK, ctx)
        await self.app.failpoints.hit(fp.BEFORE_EFFECT, ctx)
        try:
            await self._run_handler(spec, Context(env, delivery, spec.name, delivery.attempt), None)
        except Exception as exc:  # completed already: counted, never retried
            log.warning("%s: %s", spec.name, self._shown(
                f"at-most-once handler failed on {env.operation_id}: {exc!r} (not retried)"
            ))  # fmt: skip
            self.stats.inc(o.HANDLER_ERRORS, handler=spec.name)
            if isinstance(exc, OutcomeUnknown):
                self.stats.inc(o.OUTCOME_UNKNOWN, handler=spec.name)
            self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.FAILED)
            return
        await self.app.failpoints.hit(fp.AFTER_EFFECT_BEFORE_LEDGER, ctx)
        self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.APPLIED)

    async def _at_least_once(self, spec: HandlerSpec, delivery: Delivery, env: Envelope) -> None:
        attempt = delivery.attempt
        ctx = self._ctx(spec, env, attempt)
        if attempt > spec.retry.max_attempts:
            await self._quarantine(
                spec,
                delivery,
                env,
                QuarantineReason.MAX_ATTEMPTS,
                f"delivered {attempt} times, budget {spec.retry.max_attempts}",
                attempts=attempt,
                risk=EffectRisk.OUTCOME_UNKNOWN,
            )
            self.stats.inc(o.RETRY_BUDGET_EXHAUSTED, handler=spec.name)
            return
        await self.app.failpoints.hit(fp.BEFORE_EFFECT, ctx)
        try:
            await self._run_handler(spec, Context(env, delivery, spec.name, attempt), None)
        except _NotAwaitable as exc:
            # the body ran as a plain function: the effect is done, so complete it (a nack
            # would run it again because of our own failure to await it)
            log.warning("%s: %s", spec.name, self._shown(f"{exc}; completing {env.operation_id}"))
            self.stats.inc(o.HANDLER_ERRORS, handler=spec.name)
        except Exception as exc:
            await self._handler_failed(spec, delivery, env, None, attempt, exc)
            return
        # no ledger: the effect is done when the handler returns; the broker completes after
        await self._settle_effected(spec, delivery, env, fp.AFTER_EFFECT_BEFORE_LEDGER, ctx)
        await self.app.failpoints.hit(fp.AFTER_ACK, ctx)

    async def _after_claim(
        self, spec: HandlerSpec, delivery: Delivery, env: Envelope, outcome: ClaimOutcome
    ) -> None:
        app, ledger = self.app, self.app.ledger
        if isinstance(outcome, Acquired):
            await self._acquired(spec, delivery, env, outcome.claim)
            return
        now = app.clock.now()
        if isinstance(outcome, AlreadyDone):
            self.stats.inc(o.DUPLICATE_HITS, handler=spec.name, cause="completed")
            if outcome.record.completed_at is not None:
                age = ledger.now() - outcome.record.completed_at
                self.stats.observe(o.DUPLICATE_AGE, max(age, 0.0), handler=spec.name)
            self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.DUPLICATE)
            await delivery.ack()
            return
        if isinstance(outcome, InFlight):
            self.stats.inc(o.DUPLICATE_HITS, handler=spec.name, cause="in_flight")
            self.stats.inc(o.OVERLAPS_PREVENTED, handler=spec.name)
            self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.IN_FLIGHT)
            remaining = (outcome.record.lease_until or now) - ledger.now()
            await delivery.nack(delay=max(remaining, 0.0) + 0.05)
            return
        if isinstance(outcome, Conflict):
            await self._quarantine(
                spec,
                delivery,
                env,
                QuarantineReason.KEY_REUSE_CONFLICT,
                f"operation {env.operation_id} was first seen with payload "
                f"{outcome.record.fingerprint}, this copy has {env.fingerprint}",
                attempts=delivery.attempt,
            )
            return
        assert isinstance(outcome, Quarantined), outcome
        self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.QUARANTINE)
        await delivery.ack()

    async def _acquired(
        self, spec: HandlerSpec, delivery: Delivery, env: Envelope, claim: Claim
    ) -> None:
        """Claim ACQUIRED: budget and outcome-unknown checks, the handler, the ledger
        completion (EFFECTED), then the broker completion."""
        app = self.app
        ctx = self._ctx(spec, env, claim.attempt)
        await app.failpoints.hit(fp.AFTER_CLAIM, ctx)
        # a recovered claim whose previous holder may have started its effect (an unkeyed
        # effect's claim knows when it never did: mark_started was not recorded)
        unknown = claim.recovered and claim.previous_started
        if claim.attempt > spec.retry.max_attempts:
            self.stats.inc(o.RETRY_BUDGET_EXHAUSTED, handler=spec.name)
            await self._quarantine(
                spec,
                delivery,
                env,
                QuarantineReason.MAX_ATTEMPTS,
                f"claimed {claim.attempt} times, budget {spec.retry.max_attempts}",
                claim=claim,
                attempts=claim.attempt,
                risk=EffectRisk.OUTCOME_UNKNOWN if unknown else EffectRisk.RELEASED_CLEANLY,
            )
            return
        if claim.recovered and not claim.previous_started:
            log.info("%s: %s", spec.name, self._shown(
                f"the previous attempt on {env.operation_id} never started its effect; running "
                "it again"))  # fmt: skip
        if unknown and spec.effect.kind == "unkeyed" and spec.effect.on_unknown == "quarantine":
            await self._quarantine(
                spec,
                delivery,
                env,
                QuarantineReason.OUTCOME_UNKNOWN,
                f"attempt {claim.attempt - 1} on {spec.effect.name} (which cannot deduplicate) "
                "lost its lease without completing after its effect was marked started (or "
                "before marks were recorded); its effect may or may not have happened",
                claim=claim,
                attempts=claim.attempt,
                risk=EffectRisk.OUTCOME_UNKNOWN,
            )
            return
        hctx = Context(
            env,
            delivery,
            spec.name,
            claim.attempt,
            idempotency_key=env.operation_id if spec.effect.kind == "keyed" else None,
            token=claim.token,
        )
        if await self._effect(spec, delivery, env, claim, hctx, ctx):
            await self._settle_effected(spec, delivery, env, fp.AFTER_LEDGER_BEFORE_ACK, ctx)
            await app.failpoints.hit(fp.AFTER_ACK, ctx)

    async def _effect(
        self,
        spec: HandlerSpec,
        delivery: Delivery,
        env: Envelope,
        claim: Claim,
        hctx: Context,
        ctx: dict[str, Any],
    ) -> bool:
        """BEFORE_EFFECT, the handler and the ledger completion (EFFECTED). True when the
        broker completion may follow; False when this copy was nacked or left to redelivery."""
        app, ledger = self.app, self.app.ledger
        await app.failpoints.hit(fp.BEFORE_EFFECT, ctx)
        try:
            if claim.lease_until <= ledger.now():
                # before any transaction opens: a SQLite transaction holds the ledger's only
                # connection, and an extension from inside it would wait for itself
                claim = await self._revalidate(spec, claim)
            if _marks_start(spec) and not await self._mark_started(spec, delivery, env, claim):
                return False
            if spec.effect.kind == "transactional":
                assert isinstance(ledger, TransactionalLedger)
                try:
                    async with ledger.transaction() as tx:
                        hctx.tx = tx
                        result = await self._run_handler(spec, hctx, claim)
                        await app.failpoints.hit(fp.AFTER_EFFECT_BEFORE_LEDGER, ctx)
                        with self._tracing.span(otel.LEDGER_COMPLETE, handler=spec.name):
                            await ledger.complete_in(tx, claim, _encode_result(result))
                except (LeaseLost, LedgerUnavailable):
                    raise
                except Exception as exc:  # rolled back: no effect, safe to retry
                    await self._handler_failed(spec, delivery, env, claim, claim.attempt, exc)
                    return False
            else:
                try:
                    result = await self._run_handler(spec, hctx, claim)
                except LeaseLost:
                    raise
                except Exception as exc:
                    await self._handler_failed(spec, delivery, env, claim, claim.attempt, exc)
                    return False
                await app.failpoints.hit(fp.AFTER_EFFECT_BEFORE_LEDGER, ctx)
                try:
                    if not self._tracing.enabled:
                        await self._complete(claim, _encode_result(result))
                    else:
                        with self._tracing.span(otel.LEDGER_COMPLETE, handler=spec.name):
                            await self._complete(claim, _encode_result(result))
                except (LeaseLost, LedgerUnavailable):
                    raise
                except Exception:
                    # our own failure after the effect (a ledger bug, a tracing hook): as when
                    # the ledger is down, never release (a retry would run the effect again)
                    # and never ack; the lease runs out and a recovered claim decides (a keyed
                    # effect re-runs under its key, an unkeyed one is quarantined)
                    log.exception("%s: %s", spec.name, self._shown(
                        f"recording the effect of {env.operation_id} failed; leaving it to its "
                        "lease"))  # fmt: skip
                    self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.FAILED)
                    await delivery.nack(delay=spec.lease)
                    return False
        except LeaseLost as exc:
            # someone else owns the operation now: never complete this copy at the broker
            log.warning("%s: %s", spec.name, self._shown(str(exc)))
            self.stats.inc(o.LEASE_LOST, handler=spec.name)
            self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.LEASE_LOST_OUTCOME)
            await delivery.nack(delay=spec.lease)
            return False
        except LedgerUnavailable as exc:
            # the effect may be done but the ledger cannot record it: never ack, never release.
            # The redelivery meets our lease (InFlight), then a recovered claim: a keyed or
            # transactional effect re-runs safely, an unkeyed one is quarantined outcome_unknown.
            log.warning("%s: %s", spec.name, self._shown(
                f"ledger unavailable after the effect of {env.operation_id}: {exc}"))  # fmt: skip
            self.stats.inc(o.LEDGER_UNAVAILABLE, handler=spec.name)
            self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.UNAVAILABLE)
            self._ledger_down()
            await delivery.nack(delay=spec.lease)
            return False
        return True

    # ------------------------------------------------------------------ helpers

    def _shown(self, text: str) -> str:
        """``text`` about a message (it may quote operation ids or payload values) as a log
        line or a stored error may show it: through the app's redaction hook."""
        return shown_text(self.app.redact, text)

    async def _disclose(self, delivery: Delivery, detail: str, op: str | None) -> Disclosure:
        """``quarantine.disclose`` for one message. The app's hook is user code that may be slow
        on a large body: it runs on a thread, and one that takes longer than
        :data:`REDACT_TIMEOUT` counts as a failed hook (nothing of the body is kept), so a slow
        hook can neither stall every other handler on the event loop nor block the
        quarantine."""
        redact = self.app.redact
        if redact is None:
            return disclose(None, delivery.body, detail, op)
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(disclose, redact, delivery.body, detail, op), REDACT_TIMEOUT
            )
        except TimeoutError:
            return Disclosure(
                None,
                f"(detail withheld: the redaction hook took longer than {REDACT_TIMEOUT:g}s); no "
                "copy of the body was stored",
                None,
                f"TimeoutError (it took longer than {REDACT_TIMEOUT:g}s)",
            )

    async def _mark_started(
        self, spec: HandlerSpec, delivery: Delivery, env: Envelope, claim: Claim
    ) -> bool:
        """Record that the effect is about to start (unkeyed effects), in the coalesced
        ``mark_started`` of the handlers starting now: one ledger round trip per batch. True when
        the effect may start. A stale claim raises ``LeaseLost`` (the caller leaves the copy to
        the broker); a ledger that cannot record it means the effect does not start: the copy is
        nacked past the lease, and the recovered claim learns that it never started."""
        try:
            marked = await self._starter.submit(claim)
        except LedgerUnavailable as exc:
            log.warning("%s: %s", spec.name, self._shown(
                f"ledger unavailable before the effect of {env.operation_id}: {exc}; the effect "
                "was not started"))  # fmt: skip
            self.stats.inc(o.LEDGER_UNAVAILABLE, handler=spec.name)
            self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.UNAVAILABLE)
            self._ledger_down()
            await delivery.nack(delay=spec.lease)
            return False
        if isinstance(marked, LeaseLost):
            raise marked
        return True

    async def _complete(self, claim: Claim, result: str | None) -> None:
        """Record EFFECTED through the coalescing ``complete_many``; retry a briefly unavailable
        ledger a few times (the keeper keeps the lease alive meanwhile) before giving up."""
        delay = 0.2
        for attempt in range(4):
            try:
                done = await self._completer.submit((claim, result))
            except LedgerUnavailable:
                if attempt == 3:
                    raise
                await self.app.clock.sleep(delay)
                delay *= 2
                continue
            if isinstance(done, LeaseLost):
                raise done
            return

    @property
    def ledger_paused(self) -> bool:
        """Consumption is paused because the ledger did not answer (see ``_ledger_down``)."""
        return not self._ledger_ok.is_set()

    def _ledger_down(self) -> None:
        """Pause fetching on every handler until the ledger answers again: no effect may start
        without a confirmed claim, and fetching only to nack would churn the broker."""
        if not self._ledger_ok.is_set():
            return
        self._ledger_ok.clear()
        self.ledger_down_since = time.monotonic()
        self._probe = asyncio.create_task(self._probe_ledger())

    async def _probe_ledger(self) -> None:
        """Read the ledger every second, backing off to LEDGER_PROBE_MAX_DELAY, until it
        answers; then resume fetching. Short enough a back-off that a ledger back after a long
        outage is used within seconds (``replaysafe run``'s /readyz waits for it)."""
        delay = LEDGER_RETRY_DELAY
        probe = OpKey("replaysafe", "ledger-probe")
        while True:
            await self.app.clock.sleep(delay)
            try:
                await self.app.ledger.get(probe)
            except LedgerUnavailable:
                delay = min(delay * 2, LEDGER_PROBE_MAX_DELAY)
                continue
            log.warning("ledger reachable again; resuming consumption")
            self.ledger_down_since = None
            self._ledger_ok.set()
            return

    def _can_extend(self, spec: HandlerSpec) -> bool:
        known = self._extendable.get(spec.source)
        if known is None:
            caps = self.app.broker.capabilities(spec.source)
            known = self._extendable[spec.source] = caps.extend_visibility
        return known

    async def _run_handler(self, spec: HandlerSpec, ctx: Context, claim: Claim | None) -> Any:
        """Run the handler under its deadline while the keeper extends its lease (and the
        broker's visibility, where it has a timer). A failed extension or a passed deadline cuts
        the handler: it is cancelled and ``LeaseLost`` / ``_Cut`` is raised here."""
        clock = self.app.clock
        started = clock.now()
        # the keeper cancels the task running this delivery; no extra task per message
        task = asyncio.current_task()
        assert task is not None
        extend_visibility = spec.extend_visibility and self._can_extend(spec)
        first_beat = started + spec.heartbeat
        visible_until = ctx.delivery.settle_deadline
        if extend_visibility and visible_until is not None:
            # a visibility timeout shorter than the heartbeat: extend halfway through it
            first_beat = min(first_beat, started + max(visible_until - started, 0.0) / 2)
        ex = _Execution(
            spec=spec,
            delivery=ctx.delivery,
            claim=claim,
            deadline=started + spec.timeout,
            next_beat=first_beat,
            extend_visibility=extend_visibility,
        )
        self._running[task] = ex
        if min(first_beat, ex.deadline) < self._keeper_wake:
            self._kick.set()
        result: Any = None
        returned = False
        try:
            if not self._tracing.enabled:
                return await _awaitable(spec.fn(ctx), spec)
            with self._tracing.span(otel.EFFECT, handler=spec.name,
                                       operation_id=ctx.operation_id, attempt=ctx.attempt,
                                       token=ctx.token):  # fmt: skip
                result = await _awaitable(spec.fn(ctx), spec)
                returned = True
            return result
        except asyncio.CancelledError:
            # the keeper's cancel becomes the cut; any other cancel (shutdown, crash) goes on
            if ex.cut is not None and task.uncancel() == 0:
                raise ex.cut from None
            raise
        except Exception:
            if not returned:
                raise
            # the span's end (a tracing hook) failed after the handler returned: the effect is
            # done, and our bookkeeping must not turn it into a failed attempt (a retry would
            # run the effect again)
            log.exception("%s: tracing failed after the handler returned; the result stands",
                          spec.name)  # fmt: skip
            return result
        finally:
            del self._running[task]
            try:
                self.stats.observe(o.HANDLER_SECONDS, clock.now() - started, handler=spec.name)
            except Exception:  # a metrics hook must not decide the outcome either
                log.exception("%s: recording the handler's duration failed", spec.name)

    async def _revalidate(self, spec: HandlerSpec, claim: Claim) -> Claim:
        """The lease ran out between the claim and the handler (the worker stalled: GC, SIGSTOP,
        an overloaded host, or a slow ledger). Never start an effect on a lease that may be
        gone: extend it first. The extension succeeds only while the claim's fencing token is
        still current (nobody took the operation over meanwhile); otherwise ``LeaseLost``, and
        the copy is left to the broker. A stall *during* the effect cannot be caught here: that
        is what the fencing token (``Context.token``) and the idempotency key are for."""
        try:
            return await self.app.ledger.extend(claim, spec.lease)
        except LedgerUnavailable as exc:
            raise LeaseLost(
                f"the lease on {claim.key.operation_id} expired before its handler started and "
                f"the ledger could not confirm it ({exc}); the effect was not started"
            ) from exc

    async def _handler_failed(
        self,
        spec: HandlerSpec,
        delivery: Delivery,
        env: Envelope,
        claim: Claim | None,
        attempt: int,
        exc: Exception,
    ) -> None:
        self.stats.inc(o.HANDLER_ERRORS, handler=spec.name)
        cut = isinstance(exc, _Cut)
        # the handler itself says its effect may have happened (a timeout after sending); under
        # effectively-once an unkeyed effect's failure reads the same unless the handler proves
        # the effect did not happen (EffectNotApplied, the effect's not_applied_on): a plain
        # exception after the request left must not be retried into a second effect
        told = isinstance(exc, OutcomeUnknown) or (
            claim is not None
            and spec.effect.kind == "unkeyed"
            and not cut
            and not spec.effect.not_applied(exc)
        )
        if told:
            self.stats.inc(o.OUTCOME_UNKNOWN, handler=spec.name)
        # a handler cut at its deadline (or when an extension failed) was cancelled wherever it
        # was, possibly after its request left: its effect may have happened too
        risk = EffectRisk.OUTCOME_UNKNOWN if told or cut else EffectRisk.RELEASED_CLEANLY
        unknown = (cut or told) and not spec.effect.reruns_when_unknown
        if claim is not None and unknown:
            # the handler failed mid-effect on a downstream that cannot deduplicate
            await self._quarantine(
                spec,
                delivery,
                env,
                QuarantineReason.OUTCOME_UNKNOWN,
                f"attempt {attempt} failed with {_evidence(exc)}; the effect on "
                f"{spec.effect.name} may have happened (an unkeyed effect is retried only after "
                "EffectNotApplied or an exception its not_applied_on lists)",
                claim=claim,
                attempts=attempt,
                risk=EffectRisk.OUTCOME_UNKNOWN,
            )
            return
        if not cut and not spec.retry.retryable(exc):
            await self._quarantine(
                spec,
                delivery,
                env,
                QuarantineReason.NON_RETRYABLE_ERROR,
                repr(exc),
                claim=claim,
                attempts=attempt,
                risk=risk,
            )
            return
        elapsed = self.app.clock.now() - env.published_at if env.published_at is not None else None
        out_of_time = (
            spec.retry.max_elapsed is not None
            and elapsed is not None
            and elapsed >= spec.retry.max_elapsed
        )
        if attempt >= spec.retry.max_attempts or out_of_time:
            self.stats.inc(o.RETRY_BUDGET_EXHAUSTED, handler=spec.name)
            budget = (
                f"{elapsed:.0f}s since the first publish, budget {spec.retry.max_elapsed:.0f}s"
                if out_of_time and elapsed is not None and spec.retry.max_elapsed is not None
                else f"budget {spec.retry.max_attempts} attempts"
            )
            await self._quarantine(
                spec,
                delivery,
                env,
                QuarantineReason.MAX_ATTEMPTS,
                f"attempt {attempt} failed ({budget}): {exc!r}",
                claim=claim,
                attempts=attempt,
                risk=risk,
            )
            return
        if claim is not None:
            try:
                # stored as the record's last_error: what the redaction hook strips stays out
                await self.app.ledger.release(claim, self._shown(repr(exc))[:1000])
            except LeaseLost:
                self.stats.inc(o.LEASE_LOST, handler=spec.name)
            except LedgerUnavailable:
                # not released: the lease runs out instead, then a recovered claim retries
                self.stats.inc(o.LEDGER_UNAVAILABLE, handler=spec.name)
                self._ledger_down()
        self.stats.inc(o.RETRIES, handler=spec.name)
        self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.RETRIED)
        await delivery.nack(delay=spec.retry.delay(attempt, self._rng))

    async def _quarantine(
        self,
        spec: HandlerSpec,
        delivery: Delivery,
        env: Envelope | None,
        reason: QuarantineReason,
        detail: str,
        *,
        claim: Claim | None = None,
        attempts: int = 0,
        risk: EffectRisk = EffectRisk.NEVER_CLAIMED,
    ) -> None:
        """Record the quarantine durably, then complete the original at the broker.

        What is written down (the body copy, the detail, the operation id in the log line)
        passes through the app's redaction hook first (``quarantine.disclose``); a hook that
        fails keeps no copy of the body and never stops the quarantine."""
        op = env.operation_id if env else None
        shown = await self._disclose(delivery, detail, op)
        request = QuarantineRequest(
            scope=spec.scope,
            reason=reason,
            operation_id=op,
            fingerprint=env.fingerprint if env else None,
            risk=risk,
            attempts=attempts,
            detail=shown.detail[:2000],
            message=shown.message,
            # the content type the body was decoded (and fingerprinted) as: redrive checks the
            # copy against the fingerprint with it (a plain client's missing one means JSON)
            content_type=env.content_type if env else delivery.content_type,
            identity="" if env else _transport_identity(delivery, withheld=shown.message is None),
            published_at=env.published_at if env else delivery.broker_timestamp,
        )
        try:
            with self._tracing.span(otel.QUARANTINE, handler=spec.name, reason=reason.value):
                try:
                    entry = await self.app.ledger.quarantine(request, claim)
                except LedgerDataError as exc:
                    # the ledger is up but refused something of this message: store the entry
                    # without what came from outside rather than nack it forever
                    entry = await self.app.ledger.quarantine(_bare(request, exc), claim)
        except LedgerDataError as exc:
            # not even the bare entry: a bug, never an outage; the copy waits out a lease
            log.error("%s: the ledger refused quarantine entry %s even without the message's "
                      "data (%s); leaving the copy to redelivery", spec.name,
                      request.entry_id(), self._shown(str(exc)))  # fmt: skip
            self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.FAILED)
            await delivery.nack(delay=spec.lease)
            return
        except LeaseLost:
            self.stats.inc(o.LEASE_LOST, handler=spec.name)
            await delivery.nack(delay=spec.lease)
            return
        except LedgerUnavailable:
            self.stats.inc(o.LEDGER_UNAVAILABLE, handler=spec.name)
            await delivery.nack(delay=LEDGER_RETRY_DELAY)
            return
        if shown.hook_error is not None:
            log.error(
                "%s: the app's redaction hook raised %s on a message body: quarantine entry %s "
                "keeps no copy of it; fix the hook (App(redact=...))",
                spec.name,
                shown.hook_error,
                entry.id,
            )
        # the entry id is what `replaysafe quarantine show` takes; the transport's delivery id
        # only where no operation id is known (bad input)
        about = f"delivery {delivery.delivery_id}" if op is None else "operation withheld"
        if shown.operation_id is not None:
            about = f"operation {shown.operation_id}"
        log.warning(
            "%s: quarantined entry %s (%s) as %s: %s",
            spec.name,
            entry.id,
            about,
            reason.value,
            shown.detail,
        )
        self.stats.inc(o.QUARANTINED, handler=spec.name, reason=reason.value)
        self.stats.inc(o.DELIVERIES, handler=spec.name, outcome=o.QUARANTINE)
        await self.app.failpoints.hit(
            fp.AFTER_QUARANTINE_BEFORE_ACK, self._ctx(spec, env, attempts)
        )
        await delivery.ack()
