"""The App: handlers and their configuration, the model that the runtime, ``explain`` and
``inspect`` read.

A handler declares its source, its guarantee (required, no default), its effect, how to derive the
operation id, its lease and its retry budget. Configuration errors are raised at registration or at
start-up, never on the first message.
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from replaysafe.brokers.base import Broker
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.envelope import DEFAULT_LIMITS, Envelope, KeyExtractor, Limits
from replaysafe.errors import ConfigurationError
from replaysafe.failpoints import FAILPOINTS, Failpoints
from replaysafe.guarantees import Effect, Guarantee
from replaysafe.ledger.base import MAX_HANDLER_NAME, LedgerBackend, check_handler_name

if TYPE_CHECKING:
    from replaysafe.brokers.base import Delivery

log = logging.getLogger("replaysafe.app")

DAY = 86_400.0
#: the default handler deadline, in leases. The keeper extends the lease every third of it while
#: the handler runs, so the lease carries a healthy slow handler for as long as it runs; the
#: deadline only has to cut a hung one. Ten leases: the lease is the author's own measure of how
#: long one run may take (RS109 wants it above the p99), so a run ten times longer is hung, and
#: the bound scales with it (lease=3: 30 s; the default lease=30: 5 min). What a hung handler
#: costs until then: one concurrency slot and its operation held in flight.
DEADLINE_LEASES = 10


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failing handler is retried before its message is quarantined.

    ``max_attempts`` counts every execution, including the first; under effectively-once the count
    lives in the ledger and grows *before* each run, so a message that kills its worker every
    time still ends in quarantine. Delays grow exponentially with full jitter, capped at
    ``max_delay``.
    """

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 60.0
    multiplier: float = 2.0
    #: give up (quarantine) once this many seconds passed since the operation's first publish,
    #: whatever the attempt count; None: attempts only
    max_elapsed: float | None = None
    #: exception types that are retried; anything else is quarantined at once
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    #: exception types never retried even if they match ``retry_on``
    give_up_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError("RetryPolicy.max_attempts must be at least 1")
        if self.max_elapsed is not None and self.max_elapsed <= 0:
            raise ConfigurationError("RetryPolicy.max_elapsed must be positive seconds or None")
        if self.base_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ConfigurationError(
                "RetryPolicy needs base_delay >= 0, max_delay >= 0 and multiplier >= 1"
            )

    def retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, self.retry_on) and not isinstance(exc, self.give_up_on)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Backoff before attempt ``attempt + 1`` (full jitter: uniform in [0, cap])."""
        cap = min(self.max_delay, self.base_delay * self.multiplier ** max(0, attempt - 1))
        return (rng or random).uniform(0.0, cap)


@dataclass(slots=True)
class Context:
    """What a handler receives for one operation."""

    envelope: Envelope
    delivery: Delivery
    handler: str
    #: execution number: ledger attempts under effectively-once, broker delivery count otherwise
    attempt: int
    #: the key to pass to a keyed downstream (the operation id); None for other effects
    idempotency_key: str | None = None
    #: fencing token of the ledger claim (effectively-once); pass it to stores that can fence
    token: int | None = None
    #: the ledger transaction (transactional effects only): write business rows through it. A
    #: :class:`~replaysafe.ledger.base.Transaction` (``await ctx.tx.execute(...)``) for an async
    #: handler; on a sync Guard the ledger twin's transaction (``ctx.tx.execute(...)``, sync)
    tx: Any = None

    @property
    def operation_id(self) -> str:
        return self.envelope.operation_id

    @property
    def payload(self) -> Any:
        return self.envelope.value


HandlerFn = Callable[[Context], Awaitable[Any]]
#: wraps a handler inside the fixed frame (after the claim, before the completion): see
#: ``replaysafe.runtime.middleware``
Middleware = Callable[[HandlerFn], HandlerFn]


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    name: str
    source: str
    group: str
    fn: HandlerFn
    guarantee: Guarantee
    effect: Effect
    key: KeyExtractor | None
    lease: float
    timeout: float
    retry: RetryPolicy
    concurrency: int
    limits: Limits
    #: how often the lease (and broker visibility, where it has one) is extended while running
    heartbeat: float = field(default=0.0)
    #: a sample payload; ``explain`` runs the key extractor on it to check it is deterministic
    example: Any = None
    #: extend the broker's visibility while the handler runs (where the broker has a timer)
    extend_visibility: bool = True
    #: a plain ``def`` handler: it runs on a thread (a cut cannot stop it, only stop waiting)
    sync: bool = False
    #: user middleware, the first outermost, applied inside the fixed frame
    middleware: tuple[Middleware, ...] = ()

    @property
    def scope(self) -> str:
        """The ledger scope of this handler's operations."""
        return self.name

    def short_deadline(self) -> str | None:
        """What to say about a deadline shorter than the lease, or None when it is not.

        Such a deadline ends before the first lease would: the lease's extension never gets to
        carry a slow handler, and one slower than ``timeout`` is cut though its lease is alive.
        The warning names what a cut does to this handler's guarantee and effect (``App.handler``
        logs it at registration; ``explain`` reports it as RS120)."""
        if self.timeout >= self.lease:
            return None
        g, eff = self.guarantee, self.effect
        if g is Guarantee.AT_MOST_ONCE:
            then = "it is cancelled after the broker completed it: the operation is lost"
        elif g is Guarantee.AT_LEAST_ONCE:
            then = "it is cancelled and retried: a second effect if the first one happened"
        elif eff.kind == "transactional":
            then = "it is cancelled, its transaction rolled back and the operation retried"
        elif eff.kind == "keyed":
            then = (f"it is cancelled and retried under its key at {eff.name}; every cut spends "
                    "an attempt of the retry budget")  # fmt: skip
        elif eff.on_unknown == "retry":
            then = f"it is cancelled and re-run: a second effect at {eff.name} if one happened"
        else:
            then = ("it is cancelled mid-effect and quarantined as outcome_unknown, on the "
                    "first attempt too, never re-run")  # fmt: skip
        return (
            f"handler {self.name!r}: its deadline ({self.timeout:g}s) is shorter than its lease "
            f"({self.lease:g}s), so lease extension never carries it: a run slower than "
            f"{self.timeout:g}s is cut though its lease is alive, and then {then}. Leave "
            f"timeout= unset (default {DEADLINE_LEASES} leases: "
            f"{DEADLINE_LEASES * self.lease:g}s) or set it above the slowest healthy run"
        )


