"""The commit pipeline of one subscription: done offsets become Kafka commits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from replaysafe.brokers.kafka.offsets import TP
from replaysafe.errors import BrokerUnavailable

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, TopicPartition

    from replaysafe.brokers.kafka.consumer import _KafkaSubscription
    from replaysafe.brokers.kafka.delivery import _KafkaDelivery

log = logging.getLogger("replaysafe.brokers.kafka")


class _Commits:
    """Turns the subscription's done offsets (its :class:`OffsetTracker`) into commits.

    Owns: coalescing (at most one commit request is queued; the acks that arrive meanwhile ride
    on it), the spacing of commits (``commit_interval``), the asynchronous commits in flight and
    librdkafka's answers to them, the retry of refused ones, the synchronous commits of a revoke
    or a close, and waking ``ack_confirmed`` callers once a commit covers their record.

    A commit moves the COMPLETED boundary of every record before the committed position; a crash
    before it loses those acks (the records are delivered again). ``queued`` and the commits in
    flight are shared with the consumer thread: guarded by the subscription's lock, like its
    tracker. The rest is touched on the event loop only.
    """

    __slots__ = ("_last", "_out", "_progress", "_sub", "_timer", "queued")

    def __init__(self, sub: _KafkaSubscription) -> None:
        self._sub = sub
        #: a commit request is queued (the acks meanwhile ride on it)
        self.queued = False
        #: asynchronous commits sent and not yet answered: (tp, position) -> generation
        self._out: dict[tuple[TP, int], int] = {}
        #: set (and replaced) on the loop whenever commits were answered or partitions left
        self._progress = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._last = time.monotonic()

    def done(self, d: _KafkaDelivery) -> None:
        """Mark ``d`` done (an ack, or a reject) and queue a commit when that counted."""
        sub = self._sub
        with sub._lock:
            counted = sub._tracker.done(d.tp, d.offset, d.token)
            # the acks of one batch ride on one commit: only the first queues it
            commit = counted and not sub._closed and not self.queued
            if commit:
                self.queued = True
        if commit:
            self._schedule()

    def request(self) -> None:
        """Coalesce commits: at most one queued request; acks meanwhile ride on it."""
        with self._sub._lock:
            if self.queued:
                return
            self.queued = True
        self._schedule()

    def _schedule(self) -> None:
        wait = self._last + self._sub.broker.commit_interval - time.monotonic()
        if wait > 0:
            self._timer = self._sub._loop.call_later(wait, self._submit)
        else:
            self._submit()

    def _submit(self) -> None:
        self._timer = None
        sub = self._sub
        if sub._abandoned:
            return
        self._last = time.monotonic()
        # submitted to the consumer thread NOW (not from a task that runs later), so a close that
        # follows an ack always finds the commit ahead of it in the queue
        fut = sub._loop.run_in_executor(sub._executor, self._job)
        fut.add_done_callback(self._job_done)

    def _job(self) -> bool:  # consumer thread
        """Send the done positions as an asynchronous commit: the consumer thread does not wait
        for the coordinator's answer (a synchronous commit held it for a round trip, during
        which no record was fetched). ``on_commit`` takes the answer; a refusal is retried.
        A position already sent and not yet answered is not sent again."""
        sub = self._sub
        with sub._lock:
            self.queued = False
            batch = [b for b in sub._tracker.to_commit() if (b[0], b[1]) not in self._out]
            for tp, pos, gen in batch:
                self._out[(tp, pos)] = gen
        if not batch:
            return True
        consumer = sub._consumer
        ck = sub.broker._ck
        try:
            if consumer is None:
                raise RuntimeError("the consumer is closed")
            # no abandon check: a commit requested before a crash may still land, as on a crash
            consumer.commit(
                offsets=[ck.TopicPartition(tp[0], tp[1], pos) for tp, pos, _ in batch],
                asynchronous=True,
            )
        except Exception as exc:
            with sub._lock:
                for tp, pos, _ in batch:
                    self._out.pop((tp, pos), None)
            log.warning("%s: commit of %s failed: %s (retried)", sub, batch, exc)
            return False
        return True

    def on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's answer to a commit (consumer thread, served from ``consume``). Only
        answers to ``_job``'s asynchronous commits move the tracker here; the synchronous ones
        (revoke, close) are handled where they are made."""
        sub = self._sub
        try:
            committed: list[tuple[TP, int]] = []
            refused: dict[TP, Any] = {}
            with sub._lock:
                for p in partitions:
                    tp = (p.topic, p.partition)
                    gen = self._out.pop((tp, p.offset), None)
                    if gen is None:
                        continue
                    if err is None and p.error is None:
                        sub._tracker.committed(tp, p.offset, gen)
                        committed.append((tp, p.offset))
                    else:
                        refused[tp] = p.error or err
            if committed:
                sub._soon(sub.broker._forget, sub.group, committed)
            sub._soon(self.moved)
            if refused:
                # a rebalance in progress or a lost coordinator: try again shortly (a revoke in
                # the meantime drops the partition and its pending commit with it)
                log.warning("%s: commit refused for %s (retried)", sub, refused)
                sub._soon(self._retry_later)
        except Exception:  # an exception here would surface from consume(): log it instead
            log.exception("%s: on_commit failed", sub)

    def moved(self) -> None:
        """Wake every ``wait_covered`` (on the loop)."""
        moved, self._progress = self._progress, asyncio.Event()
        moved.set()

    async def wait_covered(self, d: _KafkaDelivery, generation: int | None) -> None:
        """Return once a commit of ``generation`` covers ``d``; ``BrokerUnavailable`` when none
        will (revoked, closed) or none was answered within the broker's ``request_timeout``."""
        sub = self._sub
        deadline = sub._loop.time() + sub.broker.request_timeout
        while True:
            moved = self._progress
            with sub._lock:
                covered = sub._tracker.commit_covers(d.tp, d.offset, generation)
            if covered:
                return
            left = deadline - sub._loop.time()
            if covered is None or sub._closed or left <= 0:
                why = (
                    "the partition was revoked first" if covered is None
                    else "the subscription closed" if sub._closed
                    else f"no commit answered within {sub.broker.request_timeout:.0f}s"
                )  # fmt: skip
                raise BrokerUnavailable(
                    f"KafkaBroker: the completion of {d.delivery_id} is not confirmed ({why}); "
                    "the group may read the record again, so do not run an at-most-once effect "
                    "for it"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await moved.wait()

    def _retry_later(self) -> None:
        if not self._sub._closed:
            self._sub._loop.call_later(0.5, self._retry)

    def _job_done(self, fut: asyncio.Future[bool]) -> None:
        sub = self._sub
        if not fut.cancelled() and (exc := fut.exception()) is not None:
            log.error("%s: commit job failed: %r", sub, exc)
        ok = not fut.cancelled() and fut.exception() is None and fut.result()
        if not ok and not sub._closed:
            # a rebalance in progress or a lost coordinator: try again shortly (a revoke in the
            # meantime drops the partition and its pending commit with it)
            sub._loop.call_later(0.5, self._retry)

    def _retry(self) -> None:
        if not self._sub._closed:
            self.request()

    def commit(self, batch: list[tuple[TP, int, int]]) -> bool:  # consumer thread
        """Commit ``batch`` synchronously (a revoke or a close: the partitions are about to
        leave). True when every position was committed."""
        sub = self._sub
        consumer = sub._consumer
        if consumer is None:
            return False
        ck = sub.broker._ck
        offsets = [ck.TopicPartition(tp[0], tp[1], pos) for tp, pos, _ in batch]
        try:
            result = consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as exc:
            log.warning("%s: commit of %s failed: %s (retried)", sub, offsets, exc)
            return False
        errors = {(r.topic, r.partition): r.error for r in result or () if r.error is not None}
        committed = []
        with sub._lock:
            for tp, pos, gen in batch:
                if tp not in errors:
                    sub._tracker.committed(tp, pos, gen)
                    committed.append((tp, pos))
        if committed:
            sub._soon(sub.broker._forget, sub.group, committed)
        sub._soon(self.moved)
        if errors:
            log.warning("%s: commit refused for %s (retried)", sub, errors)
        return not errors

    def final(self) -> None:  # consumer thread
        """Commit what is done (a graceful close)."""
        with self._sub._lock:
            batch = self._sub._tracker.to_commit()
        if batch:
            self.commit(batch)

    def stop(self, *, abandon: bool) -> None:
        """On close: no queued commit fires any more (a graceful close commits through
        :meth:`final` instead)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            if not abandon:
                with self._sub._lock:
                    self.queued = False
