"""Ack coalescing for one subscription: the tags each channel delivered, the flush that sends a
loop tick's acks as few frames, and the ``basic.qos`` round trips that confirm them."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from replaysafe.brokers.rabbitmq._driver import _driver_aiormq
from replaysafe.brokers.rabbitmq.delivery import _settle_quietly

if TYPE_CHECKING:
    from aiormq.abc import AbstractChannel, DeliveredMessage

    from replaysafe.brokers.rabbitmq.consumer import _RabbitSubscription
    from replaysafe.brokers.rabbitmq.delivery import RabbitMQDelivery

log = logging.getLogger("replaysafe.brokers.rabbitmq")

#: basic.qos is this many times ``prefetch``: ``prefetch`` deliveries handed out and unsettled,
#: the rest buffered, so the next batch is already here when one completes
_QOS_FACTOR = 2


class _AckBook:
    """The delivery tags one channel gave its subscription, until each one's settle frame is
    queued: what a ``basic.ack(multiple=True)`` may cover.

    A multiple ack of tag N settles *every* unsettled tag <= N on the channel, so it is only sent
    for the top of a run of tags that are all acked (or already settled by their own frame):
    the run starts at the lowest live tag and stops before the first tag that is neither. A
    nack or reject is never swallowed: its tag is live (it stops the run) until its own frame is
    queued, and frames leave in the order they are queued. Acked tags above the run go out one
    by one in the same flush, so a slow delivery never holds its neighbours' acks (they would
    keep their prefetch credit). Tags are per channel: a reconnect starts a new book, and the
    acks of a dead channel are never sent (RabbitMQ requeued those messages).
    """

    __slots__ = ("acked", "channel", "live", "tags")

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        #: tags in ascending order; settled ones are dropped lazily from the front
        self.tags: deque[int] = deque()
        #: tags without a queued settle frame (acked-but-unsent ones included)
        self.live: set[int] = set()
        #: acked, not yet sent: tag -> the future its ``ack()`` awaits
        #: acked tag -> resolved True once its frame (or a multiple one covering it) is written,
        #: False when it never will be (the channel closed first)
        self.acked: dict[int, asyncio.Future[bool]] = {}

    def receive(self, tag: int) -> None:
        if self.tags and tag < self.tags[-1]:  # never seen from one consumer; kept sorted anyway
            self.tags = deque(sorted((*self.tags, tag)))
        else:
            self.tags.append(tag)
        self.live.add(tag)

    def settled_alone(self, tag: int) -> None:
        """``tag``'s own frame (nack, reject, single ack) is queued, or it never will be."""
        self.live.discard(tag)
        fut = self.acked.pop(tag, None)
        if fut is not None and not fut.done():
            fut.set_result(False)  # not by the coalesced frame: unconfirmed for its waiter

    def take(
        self,
    ) -> tuple[int | None, list[asyncio.Future[bool]], list[int], list[asyncio.Future[bool]]]:
        """Everything acked since the last call: ``(top, covered, singles, single_waiters)``:
        a multiple ack of ``top`` settles the futures in ``covered``; ``singles`` need a frame
        each. The taken tags are no longer live."""
        tags, live, acked = self.tags, self.live, self.acked
        top: int | None = None
        covered: list[asyncio.Future[bool]] = []
        while tags:
            tag = tags[0]
            if tag not in live:
                tags.popleft()
            elif tag in acked:
                tags.popleft()
                live.discard(tag)
                covered.append(acked.pop(tag))
                top = tag
            else:
                break
        singles = list(acked)
        waiters = list(acked.values())
        live.difference_update(singles)
        acked.clear()
        return top, covered, singles, waiters


