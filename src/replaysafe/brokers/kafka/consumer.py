"""One consumer-group member: its consumer and thread, the buffer, handing records out and
settling them.

See the package docstring for the semantics (commits, rewinds, rebalance, threading). The
subscription holds the state; three collaborators act on it: :class:`_Fetcher` fills the buffer,
:class:`_Commits` turns done offsets into commits, :class:`_Rebalance` answers librdkafka's
rebalance callbacks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from replaysafe.brokers.base import Delivery, Subscription
from replaysafe.brokers.kafka.commits import _Commits
from replaysafe.brokers.kafka.delivery import _KafkaDelivery
from replaysafe.brokers.kafka.fetch import _Fetched, _Fetcher, _Rewind
from replaysafe.brokers.kafka.offsets import TP, OffsetTracker
from replaysafe.brokers.kafka.rebalance import _Rebalance
from replaysafe.errors import BrokerError, BrokerUnavailable, ConfigurationError

if TYPE_CHECKING:
    from confluent_kafka import Consumer, TopicPartition

    from replaysafe.brokers.kafka.broker import KafkaBroker

log = logging.getLogger("replaysafe.brokers.kafka")

T = TypeVar("T")


# --------------------------------------------------------------------------- subscription


class _KafkaSubscription(Subscription):
    """One group member on one topic. See the package docstring for the semantics.

    Owns the consumer and the one thread every call on it runs on, the offset tracker (shared
    with that thread under ``_lock``), the buffer of fetched records, the deliveries handed out
    per partition, the pending rewinds and the paused partitions (event loop only)."""

    def __init__(self, broker: KafkaBroker, topic: str, group: str, prefetch: int) -> None:
        self.broker = broker
        self.topic = topic
        self.group = group
        self.clock = broker.clock
        self.timestamp_na: int = broker._ck.TIMESTAMP_NOT_AVAILABLE
        self._prefetch = prefetch
        self._loop = asyncio.get_running_loop()
        # every consumer call runs on this one thread (librdkafka's consumer is not thread-safe)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"replaysafe-kafka-{group}"
        )
        self._consumer: Consumer | None = None
        # the tracker and the commits' queue are shared with that thread: guarded by _lock
        self._lock = threading.Lock()
        self._tracker = OffsetTracker()
        self._commits = _Commits(self)
        self._rebalance = _Rebalance(self)
        # the rest is touched on the event loop only
        self._buffer: deque[_Fetched] = deque()
        self._out: dict[TP, set[_KafkaDelivery]] = {}
        self._unsettled = 0
        self._rewinds: dict[TP, _Rewind] = {}
        #: paused for a rewind / paused because the application is saturated
        self._paused: set[TP] = set()
        self._held: set[TP] = set()
        self._changed = asyncio.Event()
        self._notify_queued = False
        self._assigned = asyncio.Event()
        self._fetcher = _Fetcher(self)
        self._fetch_task: asyncio.Task[None] | None = None
        self._failure: BrokerError | None = None
        self._closed = False
        self._abandoned = False
        self._logged: dict[str, float] = {}

    # ------------------------------------------------------------------ plumbing

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _notify_soon(self) -> None:
        """``_notify`` once at the end of this loop tick, however many settles asked for it."""
        if not self._notify_queued:
            self._notify_queued = True
            self._loop.call_soon(self._notify_queued_now)

    def _notify_queued_now(self) -> None:
        self._notify_queued = False
        self._notify()

    async def _wait(self, within: float | None = None) -> None:
        changed = self._changed  # captured before the caller looks again (no lost wake-up)
        if within is None:
            await changed.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await changed.wait()

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(fn, *args)

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._logged.get(key, -1e9) >= 30.0:
            self._logged[key] = now
            log.warning(msg, *args)

    # ------------------------------------------------------------------ start

    async def _start(self) -> None:
        b = self.broker
        try:
            conf = {**b._consumer_conf(self.group), "on_commit": self._commits.on_commit}
            consumer: Consumer = await self._call(b._ck.Consumer, conf)
        except b._ck.KafkaException as exc:
            await self._shutdown()
            raise ConfigurationError(
                f"KafkaBroker: librdkafka refused the consumer configuration: {exc}; fix config "
                "or consumer_config"
            ) from exc
        self._consumer = consumer
        try:
            md = await self._call(consumer.list_topics, self.topic, b.request_timeout)
        except Exception as exc:
            await self._shutdown()
            raise BrokerUnavailable(
                f"KafkaBroker: cannot reach {b.bootstrap} to subscribe to {self.topic!r}: {exc}; "
                "check that the brokers run and bootstrap_servers is right"
            ) from exc
        meta = md.topics.get(self.topic)
        if meta is None or meta.error is not None:
            await self._shutdown()
            why = meta.error if meta is not None else "not in the metadata"
            raise ConfigurationError(
                f"KafkaBroker: topic {self.topic!r} is not available on {b.bootstrap} ({why}); "
                "create it first (KafkaBroker.create_topic or your topic tooling)"
            )
        await self._call(
            lambda: consumer.subscribe(
                [self.topic],
                on_assign=self._rebalance.on_assign,
                on_revoke=self._rebalance.on_revoke,
                on_lost=self._rebalance.on_lost,
            )
        )
        self._fetch_task = asyncio.create_task(self._fetcher.run(), name=f"kafka-fetch:{self}")
        # joining takes a rebalance; returning before it would make the first publish race it
        deadline = self._loop.time() + b.join_timeout
        while not self._assigned.is_set() and self._failure is None:
            left = deadline - self._loop.time()
            if left <= 0:
                break
            await self._wait(left)
        if self._failure is not None:
            raise self._failure
        if not self._assigned.is_set():
            log.warning(
                "%s: no partition assignment within %.0fs; still trying in the background "
                "(is the group rebalancing slowly, or are all partitions taken?)",
                self,
                b.join_timeout,
            )

    # ------------------------------------------------------------------ fetching (see _Fetcher)

    def _parts(self, tps: Iterable[TP]) -> list[TopicPartition]:
        return [self.broker._ck.TopicPartition(*tp) for tp in sorted(tps)]

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            log.error("%s: consumer failed: %r", self, exc)
            self._failure = BrokerUnavailable(
                f"KafkaBroker: the consumer of {self.topic!r} in group {self.group!r} failed: "
                f"{exc}; close this subscription and subscribe again (uncommitted records are "
                "delivered again from the committed offset)"
            )
        self._notify()

    def _seek_resume(self, tp: TP, offset: int, paused: bool) -> None:  # consumer thread
        assert self._consumer is not None
        self._consumer.seek(self.broker._ck.TopicPartition(tp[0], tp[1], offset))
        if paused:
            self._consumer.resume(self._parts([tp]))

    # ------------------------------------------------------------------ handing out

    def _take(self, limit: int) -> list[_KafkaDelivery]:
        """Up to ``limit`` deliveries from the buffer, skipping records a rewind or a revoke made
        stale: one lock and one wake-up of the fetcher for the whole batch."""
        buffer = self._buffer
        if limit <= 0 or not buffer:
            return []
        picked: list[_Fetched] = []
        with self._lock:
            valid = self._tracker.valid
            while buffer and len(picked) < limit:
                f = buffer.popleft()
                if valid(f.tp, f.offset, f.token):
                    picked.append(f)
        if not picked:
            return []
        now = self.clock.now()
        seen = self.broker._seen
        group = self.group
        outs = self._out
        out: list[_KafkaDelivery] = []
        for f in picked:
            d = _KafkaDelivery(
                self, f.msg, f.tp, f.offset, f.token, seen(group, f.tp, f.offset), now
            )
            handed = outs.get(f.tp)
            if handed is None:
                handed = outs[f.tp] = set()
            handed.add(d)
            out.append(d)
        self._unsettled += len(out)
        self._notify()  # the fetcher may have room again
        return out

    async def __anext__(self) -> Delivery:
        """The next record. Waits for a fetch, and while ``prefetch`` deliveries are unsettled.
        Cancelling it loses nothing (records wait in the buffer). ``StopAsyncIteration`` once
        closed; ``BrokerUnavailable`` when the consumer failed."""
        return (await self._next(1))[0]

    async def _next(self, max_items: int) -> list[_KafkaDelivery]:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._failure is not None:
                raise self._failure
            room = min(max_items, self._prefetch - self._unsettled)
            if room > 0 and (got := self._take(room)):
                return got
            await self._wait()

    async def next_batch(self, max_items: int) -> list[Delivery]:
        """One record (waiting for it), plus every other buffered one, within ``prefetch``."""
        return list(await self._next(max(1, max_items)))

    # ------------------------------------------------------------------ settling

    def _release(self, d: _KafkaDelivery) -> None:
        self._unsettled -= 1
        out = self._out.get(d.tp)
        if out is not None:
            out.discard(d)

    def _settled_done(self, d: _KafkaDelivery) -> None:
        self._release(d)
        self._commits.done(d)
        self._notify_soon()

    def _settled_rewind(self, d: _KafkaDelivery, delay: float) -> None:
        self._release(d)
        with self._lock:
            counted = self._tracker.rewind(d.tp, d.offset, d.token)
        if counted:
            self._buffer = deque(f for f in self._buffer if f.tp != d.tp)
            # every later copy of the partition that is out is now stale: it will come again
            prev = self._rewinds.get(d.tp)
            resume_at = self.clock.now() + delay
            if prev is not None:
                resume_at = max(resume_at, prev.resume_at)
            self._rewinds[d.tp] = _Rewind(d.offset, resume_at)
        self._notify()

    # ------------------------------------------------------------------ rebalance (loop side)

    def _assigned_on_loop(self) -> None:
        self._assigned.set()
        self._notify()

    async def _revoking(self, tps: list[TP], *, drain: bool) -> list[TP]:
        """On the loop: stop handing out records of ``tps``, then wait (bounded) for the ones in
        flight. Returns the partitions that were paused for a rewind."""
        gone = set(tps)
        # buffered records are tracked as unfinished: dropping them keeps the commit before them
        self._buffer = deque(f for f in self._buffer if f.tp not in gone)
        for tp in tps:
            self._rewinds.pop(tp, None)
        if drain and not self._closed:
            deadline = self._loop.time() + self.broker.drain_timeout
            while not self._closed and any(self._out.get(tp) for tp in tps):
                left = deadline - self._loop.time()
                if left <= 0:
                    n = sum(len(self._out.get(tp, ())) for tp in tps)
                    log.warning(
                        "%s: revoke: %d deliveries still unsettled after drain_timeout=%.1fs; "
                        "committing only what is done (they will be delivered again)",
                        self,
                        n,
                        self.broker.drain_timeout,
                    )
                    break
                await self._wait(left)
        for tp in tps:
            self._out.pop(tp, None)  # late settles of these copies are stale now
        paused = [tp for tp in tps if tp in self._paused or tp in self._held]
        self._paused.difference_update(tps)
        self._held.difference_update(tps)
        return paused

    # ------------------------------------------------------------------ close

    async def close(self, *, abandon: bool = False) -> None:
        """Stop consuming and wake a pending ``__anext__``. Graceful: commit what is done, then
        leave the group (deliveries still unsettled come again to the next owner). ``abandon``:
        leave without any further commit, as a crash would. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._abandoned = abandon
        self._notify()
        self._commits.moved()
        self._commits.stop(abandon=abandon)
        if self._fetch_task is not None:
            self._fetch_task.cancel()
            await asyncio.wait({self._fetch_task})
        self._buffer.clear()  # tracked as unfinished: no commit passes them
        if not abandon and self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._call(self._commits.final)
        await self._shutdown()
        self.broker._subs.discard(self)

    async def _shutdown(self) -> None:
        consumer = self._consumer
        if consumer is not None:
            try:
                # queued behind any commit requested before (they still land); leaves the group
                # (on_revoke runs: it commits unless abandoned)
                await self._loop.run_in_executor(self._executor, consumer.close)
            except Exception as exc:
                log.warning("%s: consumer close failed: %s", self, exc)
            self._consumer = None
        with self._lock:
            for tp in self._tracker.assigned():
                self._tracker.revoke(tp)
        self._executor.shutdown(wait=False)

    def __repr__(self) -> str:
        return (
            f"<KafkaSubscription {self.topic}/{self.group} unsettled={self._unsettled} "
            f"closed={self._closed}>"
        )
