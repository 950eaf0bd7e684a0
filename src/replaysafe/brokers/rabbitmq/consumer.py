"""A RabbitMQ subscription: consuming one group's queue, buffering, handing out batches within
``prefetch``, delayed nacks, and closing (gracefully or as a crash). Its acks go through
:class:`~replaysafe.brokers.rabbitmq.acks._Acker`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from replaysafe.brokers.base import Delivery, Subscription
from replaysafe.brokers.rabbitmq._driver import _driver_aiormq
from replaysafe.brokers.rabbitmq.acks import _QOS_FACTOR, _Acker
from replaysafe.brokers.rabbitmq.delivery import RabbitMQDelivery, _settle_quietly
from replaysafe.brokers.rabbitmq.topology import MAX_DELAY, Topology, retry_band
from replaysafe.errors import BrokerError, ConfigurationError

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection, AbstractRobustQueue
    from aiormq.abc import AbstractChannel, DeliveredMessage

    from replaysafe.brokers.rabbitmq.broker import RabbitMQBroker

log = logging.getLogger("replaysafe.brokers.rabbitmq")

#: how long ``next_batch`` lets a burst of deliveries grow its batch (see there)
_LINGER_TICKS = 2
_LINGER_SECONDS = 0.005

_CLOSED = None  # buffer sentinel: wakes every pending __anext__ after close


class _RabbitSubscription(Subscription):
    """One consumer on one group's queue: owns its channel (and the consumer on the aiormq
    channel underneath, consumed again after a reopen), the buffer of deliveries not yet handed
    out, the deliveries handed out and unsettled (at most ``prefetch``) and the held delayed
    nacks. Acks are the :class:`_Acker`'s."""

    def __init__(
        self, broker: RabbitMQBroker, topology: Topology, group: str, prefetch: int
    ) -> None:
        self.broker = broker
        self.topology = topology
        self.group = group
        self.prefetch = prefetch
        self._buffer: asyncio.Queue[DeliveredMessage | None] = asyncio.Queue()
        self._unsettled: set[RabbitMQDelivery] = set()
        self._held: set[asyncio.Task[None]] = set()
        #: set when a delivery settles: room to hand out another within ``prefetch``
        self._room = asyncio.Event()
        #: set when a message is buffered (or on close): ``next_batch`` waits on it
        self._arrived = asyncio.Event()
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractRobustQueue | None = None
        #: the consumer tag, on the channel (underneath the robust one) that consumes now
        self._tag: str | None = None
        self._underlay: AbstractChannel | None = None
        self._closed = False
        #: set right before channel.close: from then on no settle frame may be sent on it
        self._channel_closing = False
        #: the acks of its deliveries: coalesced per loop tick, confirmed on request
        self._acks = _Acker(self)

    async def _open(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        self._channel = channel
        # twice the deliveries handed out: the next batch is already here when one completes
        await channel.set_qos(prefetch_count=self.prefetch * _QOS_FACTOR)
        # declared (not just referenced) on this channel so that a reconnect re-declares it
        self._queue = await channel.declare_queue(
            self.topology.queue,
            durable=True,
            arguments=self.broker._admin.queue_args(self.topology),
        )
        # consumed on the aiormq channel underneath: aio-pika's own consumer would wrap every
        # delivery in an IncomingMessage (~13 us) and one more task. A reconnect (or a channel the
        # server closed) re-declares the queue and then calls reopen_callbacks: consume again.
        channel.reopen_callbacks.add(self._reconsume)
        await self._consume_on(await channel.get_underlay_channel())

    async def _consume_on(self, underlay: AbstractChannel) -> None:
        ok = await underlay.basic_consume(self.topology.queue, self._on_message, no_ack=False)
        self._tag = ok.consumer_tag
        self._underlay = underlay

    async def _reconsume(self, channel: object) -> None:
        if self._closed or self._channel is None:
            return
        aiormq = _driver_aiormq()
        try:
            await self._consume_on(await self._channel.get_underlay_channel())
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError, OSError) as exc:
            log.error(
                "%s: could not consume again after the channel reopened (%s: %s); close this "
                "subscription and subscribe again",
                self,
                type(exc).__name__,
                self.broker._errors.scrub(str(exc)),
            )

    async def _on_message(self, message: DeliveredMessage) -> None:
        self._acks.track(message)  # even after close: an unsettled tag must stop a multiple ack
        if not self._closed:
            self._buffer.put_nowait(message)
            self._arrived.set()

    def _wrap(self, message: DeliveredMessage) -> RabbitMQDelivery | None:
        channel = message.channel
        if channel.is_closed or not getattr(channel.connection, "is_opened", True):
            # RabbitMQ requeues it when the channel dies; the copy on the new channel follows
            return None
        d = RabbitMQDelivery(self, message, self._acks.book_of(message))
        self._unsettled.add(d)
        return d

    async def __anext__(self) -> Delivery:
        """The next delivery. Cancelling a pending call loses nothing (the buffer keeps it)."""
        while True:
            if self._closed:
                raise StopAsyncIteration
            while len(self._unsettled) >= self.prefetch and not self._closed:
                self._room.clear()
                await self._room.wait()
            if self._closed:
                raise StopAsyncIteration
            message = await self._buffer.get()
            if message is _CLOSED:
                self._buffer.put_nowait(_CLOSED)
                raise StopAsyncIteration
            d = self._wrap(message)
            if d is not None:
                return d

    async def next_batch(self, max_items: int) -> list[Delivery]:
        """One delivery (waiting for it) plus what else arrives while RabbitMQ is still sending,
        up to ``max_items`` and within ``prefetch`` unsettled.

        A prefetch window's worth of messages arrives as a burst spread over several loop ticks
        (each frame goes through aiormq and aio-pika tasks before it is buffered), so taking only
        what is buffered at the first delivery gives batches of 2-7. The batch keeps growing
        while the buffer does: it is taken after ``_LINGER_TICKS`` ticks without a new message,
        or after ``_LINGER_SECONDS``; an idle queue costs two loop ticks, not a timer. Nothing
        is taken before the last wait: a cancelled call loses nothing (the buffer keeps it)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._ready()
            deadline = loop.time() + _LINGER_SECONDS
            idle = 0
            while (
                idle < _LINGER_TICKS
                and self._buffer.qsize() < max_items
                and not self._closed
                and loop.time() < deadline
            ):
                before = self._buffer.qsize()
                await asyncio.sleep(0)
                idle = idle + 1 if self._buffer.qsize() == before else 0
            # from here on no await: the batch is handed out whole or not at all
            batch: list[Delivery] = []
            room = min(max_items, self.prefetch - len(self._unsettled))
            while len(batch) < room and not self._buffer.empty():
                message = self._buffer.get_nowait()
                if message is _CLOSED:
                    self._buffer.put_nowait(_CLOSED)
                    break
                d = self._wrap(message)
                if d is not None:
                    batch.append(d)
            if batch:
                return batch
            if self._closed:
                raise StopAsyncIteration

    async def _ready(self) -> None:
        """Wait (taking nothing) until a message is buffered and one more may be handed out
        within ``prefetch``. ``StopAsyncIteration`` once closed."""
        while True:
            if self._closed:
                raise StopAsyncIteration
            if len(self._unsettled) >= self.prefetch:
                self._room.clear()
                await self._room.wait()
            elif self._buffer.empty():
                self._arrived.clear()
                await self._arrived.wait()
            else:
                return

    async def _delay(self, d: RabbitMQDelivery, seconds: float) -> bool:
        """Delayed redelivery of ``d``; True when the original is held here (fallback)."""
        if seconds > MAX_DELAY:
            log.warning(
                "nack delay of %.0fs on %s clamped to %.0fs", seconds, d.delivery_id, MAX_DELAY
            )
            seconds = MAX_DELAY
        band = retry_band(seconds)
        try:
            await self.broker._publisher.republish_delayed(self.topology, band, d, seconds)
        except (BrokerError, ConfigurationError) as exc:
            # never a tight requeue loop: hold the original (unacked) and requeue it after the
            # delay; if the channel dies meanwhile RabbitMQ requeues it anyway
            log.warning(
                "delayed nack of %s could not use the retry queue (%s); holding it for %.1fs, "
                "then requeueing",
                d.delivery_id,
                exc,
                seconds,
            )
            task = asyncio.ensure_future(self._requeue_later(d, seconds))
            self._held.add(task)
            task.add_done_callback(self._held.discard)
            return True
        # the copy is confirmed: acking the original now can only duplicate, never lose
        await self._acks.ack(d)
        return False

    async def _requeue_later(self, d: RabbitMQDelivery, seconds: float) -> None:
        try:
            await self.broker.clock.sleep(seconds)
            await _settle_quietly(d, "delayed requeue", lambda m: m.reject(requeue=True))
        finally:
            d._done()

    async def close(self, *, abandon: bool = False) -> None:
        """Stop consuming and wake pending ``__anext__`` calls.

        Graceful: cancel the consumer, requeue what was buffered but never handed out
        (``basic.nack``: not a failed delivery), then close the channel (RabbitMQ requeues any
        delivery still unsettled). ``abandon=True`` only closes the channel, as a crash would:
        RabbitMQ requeues everything unacked. Held delayed-nack timers are dropped in both cases
        (their messages return at once with the channel). Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._room.set()
        self._arrived.set()
        self._buffer.put_nowait(_CLOSED)
        self.broker._subs.discard(self)
        for task in list(self._held):
            task.cancel()
        aiormq = _driver_aiormq()
        gone = (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError, OSError, TimeoutError)
        if abandon:  # as a crash: unsent acks stay unsent, their messages come back
            await self._acks.abandon()
        # bounded: a robust channel waits for a reconnect before any call, and the server may be
        # gone for good; RabbitMQ requeues whatever this does not get to settle
        with contextlib.suppress(*gone):
            async with asyncio.timeout(self.broker.connect_timeout):
                if not abandon and self._underlay is not None and self._tag is not None:
                    with contextlib.suppress(*gone):
                        await self._underlay.basic_cancel(self._tag)
                    await self._acks.drain()  # acks already made are sent, not redelivered
                    while not self._buffer.empty():
                        message = self._buffer.get_nowait()
                        if message is not _CLOSED and message.delivery_tag:
                            with contextlib.suppress(*gone):
                                await message.channel.basic_nack(
                                    delivery_tag=message.delivery_tag, requeue=True
                                )
                    self._buffer.put_nowait(_CLOSED)
                if self._channel is not None:
                    self._channel.reopen_callbacks.discard(self._reconsume)
                    self._channel_closing = True
                    self._acks.drop()
                    await self._channel.close()
        self._acks.drop()

    def __repr__(self) -> str:
        return (
            f"<RabbitMQSubscription {self.topology.queue!r} prefetch={self.prefetch} "
            f"unsettled={len(self._unsettled)} closed={self._closed}>"
        )


# --------------------------------------------------------------------------- the broker