class _Acker:
    """The acks of one subscription, from ``ack()`` to RabbitMQ: owns the :class:`_AckBook` of
    each channel it consumed on, the flush task that sends the acks of a loop tick as one
    ``multiple=True`` frame (plus single frames above a gap), and the ``basic.qos`` round trips
    that ``ack_confirmed()`` waits for. Never sends a frame after the subscription began closing
    its channel, or once it was abandoned (as a crash: unsent acks stay unsent)."""

    def __init__(self, sub: _RabbitSubscription) -> None:
        self._sub = sub
        #: closed as a crash: no ack that is not on the wire yet may go out any more
        self.abandoned = False
        #: the ack book of the channel delivering now, and every book with acks still to send
        self.book: _AckBook | None = None
        self._books: list[_AckBook] = []
        self.flusher: asyncio.Future[None] | None = None
        #: per channel, the round trip that the next ``barrier`` callers share (not sent yet)
        self._barriers: dict[AbstractChannel, asyncio.Future[bool]] = {}
        self.barrier_tasks: set[asyncio.Task[None]] = set()

    def track(self, message: DeliveredMessage) -> None:
        """Enter ``message``'s tag in its channel's book (a new channel starts a new book)."""
        tag = message.delivery_tag
        channel = message.channel
        if channel.is_closed:
            return  # RabbitMQ requeued it with the channel; _wrap drops it
        book = self.book
        if book is None or book.channel is not channel:
            # a new channel (first open or a reconnect): its tags start again at 1
            book = self.book = _AckBook(channel)
            self._books = [b for b in self._books if b.acked]
            self._books.append(book)
        if tag:
            book.receive(tag)

    def book_of(self, message: DeliveredMessage) -> _AckBook | None:
        """The book tracking ``message``'s tag; None when none does (its ack goes alone)."""
        book = self.book
        if book is not None and (
            book.channel is not message.channel or message.delivery_tag not in book.live
        ):
            return None
        return book

    async def ack(self, d: RabbitMQDelivery) -> bool:
        """Ack ``d`` through its channel's book: sent on the next loop tick, together with every
        other ack of that tick (one ``multiple=True`` frame for a contiguous run). True once a
        frame covering it is written; False when the channel closed first."""
        book = d._book
        tag = d.tag
        if book is None or tag not in book.live or tag in book.acked:
            return await _settle_quietly(d, "ack", lambda m: m.ack())
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        book.acked[tag] = fut
        if book is not self.book and book not in self._books:
            self._books.append(book)  # an older channel's: the flush finds it dead, drops it
        if self.flusher is None:
            self.flusher = asyncio.ensure_future(self._flush())
        return await fut

    async def _flush(self) -> None:
        try:
            while True:
                await asyncio.sleep(0)  # the other acks of this tick (the batch) join
                books = [b for b in self._books if b.acked]
                if not books:
                    return
                for book in books:
                    await self._send(book)
                self._books = [b for b in self._books if b is self.book or b.acked]
        finally:
            self.flusher = None

    async def _send(self, book: _AckBook) -> None:
        top, covered, singles, waiters = book.take()
        aiormq = _driver_aiormq()
        covered_sent = False
        singles_sent = 0
        try:
            for tag, multiple in (
                *(((top, True),) if top is not None else ()),
                *((t, False) for t in singles),
            ):
                # checked right before each frame: never a frame after our own channel.close
                # (see _settle_quietly), never a tag of a dead channel on another one
                if self._sub._channel_closing or self.abandoned or book.channel.is_closed:
                    break
                await book.channel.basic_ack(delivery_tag=tag, multiple=multiple)
                if multiple:
                    covered_sent = True
                else:
                    singles_sent += 1
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError, OSError) as exc:
            log.warning(
                "acks not delivered to RabbitMQ (%s: %s) on %s; the channel is closed, so the "
                "broker requeued those messages and will redeliver them (the ledger answers "
                "the copies)",
                type(exc).__name__,
                exc,
                self._sub.topology.queue,
            )
        finally:
            missed = (0 if covered_sent else len(covered)) + len(waiters) - singles_sent
            if missed > 0:
                log.warning(
                    "%d acks on %s not sent: the channel closed (or is closing) first, so "
                    "RabbitMQ requeues those messages and will redeliver them",
                    missed,
                    self._sub.topology.queue,
                )
            for fut in covered:
                if not fut.done():
                    fut.set_result(covered_sent)
            for i, fut in enumerate(waiters):  # singles go out in order
                if not fut.done():
                    fut.set_result(i < singles_sent)

    async def barrier(self, channel: AbstractChannel) -> bool:
        """One synchronous round trip on ``channel`` after the caller's ack frame was written:
        True once RabbitMQ answered it, which it does only after processing every frame sent
        before it on that channel; False when the channel closed (or is closing) first.

        Coalesced: the callers of one loop tick (the ``ack_confirmed()`` calls of a batch, whose
        acks went out in one flush) share one round trip. A caller that comes after the shared
        one was sent waits for the next: its ack may have been written after it."""
        fut = self._barriers.get(channel)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._barriers[channel] = fut
            task = asyncio.ensure_future(self._send_barrier(channel, fut))
            self.barrier_tasks.add(task)
            task.add_done_callback(self.barrier_tasks.discard)
        # shielded: one caller cancelled must not cancel the round trip the others wait for
        return await asyncio.shield(fut)

    async def _send_barrier(self, channel: AbstractChannel, fut: asyncio.Future[bool]) -> None:
        aiormq = _driver_aiormq()
        answered = False
        try:
            await asyncio.sleep(0)  # the other callers of this tick join
            if self._barriers.get(channel) is fut:
                del self._barriers[channel]  # later callers start the next one
            # never a frame after our own channel.close (see _settle_quietly)
            if self._sub._channel_closing or self.abandoned or channel.is_closed:
                return
            # basic.qos with the prefetch the channel already has: answered by the channel
            # process itself, in order, with no other effect (global=False only sets the
            # prefetch of consumers created later, and it is the same value)
            await channel.basic_qos(
                prefetch_count=self._sub.prefetch * _QOS_FACTOR,
                timeout=self._sub.broker.confirm_timeout,
            )
            answered = True
        except TimeoutError:  # before OSError, of which it is a subclass
            # aiormq closes a channel whose call timed out: RabbitMQ requeues what it held
            log.warning(
                "RabbitMQ did not confirm the acks sent on %s within %gs; the channel is "
                "closed, so those messages may come back or be gone",
                self._sub.topology.queue,
                self._sub.broker.confirm_timeout,
            )
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError, OSError) as exc:
            log.warning(
                "RabbitMQ did not confirm the acks sent on %s (%s: %s): the channel closed, so "
                "those messages may come back or be gone",
                self._sub.topology.queue,
                type(exc).__name__,
                exc,
            )
        finally:
            if self._barriers.get(channel) is fut:
                del self._barriers[channel]
            if not fut.done():
                fut.set_result(answered)

    def drop(self) -> None:
        """Abandon acks not yet sent (they stay unacked: RabbitMQ requeues them) and wake their
        waiters."""
        for book in self._books:
            for fut in book.acked.values():
                if not fut.done():
                    fut.set_result(False)
            book.acked.clear()

    async def abandon(self) -> None:
        """As a crash: acks not yet written stay unacked (their messages come back) and acks
        not yet confirmed stay unconfirmed for their waiters."""
        self.abandoned = True
        flusher = self.flusher
        if flusher is not None:
            flusher.cancel()
            await asyncio.wait({flusher})
        if self.barrier_tasks:
            for task in list(self.barrier_tasks):
                task.cancel()
            await asyncio.wait(list(self.barrier_tasks))

    async def drain(self) -> None:
        """Wait until the acks already made are sent and the confirmations asked for are
        answered (a graceful close: they are not redelivered)."""
        if self.flusher is not None:
            await asyncio.wait({self.flusher})
        while self.barrier_tasks:
            await asyncio.wait(list(self.barrier_tasks))