def _is_async_callable(fn: object) -> bool:
    """True when calling ``fn(ctx)`` returns an awaitable by construction: an ``async def``
    function or method, a ``functools.partial`` of one, a decorator's wrapper whose
    ``__wrapped__`` chain ends at one (``functools.wraps`` copies ``__wrapped__``, not the
    coroutine flag), or an object whose class defines ``async def __call__``. A plain ``def``, a
    lambda, a sync ``__call__`` or a class are not."""
    for _ in range(100):  # a __wrapped__ chain is short; a cycle must not hang registration
        if inspect.iscoroutinefunction(fn):
            return True
        if isinstance(fn, functools.partial):
            fn = fn.func
            continue
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None:
            fn = wrapped
            continue
        if isinstance(fn, type) or inspect.isfunction(fn) or inspect.ismethod(fn):
            return False
        # the class's __call__ (an instance attribute is not what calling the object runs)
        return inspect.iscoroutinefunction(getattr(type(fn), "__call__", None))  # noqa: B004
    return False


def coerce_guarantee(value: object) -> Guarantee:
    if isinstance(value, Guarantee):
        return value
    try:
        return Guarantee(str(value))
    except ValueError:
        raise ConfigurationError(
            f"guarantee must be one of {', '.join(g.value for g in Guarantee)}, not {value!r}"
        ) from None


