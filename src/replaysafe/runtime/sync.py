"""The sync path's I/O edges: the same pipeline (``runtime.pipeline``), driven without an event
loop in the caller's thread.

The pipeline's code is async; on the sync path every edge it awaits does its work synchronously,
so each ``await`` completes at once and the caller's thread runs the whole pipeline
(``replaysafe._coro.at_once``, :func:`drive`):

- :class:`OverTwin`: the ledger calls, on a :class:`~replaysafe.ledger.base.SyncLedger` twin
  (the sync driver, measured faster than any hop to an event loop: docs/guard.md);
- :class:`SyncCoalescer`: a batch's completions (and "effect starts" marks) parked until every
  message of the batch reached them, then sent in one ledger call (:func:`drive` flushes);
- :class:`SyncKeeper`: a thread that extends the leases (and visibility) of the functions running
  in callers' threads and marks a cut at the deadline. A thread cannot be cancelled: a cut run is
  decided as cut when the function returns.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from replaysafe import observe as o
from replaysafe._coro import at_once
from replaysafe.errors import LeaseLost
from replaysafe.runtime.keeper import Execution
from replaysafe.runtime.policy import Cut

if TYPE_CHECKING:
    from replaysafe.app import Context, HandlerFn, HandlerSpec
    from replaysafe.clock import Clock
    from replaysafe.ledger.base import (
        Claim,
        ClaimOutcome,
        ClaimRequest,
        OpKey,
        QuarantineEntry,
        QuarantineRequest,
        Record,
        SyncLedger,
    )

T = TypeVar("T")
R = TypeVar("R")


class OverTwin:
    """The async ledger calls the pipeline and settle make, answered by a sync twin at once."""

    def __init__(self, twin: SyncLedger) -> None:
        self.twin = twin
        #: the twin can run a transactional effect (``transaction`` / ``complete_in``)
        self.transactional: bool = getattr(twin, "transactional", False)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """The twin's transaction (sync: a plain function writes through ``ctx.tx.execute``)."""
        with self.twin.transaction() as tx:  # type: ignore[attr-defined]
            yield tx

    async def complete_in(self, tx: Any, claim: Claim, result: str | None = None) -> None:
        self.twin.complete_in(tx, claim, result)  # type: ignore[attr-defined]

    async def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        return self.twin.claim(key, fingerprint, owner, lease)

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        return self.twin.claim_many(requests)

    async def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        return self.twin.mark_started(claims)

    async def extend(self, claim: Claim, lease: float) -> Claim:
        return self.twin.extend(claim, lease)

    async def complete(self, claim: Claim, result: str | None = None) -> Record:
        return self.twin.complete(claim, result)

    async def complete_many(
        self, items: Sequence[tuple[Claim, str | None]]
    ) -> list[Record | LeaseLost]:
        return self.twin.complete_many(items)

    async def release(self, claim: Claim, error: str | None = None) -> None:
        self.twin.release(claim, error)

    async def quarantine(
        self, request: QuarantineRequest, claim: Claim | None = None
    ) -> QuarantineEntry:
        return self.twin.quarantine(request, claim)

    async def get(self, key: OpKey) -> Record | None:
        return self.twin.get(key)

    def now(self) -> float:
        return self.twin.now()


async def blocking_sleep(seconds: float) -> None:
    """``clock.sleep`` for the sync path: the caller's thread waits (no event loop runs here)."""
    time.sleep(seconds)  # noqa: ASYNC251


class _Parked:
    """An item waiting in a :class:`SyncCoalescer` until :func:`drive` flushes it."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None

    def __await__(self) -> Generator[Any, None, Any]:
        if not self.done:
            yield self
        if self.error is not None:
            raise self.error
        return self.value


class _Batch(threading.local):
    """A thread's held items: None while no batch of several is being driven."""

    queue: list[Any] | None = None


class SyncCoalescer(Generic[T, R]):
    """``runtime.batch.Coalescer`` for the sync path: what a batch's messages submit in one
    thread is held (the submitting coroutine parks) until :func:`drive` flushes it, in one call of
    ``many``. Per thread: callers in other threads have their own batches. Outside a batch of
    several (one message: nothing to wait for), an item goes straight to ``many``."""

    def __init__(
        self, many: Callable[[Sequence[T]], Awaitable[Sequence[R]]], *, drop_cancelled: bool = False
    ) -> None:
        # drop_cancelled: nothing is cancelled on the sync path (a thread cannot be)
        self._many = many
        self._local = _Batch()

    def collect(self, on: bool) -> None:
        """Start (``on``) or end holding this thread's items for :meth:`flush`."""
        self._local.queue = [] if on else None

    async def submit(self, item: T) -> R:
        batch: list[tuple[T, _Parked]] | None = self._local.queue
        if batch is None:
            return (await self._many([item]))[0]
        parked = _Parked()
        batch.append((item, parked))
        return await parked  # type: ignore[no-any-return]

    def flush(self) -> bool:
        """Send what this thread parked in one ``many`` call; False when nothing was parked."""
        batch: list[tuple[T, _Parked]] | None = self._local.queue
        if not batch:
            return False
        self._local.queue = []
        try:
            results: Sequence[R] = at_once(self._many([item for item, _ in batch]))  # type: ignore[arg-type]
        except Exception as exc:
            for _, parked in batch:
                parked.error, parked.done = exc, True
            return True
        for (_, parked), res in zip(batch, results, strict=True):
            parked.value, parked.done = res, True
        return True


