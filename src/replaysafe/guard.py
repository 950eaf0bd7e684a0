"""The Guard: effectively-once (or at-least-once) inside a consumer you already run.

A :class:`Guard` is the runtime's pipeline as a library call. Your consumer (an aio-pika or
confluent-kafka loop, a boto3 SQS loop, a Lambda handler, a Celery task) receives a message and
hands it to the guard with the function that makes the effect; the guard claims the operation in
the ledger, runs the function while it extends the lease, records the effect, and returns an
:class:`Outcome` that says what happened and what to tell the broker (:attr:`Outcome.action`).

What the guard cannot know: it does not own the ack. Between its answer and your ack the effect
is recorded and the copy not yet completed (the ambiguity window); a copy redelivered then is
answered from the ledger as a duplicate, which is safe, but only if you ack what the outcome says
to ack and nack what it says to nack. A nack the broker cannot delay comes back at once.

Async: ``await guard.run(message, fn)``. Sync: ``guard.run_sync(message, fn)`` runs ``fn`` in the
calling thread, the whole pipeline with it, on the ledger's sync twin (``Ledger.sync()``: the sync
driver, no event loop), while one keeper thread per guard extends the lease; ``@guard.once`` wraps
a function that receives the payload. Batch: ``run_batch`` claims a batch in one ledger round trip
and completes it in one.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import wraps
from typing import Any

from replaysafe import observe as o
from replaysafe._coro import at_once
from replaysafe.app import (
    DAY,
    Context,
    HandlerOptions,
    HandlerSpec,
    Middleware,
    RetryPolicy,
    coerce_guarantee,
)
from replaysafe.brokers.base import Delivery
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.envelope import DEFAULT_LIMITS, Envelope, KeyExtractor, Limits, canonical_json
from replaysafe.errors import BrokerError, CapabilityError, ConfigurationError
from replaysafe.failpoints import FAILPOINTS, Failpoints
from replaysafe.guarantees import Effect, Guarantee
from replaysafe.ledger.base import LedgerBackend, SyncLedger
from replaysafe.observe import otel
from replaysafe.quarantine import QuarantineReason
from replaysafe.runtime.keeper import Keeper
from replaysafe.runtime.middleware import sync_result
from replaysafe.runtime.pipeline import Pipeline
from replaysafe.runtime.policy import Ack, Leave, Nack, Quarantine, Verdict
from replaysafe.runtime.settle import Settler
from replaysafe.runtime.sync import OverTwin, SyncCoalescer, SyncKeeper, blocking_sleep, drive

__all__ = ["Guard", "Message", "Outcome", "Status"]

#: the function of the run in progress (a Guard's handler dispatches to it)
_CURRENT: contextvars.ContextVar[Callable[[Context], Awaitable[Any]]] = contextvars.ContextVar(
    "replaysafe_guard_fn"
)
_SEQ = itertools.count(1)


class Status(StrEnum):
    """What happened to one message (the ``replaysafe_deliveries_total`` outcome labels)."""

    APPLIED = o.APPLIED  #: the function ran and its effect is recorded
    DUPLICATE = o.DUPLICATE  #: done before: answered from the ledger with the stored result
    IN_FLIGHT = o.IN_FLIGHT  #: another consumer holds it now: nack, retry after ``retry_after``
    QUARANTINED = o.QUARANTINE  #: parked durably (see ``reason``): ack, never retry by hand
    RETRY = o.RETRIED  #: the function failed and may be retried: nack after ``retry_after``
    FAILED = o.FAILED  #: our own failure; the copy goes back after ``retry_after``
    LEASE_LOST = o.LEASE_LOST_OUTCOME  #: the claim was taken over meanwhile: nack
    UNAVAILABLE = o.UNAVAILABLE  #: the ledger did not answer: nack, nothing (more) was run
    UNCONFIRMED = o.UNCONFIRMED  #: at-most-once: the ack callback failed; the effect did not run


@dataclass(frozen=True, slots=True)
class Outcome:
    """One message's outcome. ``action`` is what to tell the broker: ``"ack"`` (complete:
    delete, ack, commit the offset), ``"nack"`` (redeliver after ``retry_after`` seconds where
    the broker can wait) or ``"none"`` (at-most-once: settled before the effect)."""

    status: Status
    action: str
    operation_id: str | None = None
    #: the function's result (APPLIED) or the stored one (DUPLICATE)
    result: Any = None
    retry_after: float | None = None
    #: the quarantine entry (``replaysafe quarantine show ID``) and why
    entry_id: str | None = None
    reason: QuarantineReason | None = None

    @property
    def ack(self) -> bool:
        """True when the copy must be completed at the broker."""
        return self.action == "ack"


@dataclass(frozen=True, slots=True)
class Message:
    """A message as your consumer received it, for a guard to decode: the body bytes, headers
    and content type as the client gives them; ``attempt`` (1-based) and ``redelivered`` where
    the broker tells (SQS ApproximateReceiveCount, RabbitMQ redelivered, Kafka: unknown);
    ``extend`` postpones the broker's redelivery while the function runs (SQS
    ChangeMessageVisibility), called with seconds, sync or async."""

    body: bytes
    headers: Mapping[str, str] | None = None
    content_type: str | None = None
    key: str | None = None
    broker_timestamp: float | None = None
    attempt: int = 1
    redelivered: bool = False
    delivery_id: str | None = None
    extend: Callable[[float], Any] | None = None
    #: when the broker redelivers an unsettled copy (epoch seconds), when known
    settle_deadline: float | None = None


class _Copy(Delivery):
    """The message as the pipeline sees it: settling it records what to tell the broker."""

    broker_timestamp: float | None = None
    settle_deadline: float | None = None
    attempt: int = 1
    redelivered: bool = False
    _extend: Callable[[float], Any] | None = None
    delay: float | None = None

    def __init__(
        self,
        body: bytes,
        ack_first: Callable[[], Awaitable[None]] | None = None,
        m: Message | None = None,
        *,
        content_type: str | None = None,
        key: str | None = None,
    ) -> None:
        # built per message on the hot path: a Message is read when the caller gave one, and
        # an Envelope or a payload sets only what it has
        self._ack_first = ack_first
        self.body = body
        self.received_at = time.time()
        self.action = "none"
        if m is None:  # the class defaults stand for what it does not have
            self.headers = {}
            self.content_type, self.key = content_type, key
            self.delivery_id = f"guard-{next(_SEQ)}"
            return
        self.headers = dict(m.headers or {})
        self.content_type = m.content_type
        self.key = m.key
        self.broker_timestamp = m.broker_timestamp
        self.delivery_id = m.delivery_id or f"guard-{next(_SEQ)}"
        self.attempt = max(1, m.attempt)
        self.redelivered = m.redelivered or m.attempt > 1
        self.settle_deadline = m.settle_deadline
        self._extend = m.extend

    @property
    def settled(self) -> bool:
        return self.action != "none"

    @property
    def can_extend(self) -> bool:
        return self._extend is not None

    async def ack(self) -> None:
        if not self.settled:
            self.action = "ack"

    async def nack(self, delay: float | None = None) -> None:
        if not self.settled:
            self.action, self.delay = "nack", delay

    async def ack_confirmed(self) -> None:
        """At-most-once: the caller's ``ack`` callback completes the copy before the effect."""
        if self._ack_first is None:
            raise CapabilityError("an at-most-once guard needs ack=")
        try:
            await self._ack_first()
        except BrokerError:
            raise
        except Exception as exc:
            raise BrokerError(
                f"the ack callback raised {exc!r}; the effect was not run (the message may come "
                "back, or be lost)"
            ) from exc
        self.action = "done"

    async def reject(self, reason: str) -> None:
        if not self.settled:
            self.action = "ack"

    async def extend(self, seconds: float) -> None:
        if self._extend is None:
            raise CapabilityError("this message has no extend callback (Message(extend=...))")
        out = self._extend(seconds)
        if inspect.isawaitable(out):
            await out