class App:
    """A set of handlers bound to one broker and one ledger.

    ``horizon`` is the replay horizon: how long the ledger remembers completed operations
    (``purge`` retention). Under effectively-once a delivery published earlier than
    ``now - horizon`` cannot be proven new and is quarantined as ``beyond_horizon``; one
    published more than ``max_clock_skew`` seconds in the future is quarantined as
    ``future_timestamp``.
    """

    def __init__(
        self,
        name: str,
        *,
        broker: Broker,
        ledger: LedgerBackend,
        clock: Clock = SYSTEM_CLOCK,
        horizon: float = 7 * DAY,
        max_clock_skew: float = 300.0,
        failpoints: Failpoints = FAILPOINTS,
        redact: Callable[[bytes], bytes] | None = None,
        tracing: bool = True,
        tracer_provider: Any | None = None,
    ) -> None:
        if horizon <= 0:
            raise ConfigurationError("horizon must be positive seconds (ledger retention)")
        if max_clock_skew < 0:
            raise ConfigurationError("max_clock_skew must be >= 0 seconds")
        self.name = name
        self.broker = broker
        self.ledger = ledger
        self.clock = clock
        self.horizon = horizon
        #: a publish time further than this in the future is refused: a producer clock that far
        #: ahead would let an old operation look new to the horizon check
        self.max_clock_skew = max_clock_skew
        #: applied to a message body before its copy is stored in quarantine (strip card numbers,
        #: personal data), and to the detail and operation id a quarantine stores or logs; a
        #: redacted copy can be inspected but not redriven (see quarantine.disclose)
        self.redact = redact
        #: OpenTelemetry spans per boundary when opentelemetry-api is installed (extra ``otel``)
        #: and a tracer provider is configured (``tracer_provider`` or the global one)
        self.tracing = tracing
        self.tracer_provider = tracer_provider
        self.failpoints = failpoints
        self.handlers: dict[str, HandlerSpec] = {}
        #: awaited by ``replaysafe run`` before the workers start / after they stop
        self.startup_hooks: list[Callable[[], Awaitable[None]]] = []
        self.shutdown_hooks: list[Callable[[], Awaitable[None]]] = []

    def on_startup(self, fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Register ``async fn()`` to run before ``replaysafe run`` starts consuming."""
        self.startup_hooks.append(fn)
        return fn

    def on_shutdown(self, fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Register ``async fn()`` to run after ``replaysafe run`` has drained."""
        self.shutdown_hooks.append(fn)
        return fn

    def handler(
        self,
        source: str,
        *,
        guarantee: Guarantee | str,
        effect: Effect | None = None,
        key: KeyExtractor | None = None,
        name: str | None = None,
        group: str | None = None,
        lease: float = 30.0,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        concurrency: int = 8,
        limits: Limits = DEFAULT_LIMITS,
        example: Any = None,
        extend_visibility: bool = True,
        middleware: Sequence[Middleware] = (),
    ) -> Callable[[Any], Any]:
        """Register ``fn(ctx)`` for messages on ``source``.

        ``guarantee`` is required. ``effect`` is required for effectively-once (it decides where
        replay stops hurting). ``key`` derives the operation id from the payload (return a string,
        or a tuple for ``operation_id(*t)``); it gets the decoded body (JSON value, ``str`` for
        text/plain, ``bytes`` otherwise) and decides: an ``rs-operation-id`` header naming another
        id is quarantined as ``operation_id_mismatch`` (docs/wire-format.md).
        ``timeout`` is the handler's deadline: a run still going after it is cut (cancelled).
        It defaults to :data:`DEADLINE_LEASES` leases (10: 300 s with the default lease), since
        the lease is extended every ``lease / 3`` while the handler runs and only a hung handler
        needs cutting; a deadline set shorter than the lease is logged as a warning (see
        :meth:`HandlerSpec.short_deadline`). ``example`` is a sample payload that
        ``explain`` feeds to ``key`` to check that it is deterministic. ``extend_visibility=False``
        leaves the broker's visibility timer alone (the message is redelivered while a slow
        handler runs; only the ledger lease stops a second run under effectively-once).
        ``middleware`` wraps the handler inside the fixed frame (``runtime.middleware``).

        ``fn`` is an ``async def`` function (awaited on the event loop) or a plain ``def`` one,
        which runs on a thread of the worker's pool while the lease is extended: a cut (deadline,
        lost lease) stops waiting for it, not the thread, and decides as for an async handler (an
        unkeyed effect's cut is quarantined ``outcome_unknown``). A transactional effect needs
        ``async def`` (``ctx.tx`` is async).
        """
        options = HandlerOptions(
            guarantee=coerce_guarantee(guarantee), effect=effect, key=key, lease=lease,
            timeout=timeout, retry=retry, concurrency=concurrency, limits=limits,
            example=example, extend_visibility=extend_visibility,
            middleware=tuple(middleware), ledger=self.ledger,
        )  # fmt: skip

        def register(fn: Any) -> Any:
            hname: str = name or str(getattr(fn, "__name__", source))
            if hname in self.handlers:
                raise ConfigurationError(f"handler {hname!r} is registered twice; name one")
            spec = options.spec(hname, source, group or f"{self.name}.{hname}", fn)
            self.handlers[hname] = spec
            short = spec.short_deadline()
            if short is not None:
                log.warning("%s", short)
            return fn

        return register

    def __repr__(self) -> str:
        return f"App({self.name!r}, handlers={sorted(self.handlers)})"


@dataclass(frozen=True, slots=True)
class HandlerOptions:
    """A handler's options, validated once (``App.handler``, ``Guard``): everything but the
    function and the names, which :meth:`spec` adds."""

    guarantee: Guarantee
    effect: Effect | None
    key: KeyExtractor | None
    lease: float
    timeout: float | None
    retry: RetryPolicy | None
    concurrency: int
    limits: Limits
    example: Any
    extend_visibility: bool
    middleware: tuple[Middleware, ...]
    ledger: LedgerBackend

    def __post_init__(self) -> None:
        g, effect, lease = self.guarantee, self.effect, self.lease
        if not lease > 0:
            raise ConfigurationError("lease must be positive seconds")
        if self.concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        if g is Guarantee.EFFECTIVELY_ONCE and effect is None:
            raise ConfigurationError(
                "an effectively-once handler must declare its effect: Effect.transactional(), "
                "Effect.keyed('downstream') or Effect.unkeyed('downstream'); it decides where "
                "replay stops hurting"
            )
        if effect is not None and effect.kind == "transactional":
            if g is not Guarantee.EFFECTIVELY_ONCE:
                raise ConfigurationError(
                    "a transactional effect commits with the ledger row: declare "
                    "guarantee=EFFECTIVELY_ONCE"
                )
            if not self.ledger.transactional:
                raise ConfigurationError(
                    f"{type(self.ledger).__name__} is not transactional; a transactional effect "
                    "needs a ledger in the same database (SQLiteLedger, PostgresLedger)"
                )
        to = self.deadline
        if not to > 0:
            raise ConfigurationError(
                f"timeout must be positive seconds (the handler's deadline), not {to!r}; leave it "
                f"unset for the default of {DEADLINE_LEASES} leases ({DEADLINE_LEASES * lease:g}s)"
            )

    @property
    def deadline(self) -> float:
        return self.timeout if self.timeout is not None else self.lease * DEADLINE_LEASES

    def spec(self, name: str, source: str, group: str, fn: Any) -> HandlerSpec:
        """The handler ``name`` running ``fn`` with these options; raises ``ConfigurationError``
        for a name that cannot be a ledger scope or a function that cannot run."""
        try:
            # the name is the ledger scope, the group suffix, a metric label and a log word
            check_handler_name(name)
        except ConfigurationError:
            raise ConfigurationError(
                f"handler name {name[:80]!r} cannot be registered: a handler name is 1-"
                f"{MAX_HANDLER_NAME} UTF-8 bytes without control characters (newlines "
                "included); pass name='...'"
            ) from None
        sync = check_function(name, fn, self.effect)
        return HandlerSpec(
            name=name,
            source=source,
            group=group,
            fn=fn,
            guarantee=self.guarantee,
            effect=self.effect or Effect.unkeyed(source),
            key=self.key,
            lease=self.lease,
            timeout=self.deadline,
            retry=self.retry or RetryPolicy(),
            concurrency=self.concurrency,
            limits=self.limits,
            heartbeat=self.lease / 3,
            example=self.example,
            extend_visibility=self.extend_visibility,
            sync=sync,
            middleware=self.middleware,
        )


def check_function(name: str, fn: Any, effect: Effect | None) -> bool:
    """Whether ``fn`` is a plain (sync) function; raises ``ConfigurationError`` for something
    that cannot be called, or a sync function whose effect needs the async ``ctx.tx``."""
    if not callable(fn):
        raise ConfigurationError(f"handler {name!r}: {fn!r} is not callable")
    if _is_async_callable(fn):
        return False
    if isinstance(fn, type):
        raise ConfigurationError(
            f"handler {name!r} is a class ({fn!r}); register a function or an instance"
        )
    if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        raise ConfigurationError(
            f"handler {name!r} ({fn!r}) is a generator function: calling it runs nothing. Write "
            f"it as `async def {name}(ctx): ...` or `def {name}(ctx): ...` returning its result"
        )
    if effect is not None and effect.kind == "transactional":
        raise ConfigurationError(
            f"handler {name!r} is a plain function, but a transactional effect writes through "
            "ctx.tx, which is async: write it as `async def`"
        )
    return True