def drive(
    coros: Sequence[Coroutine[Any, Any, T]], coalescers: Sequence[SyncCoalescer[Any, Any]]
) -> list[T]:
    """Run ``coros`` (one per message of a batch) to their ends in this thread: each runs until
    it finishes or parks in a coalescer; then the coalescers flush (one ledger call each for the
    whole batch) and the parked ones go on. Raises what a coroutine raises (after the others of
    its round ran). One coroutine runs straight through (its coalesced calls go out at once)."""
    if len(coros) == 1:
        return [at_once(coros[0])]
    for c in coalescers:
        c.collect(True)
    try:
        return _rounds(coros, coalescers)
    finally:
        for c in coalescers:
            c.collect(False)


def _rounds(
    coros: Sequence[Coroutine[Any, Any, T]], coalescers: Sequence[SyncCoalescer[Any, Any]]
) -> list[T]:
    results: list[Any] = [None] * len(coros)
    pending = list(enumerate(coros))
    while pending:
        parked: list[tuple[int, Coroutine[Any, Any, T]]] = []
        failure: BaseException | None = None
        for i, coro in pending:
            try:
                step = coro.send(None)
            except StopIteration as done:
                results[i] = done.value
                continue
            except BaseException as exc:
                failure = failure or exc
                continue
            if not isinstance(step, _Parked):
                coro.close()
                at_once(coro)  # raises the ConfigurationError that explains the suspension
            parked.append((i, coro))
        if failure is not None:
            for _, coro in parked:
                coro.close()
            raise failure
        if parked and not any([c.flush() for c in coalescers]):
            raise RuntimeError("sync pipeline parked with nothing to flush")
        pending = parked
    return results


class SyncKeeper:
    """``runtime.keeper.Keeper`` for functions running in callers' threads (module docstring):
    one thread per sync guard extends leases and visibility before they lapse and marks the
    runs past their deadline (or whose extension failed) as cut."""

    def __init__(self, twin: SyncLedger, clock: Clock, stats: o.Stats, tick: float) -> None:
        self._twin = twin
        self._clock = clock
        self._stats = stats
        self._tick = tick
        self._lock = threading.Lock()
        self.running: dict[int, Execution] = {}
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="replaysafe-sync-keeper",
                                                daemon=True)  # fmt: skip
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            now = self._clock.now()
            with self._lock:
                runs = [ex for ex in self.running.values() if ex.cut is None]
            for ex in runs:
                if now >= ex.deadline:
                    ex.cut = Cut(f"handler exceeded its {ex.spec.timeout:.1f}s deadline")
                elif now >= ex.next_beat:
                    self._beat(ex)

    def _beat(self, ex: Execution) -> None:
        spec = ex.spec
        try:
            if ex.claim is not None:
                ex.claim = self._twin.extend(ex.claim, spec.lease)
                self._stats.inc(o.LEASE_EXTENSIONS, handler=spec.name)
            if ex.extend_visibility:
                at_once(ex.delivery.extend(spec.lease))
                self._stats.inc(o.VISIBILITY_EXTENSIONS, handler=spec.name)
            ex.next_beat = self._clock.now() + spec.heartbeat
        except Exception as exc:
            ex.extension_failed(exc)  # the run learns when its function returns

    async def execute(
        self,
        spec: HandlerSpec,
        fn: HandlerFn,
        ctx: Context,
        claim: Claim | None,
        *,
        extend_visibility: bool,
    ) -> Any:
        """Run ``fn(ctx)`` here while the keeper thread extends its lease; a run cut meanwhile
        raises its cut once ``fn`` returned (its result is discarded, as an async cut's is)."""
        ex = Execution.start(spec, ctx, claim, extend_visibility, self._clock.now())
        key = next(self._ids)
        with self._lock:
            self.running[key] = ex
        try:
            result = await fn(ctx)
        except Exception:
            if ex.cut is not None:
                raise ex.cut from None
            raise
        finally:
            with self._lock:
                del self.running[key]
        if ex.cut is not None:
            raise ex.cut
        return result
