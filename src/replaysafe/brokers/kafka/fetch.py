"""The fetch task of one subscription: librdkafka's records into the subscription's buffer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from replaysafe.brokers.kafka.errors import _kafka_error
from replaysafe.brokers.kafka.offsets import TP

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message

    from replaysafe.brokers.kafka.consumer import _KafkaSubscription

_MAX_FETCH = 500


#: seconds before a seek refused for the partition's state is tried again
_SEEK_RETRY = 0.2
#: seconds a refused seek is retried before the consumer is failed (as before the retry existed:
#: the worker subscribes again from the committed offset) when no revoke arrives to drop it
_SEEK_PATIENCE = 15.0


@dataclass(slots=True)
class _Fetched:
    msg: Message
    tp: TP
    offset: int
    token: int


@dataclass(frozen=True, slots=True)
class _Rewind:
    offset: int
    resume_at: float
    #: when a seek of this rewind was first refused for the partition's state (None: never)
    refused_since: float | None = None


class _Fetcher:
    """The background task that fills a subscription's buffer (one per subscription).

    Each round it first applies the due rewinds (pause a partition while its nack delay runs,
    then seek it back to the nacked offset and resume it), then fetches up to the room left in
    the buffer (``prefetch`` minus what waits there) with one ``consume``. While the application
    holds every slot for a while, it keeps serving the group (rebalance callbacks,
    ``max.poll.interval.ms``) with the partitions paused. Fetched records are tracked as
    unfinished before they are buffered, so no commit passes a record that is not handed out
    yet. Every consumer call runs on the subscription's consumer thread (``_call``); the buffer,
    the pending rewinds and the paused sets stay the subscription's (settles and revokes touch
    them too).
    """

    __slots__ = ("_saturated_since", "_sub")

    def __init__(self, sub: _KafkaSubscription) -> None:
        self._sub = sub
        self._saturated_since: float | None = None

    async def run(self) -> None:
        sub = self._sub
        assert sub._consumer is not None
        consumer = sub._consumer
        poll = sub.broker.poll_interval
        try:
            while not sub._closed and sub._failure is None:
                await self._apply_rewinds()
                room = sub._prefetch - len(sub._buffer)
                if room > 0:
                    self._saturated_since = None
                    if sub._held:
                        await sub._call(consumer.resume, sub._parts(sub._held - sub._paused))
                        sub._held.clear()
                    msgs = await sub._call(consumer.consume, min(room, _MAX_FETCH), poll)
                elif self._saturated(poll):
                    # the application holds every slot for a while: keep serving the group
                    # (rebalance callbacks, max.poll.interval.ms) with its partitions paused
                    hold = set(self._assigned()) - sub._held - sub._paused
                    if hold:
                        await sub._call(consumer.pause, sub._parts(hold))
                        sub._held |= hold
                    msgs = await sub._call(consumer.consume, 1, poll)
                else:
                    await sub._wait(poll)
                    continue
                if msgs:
                    self._accept(msgs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            sub._fail(exc)

    def _saturated(self, poll: float) -> bool:
        sub = self._sub
        now = sub._loop.time()
        if self._saturated_since is None:
            self._saturated_since = now
        return now - self._saturated_since >= max(1.0, poll)

    def _assigned(self) -> list[TP]:
        sub = self._sub
        with sub._lock:
            return sub._tracker.assigned()

    def _accept(self, msgs: list[Message]) -> None:
        """Track and buffer one fetched batch (one lock for all of it)."""
        sub = self._sub
        good: list[tuple[Message, TP, int]] = []
        for m in msgs:
            err = m.error()
            if err is not None:
                self._consumer_error(err)
                continue
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            if topic is None or partition is None or offset is None:
                continue
            good.append((m, (topic, partition), offset))
        if not good:
            return
        added = False
        buffer = sub._buffer
        with sub._lock:
            track = sub._tracker.track
            for m, tp, offset in good:
                token = track(tp, offset)
                if token is None:
                    continue  # revoked or rewinding: it comes back after the seek / from the owner
                buffer.append(_Fetched(m, tp, offset, token))
                added = True
        if added:
            sub._notify()

    def _consumer_error(self, err: KafkaError) -> None:
        sub = self._sub
        if err.fatal():
            sub._fail(sub.broker._ck.KafkaException(err))
            return
        sub._log_once(err.name(), "%s: consumer error %s (librdkafka retries)", sub, err)

    async def _apply_rewinds(self) -> None:
        """Pause partitions with a pending rewind; seek back and resume the due ones."""
        sub = self._sub
        if not sub._rewinds:
            return
        assert sub._consumer is not None
        now = sub.clock.now()
        for tp, rw in list(sub._rewinds.items()):
            if rw.resume_at > now:
                if tp not in sub._paused:
                    await sub._call(sub._consumer.pause, sub._parts([tp]))
                    sub._paused.add(tp)
                continue
            try:
                await sub._call(sub._seek_resume, tp, rw.offset, tp in sub._paused)
            except Exception as exc:
                err = _kafka_error(exc)
                since = rw.refused_since if rw.refused_since is not None else now
                if (
                    err is not None
                    and err.code() == sub.broker._ck.KafkaError._STATE
                    and now - since < _SEEK_PATIENCE
                ):
                    # librdkafka already dropped the partition (a session timeout, say, after
                    # a SIGSTOP) and the revoke callback has not run yet: keep the rewind
                    # pending (the partition stays frozen, nothing past rw.offset is
                    # committed); the revoke drops it, or a later seek succeeds
                    sub._log_once(
                        "seek-state", "%s: cannot seek %s yet (%s); retrying", sub, tp, err
                    )
                    sub._rewinds[tp] = _Rewind(rw.offset, now + _SEEK_RETRY, since)
                    continue
                # never guess a position: without the seek the records after rw.offset would
                # look like a gap and the commit could pass them
                sub._fail(exc)
                return
            sub._paused.discard(tp)
            sub._held.discard(tp)  # resumed: held again on the next saturated round if needed
            if sub._rewinds.get(tp) is rw:
                del sub._rewinds[tp]
                with sub._lock:
                    sub._tracker.unfreeze(tp)