class Guard:
    """Effectively-once for one kind of operation inside your own consumer (module docstring).

    Built from the same validated options as ``App.handler``: ``name`` is the ledger scope (and
    the metric label); ``guarantee`` is required and ``effect`` too under effectively-once;
    ``key`` derives the operation id from a payload. ``horizon`` and ``max_clock_skew`` work as
    on :class:`~replaysafe.App`. :meth:`run_sync` uses the ledger's sync twin
    (``ledger.sync()``, opened on first use, closed by :meth:`close_sync`); the async methods use
    ``ledger`` itself.
    """

    def __init__(
        self,
        ledger: LedgerBackend,
        *,
        name: str,
        guarantee: Guarantee | str,
        effect: Effect | None = None,
        key: KeyExtractor | None = None,
        lease: float = 30.0,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        limits: Limits = DEFAULT_LIMITS,
        middleware: Sequence[Middleware] = (),
        horizon: float = 7 * DAY,
        max_clock_skew: float = 300.0,
        clock: Clock = SYSTEM_CLOCK,
        redact: Callable[[bytes], bytes] | None = None,
        owner: str | None = None,
        tracing: bool = True,
        tracer_provider: Any | None = None,
        failpoints: Failpoints = FAILPOINTS,
    ) -> None:
        if horizon <= 0:
            raise ConfigurationError("horizon must be positive seconds (ledger retention)")
        options = HandlerOptions(
            guarantee=coerce_guarantee(guarantee), effect=effect, key=key, lease=lease,
            timeout=timeout, retry=retry, concurrency=1, limits=limits, example=None,
            extend_visibility=True, middleware=tuple(middleware), ledger=ledger,
        )  # fmt: skip
        self.spec = options.spec(name, name, name, self._dispatch)
        self.ledger = ledger
        self.owner = owner or f"{os.getpid()}-{uuid.uuid4().hex[:8]}-guard"
        self.stats = o.Stats()
        self._received = o.Stats.key(o.RECEIVED, handler=name)
        #: the replay horizon (seconds): older copies cannot be proven new (``App.horizon``)
        self.horizon = horizon
        self._skew = max_clock_skew
        self._clock = clock
        self._redact = redact
        self._failpoints = failpoints
        self._tracer = tracer = otel.tracing_for(tracing, tracer_provider)
        settler = Settler(ledger=ledger, clock=clock, stats=self.stats, tracing=tracer,
                          failpoints=failpoints, redact=redact)  # fmt: skip
        settler.track(name)
        self._keeper = Keeper(ledger, clock, self.stats, self.spec.heartbeat / 2)
        self._pipeline = Pipeline(
            ledger=ledger, clock=clock, stats=self.stats, tracing=tracer, failpoints=failpoints,
            settler=settler, keeper=self._keeper, owner=self.owner, horizon=horizon,
            max_clock_skew=max_clock_skew, can_extend=_extendable,
            on_ledger_down=lambda: None,
        )  # fmt: skip
        self._pipeline.prepare([self.spec])
        self._async = _Side(self._pipeline, settler)
        self._keeping: asyncio.Task[None] | None = None
        #: the sync side (its ledger twin and keeper thread), made on the first run_sync
        self._sync: _Side | None = None
        self._lock = threading.Lock()

    @staticmethod
    async def _dispatch(ctx: Context) -> Any:
        return await _CURRENT.get()(ctx)

    @staticmethod
    async def _dispatch_sync(ctx: Context) -> Any:
        # the sync side's handler: the plain function of the run in progress, in this thread
        return sync_result(ctx.handler, _CURRENT.get()(ctx))

    def __repr__(self) -> str:
        s = self.spec
        return f"Guard({s.name!r}, {s.guarantee.value}, effect={s.effect.kind}:{s.effect.name})"

    # ------------------------------------------------------------------ async

    def _copy(
        self, message: Message | Envelope | bytes | Any, ack: Callable[[], Awaitable[None]] | None
    ) -> tuple[_Copy, Envelope | None]:
        if isinstance(message, Envelope):
            # decoded already: the headers are only read to identify a copy that cannot be
            copy = _Copy(message.payload, ack, content_type=message.content_type, key=message.key)
            return copy, message
        if isinstance(message, Message):
            return _Copy(message.body, ack, message), None
        if isinstance(message, bytes | bytearray | memoryview):
            return _Copy(bytes(message), ack), None
        if self.spec.key is None:
            raise ConfigurationError(
                f"guard {self.spec.name!r} got a {type(message).__name__} payload but has no key "
                "extractor to derive its operation id: pass Guard(key=...), or hand it an "
                "Envelope or the message bytes with an rs-operation-id header"
            )
        return _Copy(canonical_json(message), ack), None

    def _keep(self) -> None:
        if self._keeping is None or self._keeping.done():
            self._keeping = asyncio.get_running_loop().create_task(self._keeper.run())

    async def run(
        self,
        message: Message | Envelope | bytes | Any,
        fn: Callable[[Context], Awaitable[Any]],
        *,
        ack: Callable[[], Awaitable[None]] | None = None,
    ) -> Outcome:
        """Run ``fn(ctx)`` for ``message`` under the guard's guarantee and say what happened.

        ``message`` is a :class:`Message` (or the body bytes) as the broker gave it, an
        :class:`~replaysafe.Envelope`, or a payload (with ``key=``). ``ctx.idempotency_key`` is
        the operation id for a keyed effect; ``ctx.tx`` the ledger transaction for a
        transactional one. At-most-once needs ``ack``: the guard awaits it *before* ``fn`` and
        runs nothing if it raises ``BrokerError``."""
        return (await self.run_batch([message], fn, ack=ack))[0]

    async def run_batch(
        self,
        messages: Sequence[Message | Envelope | bytes | Any],
        fn: Callable[[Context], Awaitable[Any]],
        *,
        ack: Callable[[], Awaitable[None]] | None = None,
    ) -> list[Outcome]:
        """:meth:`run` for a fetched batch: the claims go out in one ledger round trip, the
        functions run concurrently, their completions in one round trip; one outcome per
        message, in order."""
        spec = self.spec
        if spec.guarantee is Guarantee.AT_MOST_ONCE and ack is None:
            raise ConfigurationError(
                "an at-most-once guard completes the message before the effect: pass ack= (an "
                "async function that completes it at the broker, confirmed)"
            )
        self._keep()
        token = _CURRENT.set(fn)
        try:
            copies = [self._copy(m, ack) for m in messages]
            return await self._batch(self._async, copies, _gather)
        finally:
            _CURRENT.reset(token)

    def _start(
        self, pipe: Pipeline, copy: _Copy, given: Envelope | None, now: float
    ) -> tuple[Envelope | None, Verdict | Awaitable[Verdict] | None]:
        """One message's start: its envelope (None for bad input) and its verdict when decided
        already, else its pipeline step, or None when it waits for its claim (effectively-once)."""
        spec = self.spec
        env = given if given is not None else pipe.decode(spec, copy)
        if isinstance(env, Quarantine):
            return None, env
        pipe.delivered(spec, copy, env, now, [])
        guarantee = spec.guarantee
        if guarantee is Guarantee.EFFECTIVELY_ONCE:
            return env, None
        if guarantee is Guarantee.AT_LEAST_ONCE:
            return env, pipe.at_least_once(spec, copy, env)
        return env, pipe.at_most_once(spec, copy, env)

    async def _lone(self, side: _Side, copy: _Copy, given: Envelope | None) -> Outcome:
        """:meth:`_batch` for one message: the same steps without a batch's lists and gather."""
        pipe = side.pipeline
        self.stats.add(self._received)
        env, step = self._start(pipe, copy, given, self._clock.now())
        if step is None:
            assert env is not None
            (claimed,) = await pipe.claim(self.spec, [(copy, env)])
            step = pipe.after_claim(self.spec, copy, env, claimed)
        return await self._decided(side, step, copy, env)

    async def _batch(
        self,
        side: _Side,
        copies: list[tuple[_Copy, Envelope | None]],
        gather: Callable[[list[Coroutine[Any, Any, Outcome]]], Awaitable[list[Outcome]]],
    ) -> list[Outcome]:
        """One batch through ``side``'s pipeline (async, or sync in the caller's thread): decode,
        one claim, each message's pipeline and settle (``gather`` runs them together)."""
        if len(copies) == 1:
            return [await self._lone(side, *copies[0])]
        spec, pipe = self.spec, side.pipeline
        self.stats.add(self._received, len(copies))
        # per message: its verdict when decided already (bad input), else its pipeline step
        steps: list[Verdict | Awaitable[Verdict]] = []
        envs: list[Envelope | None] = []
        claim: list[tuple[int, _Copy, Envelope]] = []
        now = self._clock.now()
        for copy, given in copies:
            env, step = self._start(pipe, copy, given, now)
            envs.append(env)
            if step is None:
                assert env is not None
                claim.append((len(steps), copy, env))
                step = _UNCLAIMED  # replaced below
            steps.append(step)
        if claim:
            outcomes = await pipe.claim(spec, [(c, e) for _, c, e in claim])
            for (i, copy, env), outcome in zip(claim, outcomes, strict=True):
                steps[i] = pipe.after_claim(spec, copy, env, outcome)
        return await gather([
            self._decided(side, step, copy, env)
            for step, (copy, _), env in zip(steps, copies, envs, strict=True)
        ])  # fmt: skip

    async def _decided(
        self,
        side: _Side,
        step: Verdict | Awaitable[Verdict],
        copy: _Copy,
        env: Envelope | None,
    ) -> Outcome:
        verdict = step if isinstance(step, _VERDICTS) else await step
        done = await side.settler.settle(self.spec, copy, env, verdict)
        op = env.operation_id if env is not None else None
        result = verdict.result if isinstance(verdict, Ack | Leave) else None
        reason = verdict.reason if isinstance(verdict, Quarantine) else None
        action = copy.action if copy.action in ("ack", "nack") else "none"
        return Outcome(_STATUS[done.outcome], action, op, result, copy.delay, done.entry_id,
                       reason)  # fmt: skip

    async def close(self) -> None:
        """Stop the guard's keeper task (async side). The ledger is yours: close it yourself;
        :meth:`close_sync` closes the sync side."""
        if self._keeping is not None:
            self._keeping.cancel()
            await asyncio.gather(self._keeping, return_exceptions=True)
            self._keeping = None
        self._pipeline.close()

    async def __aenter__(self) -> Guard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ sync

    def _sync_side(self) -> _Side:
        with self._lock:
            if self._sync is None:
                twin = self.ledger.sync()
                facade = OverTwin(twin)
                settler = Settler(ledger=facade, clock=self._clock, stats=self.stats,
                                  tracing=self._tracer, failpoints=self._failpoints,
                                  redact=self._redact, inline=True)  # fmt: skip
                keeper = SyncKeeper(twin, self._clock, self.stats, self.spec.heartbeat / 2)
                pipeline = Pipeline(
                    ledger=facade, clock=self._clock, stats=self.stats, tracing=self._tracer,
                    failpoints=self._failpoints, settler=settler, keeper=keeper,
                    owner=self.owner, horizon=self.horizon, max_clock_skew=self._skew,
                    can_extend=_extendable, on_ledger_down=lambda: None, sleep=blocking_sleep,
                    coalescer=SyncCoalescer,
                )  # fmt: skip
                pipeline.prepare([replace(self.spec, fn=self._dispatch_sync)])
                keeper.start()
                coalescers = [pipeline.completer, pipeline.starter]
                self._sync = _Side(pipeline, settler, twin, keeper,
                                   lambda coros: _done(drive(coros, coalescers)))  # fmt: skip
            return self._sync

    def run_sync(
        self,
        message: Message | Envelope | bytes | Any,
        fn: Callable[[Context], Any],
        *,
        ack: Callable[[], Any] | None = None,
    ) -> Outcome:
        """:meth:`run` for a plain function, from any thread: the whole pipeline runs in the
        calling thread with the ledger's sync twin (``Ledger.sync()``: the sync driver, no event
        loop), ``fn(ctx)`` included, so its thread-bound resources (a Django or SQLAlchemy
        session) work as usual; one keeper thread per guard extends the lease meanwhile. A cut
        (deadline, lost lease) cannot stop ``fn``: once it returns, the run is decided as cut
        (an unknown outcome for an unkeyed effect). Middleware of a sync guard must not await
        asyncio I/O (``ConfigurationError``)."""
        return self.run_batch_sync([message], fn, ack=ack)[0]

    def run_batch_sync(
        self,
        messages: Sequence[Message | Envelope | bytes | Any],
        fn: Callable[[Context], Any],
        *,
        ack: Callable[[], Any] | None = None,
    ) -> list[Outcome]:
        """:meth:`run_batch` for a plain function: one claim and one completion round trip for
        the batch; ``fn`` runs in the calling thread for each acquired message, one at a time."""
        side = self._sync or self._sync_side()
        spec = self.spec
        if spec.guarantee is Guarantee.AT_MOST_ONCE and ack is None:
            raise ConfigurationError(
                "an at-most-once guard completes the message before the effect: pass ack= (a "
                "function that completes it at the broker, confirmed)"
            )

        first: Callable[[], Awaitable[None]] | None = None
        if ack is not None:

            async def first() -> None:
                assert ack is not None
                sync_result(spec.name, ack())

        token = _CURRENT.set(fn)
        try:
            copies = [self._copy(m, first) for m in messages]
            assert side.gather is not None
            outcomes: list[Outcome] = at_once(self._batch(side, copies, side.gather))
            return outcomes
        finally:
            _CURRENT.reset(token)

    def once(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorate a function that receives the payload (``fn(payload)``, or
        ``fn(payload, ctx)`` when it takes a ``ctx`` parameter): calling the decorated function
        with a message runs it under the guard and returns the :class:`Outcome`. An ``async
        def`` becomes an async function (:meth:`run`), a plain one a sync one (:meth:`run_sync`).
        """
        takes_ctx = "ctx" in inspect.signature(fn).parameters

        def call(ctx: Context) -> Any:
            return fn(ctx.payload, ctx=ctx) if takes_ctx else fn(ctx.payload)

        if inspect.iscoroutinefunction(fn):

            @wraps(fn)
            async def run_async(message: Any) -> Outcome:
                return await self.run(message, call)

            return run_async

        @wraps(fn)
        def run_sync(message: Any) -> Outcome:
            return self.run_sync(message, call)

        return run_sync

    def close_sync(self) -> None:
        """Close the sync side: stop its keeper thread and close the ledger twin it opened. The
        async ledger is yours (close it with ``await ledger.close()`` where you used it)."""
        side, self._sync = self._sync, None
        if side is not None and side.keeper is not None and side.twin is not None:
            side.keeper.stop()
            side.twin.close()
        self._pipeline.close()


@dataclass(slots=True)
class _Side:
    """One way of running the pipeline: async (the event loop) or sync (the caller's thread)."""

    pipeline: Pipeline
    settler: Settler
    twin: SyncLedger | None = None
    keeper: SyncKeeper | None = None
    #: the sync side runs a batch's pipelines with ``runtime.sync.drive``
    gather: Callable[[list[Coroutine[Any, Any, Outcome]]], Awaitable[list[Outcome]]] | None = None


async def _gather(coros: list[Coroutine[Any, Any, Outcome]]) -> list[Outcome]:
    if len(coros) == 1:
        return [await coros[0]]
    return list(await asyncio.gather(*coros))


async def _done(value: list[Outcome]) -> list[Outcome]:
    return value


def _extendable(spec: HandlerSpec, delivery: Delivery) -> bool:
    """A message's visibility is extended when the caller gave an ``extend`` callback."""
    return isinstance(delivery, _Copy) and delivery.can_extend


#: a claimed copy's place in a batch until its claim's outcome is known
_UNCLAIMED = Leave(o.FAILED)
_VERDICTS = (Ack, Nack, Quarantine, Leave)
_STATUS = {s.value: s for s in Status}
