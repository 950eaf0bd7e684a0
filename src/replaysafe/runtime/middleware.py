"""Middleware: plain wrappers around a handler, applied inside the fixed frame.

``Middleware = Callable[[HandlerFn], HandlerFn]``: it gets the handler (or the next middleware)
and returns a function with the same signature. The runtime applies it *after* the claim and
*before* the completion, so a middleware can log, trace, time or enrich a run, but it can neither
skip the claim nor complete early: it only ever sees the call to the handler. What it raises is
the handler's failure (retried or quarantined by the handler's policy); what it returns is the
handler's result.

The runtime's own wrappers are middleware too: :func:`timed` (the
``replaysafe_handler_seconds`` histogram) and :func:`traced` (the OpenTelemetry effect span).
The first middleware in a list is the outermost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
from collections.abc import Callable, Sequence
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from replaysafe import observe as o
from replaysafe.errors import OutcomeUnknown
from replaysafe.observe import otel

if TYPE_CHECKING:
    from replaysafe.app import Context, HandlerFn, HandlerSpec
    from replaysafe.clock import Clock

log = logging.getLogger("replaysafe.runtime")

Middleware = Callable[["HandlerFn"], "HandlerFn"]


def handler_call(
    spec: HandlerSpec,
    stats: o.Stats,
    clock: Clock,
    tracing: otel.Tracing,
    pool: concurrent.futures.Executor | None,
) -> HandlerFn:
    """The handler as a driver runs it: on ``pool`` when it is a plain ``def``, inside the
    handler's middleware, inside the runtime's timing and (when on) tracing, outermost."""
    if spec.sync:
        assert pool is not None, "a sync handler runs on the driver's thread pool"
        inner = threaded(spec.fn, pool)
    elif inspect.iscoroutinefunction(spec.fn):
        inner = spec.fn  # an ``async def`` always returns a coroutine: nothing to check
    else:
        inner = awaited(spec.name)(spec.fn)
    outer = [timed(stats, clock, spec.name)]
    if tracing.enabled:
        outer.append(traced(tracing, spec.name))
    return chain(inner, [*outer, *spec.middleware])


def chain(fn: HandlerFn, middleware: Sequence[Middleware]) -> HandlerFn:
    """``fn`` wrapped by ``middleware``, the first one outermost. Built once per handler per
    driver, never per message."""
    for mw in reversed(middleware):
        fn = mw(fn)
    return fn


class NotAwaitable(OutcomeUnknown):
    """The handler returned something that cannot be awaited: it ran as a plain function, so its
    body (and its effect) already ran. An unknown outcome: a handler declared ``async`` (or
    registered as one) returned a non-awaitable at run time."""


class ReturnedAwaitable(OutcomeUnknown):
    """A plain ``def`` handler returned an awaitable: what it did before returning ran, the
    awaitable did not (it is closed, never awaited). An unknown outcome, retried or quarantined
    by the handler's policy like any failure."""


def awaited(name: str) -> Middleware:
    """The innermost wrapper: awaits what the handler returned, and turns a non-awaitable into
    :class:`NotAwaitable` (not the ``TypeError`` of the ``await``, which would read as a clean
    failure although the body ran)."""

    def wrap(fn: HandlerFn) -> HandlerFn:
        async def call(ctx: Context) -> Any:
            out: Any = fn(ctx)
            if type(out) is CoroutineType or inspect.isawaitable(out):
                return await out
            raise NotAwaitable(
                f"handler {name!r} returned {type(out).__name__}, not an awaitable: its body ran "
                "as a plain function (its effect may be done); write it as `async def`"
            )

        return call

    return wrap


def threaded(fn: Callable[[Context], Any], pool: concurrent.futures.Executor) -> HandlerFn:
    """A plain ``def`` handler as an async one: it runs on ``pool``. A cut (deadline, lost
    lease) cancels the wait, not the thread: the function runs on until it returns, its result
    is discarded, and the verdict is the cut's (an unknown outcome for an unkeyed effect)."""

    def run(ctx: Context) -> Any:
        return sync_result(ctx.handler, fn(ctx))

    async def call(ctx: Context) -> Any:
        return await asyncio.wrap_future(pool.submit(run, ctx))

    return call


_PLAIN = frozenset({type(None), str, int, float, bool, bytes, dict, list, tuple})


def sync_result(name: str, out: Any) -> Any:
    """What a plain function returned, refused when it is an awaitable (:class:`ReturnedAwaitable`:
    closed, never awaited)."""
    if type(out) in _PLAIN:  # the common results, which cannot be awaitables
        return out
    if inspect.isawaitable(out):
        if inspect.iscoroutine(out):
            out.close()  # never awaited: its body did not run
        raise ReturnedAwaitable(
            f"{name!r}: a plain function returned {type(out).__name__}: whatever it did before "
            "returning ran, the awaitable did not. Register the `async def` itself (or a wrapper "
            "that is one)"
        )
    return out


def timed(stats: o.Stats, clock: Clock, handler: str) -> Middleware:
    """Records ``replaysafe_handler_seconds`` for every run, however it ends. A failing metrics
    hook is logged and never decides the outcome."""

    key = o.Stats.key(o.HANDLER_SECONDS, handler=handler)

    def wrap(fn: HandlerFn) -> HandlerFn:
        async def call(ctx: Context) -> Any:
            started = clock.now()
            try:
                return await fn(ctx)
            finally:
                try:
                    stats.record(key, clock.now() - started)
                except Exception:  # a metrics hook must not decide the outcome
                    log.exception("%s: recording the handler's duration failed", handler)

        return call

    return wrap


def traced(tracing: otel.Tracing, handler: str) -> Middleware:
    """The OpenTelemetry effect span around the handler. A tracing hook that fails after the
    handler returned is logged: the effect is done, and bookkeeping must not turn it into a
    failed attempt (a retry would run the effect again)."""

    def wrap(fn: HandlerFn) -> HandlerFn:
        async def call(ctx: Context) -> Any:
            result: Any = None
            returned = False
            try:
                with tracing.span(otel.EFFECT, handler=handler, operation_id=ctx.operation_id,
                                  attempt=ctx.attempt, token=ctx.token):  # fmt: skip
                    result = await fn(ctx)
                    returned = True
                return result
            except Exception:
                if not returned:
                    raise
                log.exception("%s: tracing failed after the handler returned; the result stands",
                              handler)  # fmt: skip
                return result

        return call

    return wrap
