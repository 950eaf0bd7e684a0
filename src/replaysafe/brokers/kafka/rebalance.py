"""librdkafka's rebalance callbacks for one subscription (run on its consumer thread)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from replaysafe.brokers.kafka.offsets import TP

if TYPE_CHECKING:
    from confluent_kafka import Consumer, TopicPartition

    from replaysafe.brokers.kafka.consumer import _KafkaSubscription

log = logging.getLogger("replaysafe.brokers.kafka")

T = TypeVar("T")


class _Rebalance:
    """What the group's moves do to one subscription. Called by librdkafka from inside
    ``consume`` on the subscription's consumer thread, so a revoke can commit synchronously
    before it completes.

    Assign starts each partition afresh in the tracker (a new generation: older tokens are
    stale). Revoke has the event loop stop handing out the partitions' records and wait (up to
    ``drain_timeout``) for the ones in flight, commits what is done, then forgets the partitions:
    later settles are ignored and the new owner re-reads from the committed offset. Lost
    partitions (someone else may own them already) are forgotten without drain or commit.
    """

    __slots__ = ("_sub",)

    def __init__(self, sub: _KafkaSubscription) -> None:
        self._sub = sub

    @staticmethod
    def _tps(partitions: list[TopicPartition]) -> list[TP]:
        return [(p.topic, p.partition) for p in partitions]

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        sub = self._sub
        try:
            tps = self._tps(partitions)
            with sub._lock:
                for tp in tps:
                    sub._tracker.assign(tp)
            log.info("%s: assigned %s", sub, [p for _, p in tps])
            sub._soon(sub._assigned_on_loop)
        except Exception:  # an exception here would surface from consume(): log it instead
            log.exception("%s: on_assign failed", sub)

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoke(consumer, self._tps(partitions), lost=False)

    def on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # someone else may own them already: no drain, and a commit would be refused anyway
        self._revoke(consumer, self._tps(partitions), lost=True)

    def _revoke(self, consumer: Consumer, tps: list[TP], *, lost: bool) -> None:
        sub = self._sub
        try:
            timeout = sub.broker.drain_timeout + 5.0
            paused = self._on_loop(lambda: sub._revoking(tps, drain=not lost), timeout) or []
            if not lost and not sub._abandoned:
                with sub._lock:
                    batch = sub._tracker.to_commit(tps)
                if batch:
                    sub._commits.commit(batch)
            if paused:
                # librdkafka may keep the pause flag across an unassign: clear it while we can
                with contextlib.suppress(Exception):
                    consumer.resume(sub._parts(paused))
            with sub._lock:
                for tp in tps:
                    sub._tracker.revoke(tp)
            log.info("%s: %s %s", sub, "lost" if lost else "revoked", [p for _, p in tps])
            sub._soon(sub._notify)
            sub._soon(sub._commits.moved)
        except Exception:
            log.exception("%s: on_revoke failed", sub)

    def _on_loop(self, fn: Callable[[], Coroutine[Any, Any, T]], timeout: float) -> T | None:
        """From the consumer thread: run a coroutine on the event loop and wait for it. None when
        the loop is gone or too slow (the caller then goes on without it)."""
        sub = self._sub
        coro = fn()
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, sub._loop)
        except RuntimeError:  # the loop is closed: nobody is left to drain
            coro.close()
            return None
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            log.warning("%s: the event loop did not answer within %.1fs", sub, timeout)
        except Exception:
            log.exception("%s: rebalance handling failed on the event loop", sub)
        return None
