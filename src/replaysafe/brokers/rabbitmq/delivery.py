"""One RabbitMQ delivery and how it is settled: ack, confirmed ack, nack (now or delayed through
a retry queue), reject to the dead-letter queue. Which AMQP frame each one sends and what a dead
channel means for it: see the package docstring."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from replaysafe.brokers import _amqp_decode
from replaysafe.brokers.base import SettleOnce
from replaysafe.brokers.rabbitmq._driver import _driver, _driver_aiormq
from replaysafe.brokers.rabbitmq.wire import (
    _RESERVED_SORTED,
    _TRANSPORT_HEADERS,
    _TRANSPORT_PREFIXES,
    ATTEMPTS_HEADER,
    KEY_HEADER,
    _count,
    _epoch,
    _text,
    _undecodable_text,
)
from replaysafe.envelope import HEADER_MALFORMED_TRANSPORT, HEADER_OPERATION_ID, RESERVED_HEADERS
from replaysafe.errors import BrokerUnavailable, CapabilityError

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage
    from aiormq.abc import DeliveredMessage

    from replaysafe.brokers.rabbitmq.acks import _AckBook
    from replaysafe.brokers.rabbitmq.consumer import _RabbitSubscription

__all__ = ["RabbitMQDelivery"]

log = logging.getLogger("replaysafe.brokers.rabbitmq")


class RabbitMQDelivery(SettleOnce):
    """One AMQP delivery. Settling twice is harmless; a settle on a dead channel is logged, not
    raised (RabbitMQ requeued the message when the channel died)."""

    broker_name = "RabbitMQ"

    def __init__(
        self,
        sub: _RabbitSubscription,
        message: DeliveredMessage,
        book: _AckBook | None = None,
    ) -> None:
        props = message.header.properties
        frame: Any = message.delivery  # a Basic.Deliver: this adapter only consumes
        raw = dict(props.headers or {})
        #: the headers exactly as RabbitMQ delivered them (x-death, x-delivery-count, …)
        self.amqp_headers: Mapping[str, Any] = raw
        self.body = bytes(message.body)
        self.headers = {
            k: v if type(v) is str else _text(v, exact=k in RESERVED_HEADERS)
            for k, v in raw.items()
            if k not in _TRANSPORT_HEADERS and not k.startswith(_TRANSPORT_PREFIXES)
        }
        #: what the client could not decode in this message's frames (empty: everything)
        self.undecodable = (
            *_amqp_decode.undecodable(frame),
            *_amqp_decode.undecodable(props),
            # rs-* values decide identity and time: never guessed with U+FFFD (see _text)
            *_amqp_decode.undecodable_values(raw, _RESERVED_SORTED),
        )
        if self.undecodable:
            # decode_wire refuses it (malformed_transport_header): nothing of it is guessed
            self.headers[HEADER_MALFORMED_TRANSPORT] = _undecodable_text(self.undecodable)
        self.content_type = props.content_type
        key = raw.get(KEY_HEADER)
        self.key = _text(key) if key is not None else None
        self.broker_timestamp = _epoch(props.timestamp)
        #: the delivery tag on the channel that carried it
        self.tag: int = frame.delivery_tag or 0
        self.delivery_id = f"{sub.topology.queue}#{frame.consumer_tag}:{self.tag}"
        prior = _count(raw.get(ATTEMPTS_HEADER)) or 0
        # quorum queues count returns (x-delivery-count); classic queues only know "redelivered",
        # which makes the attempt a lower bound there (and wherever the header is missing)
        returns = _count(raw.get("x-delivery-count")) if sub.broker.queue_type == "quorum" else None
        self.attempt = prior + max(returns or 0, 1 if frame.redelivered else 0) + 1
        # a copy that came back through a retry queue is a new AMQP message but a redelivery
        self.redelivered = bool(frame.redelivered) or prior > 0
        self.received_at = sub.broker.clock.now()
        self.settle_deadline = None
        self._delivered = message
        self._message: AbstractIncomingMessage | None = None
        self._sub = sub
        self._settled = False
        #: the delivery tags of the channel that carried it (None: acked alone, uncoalesced)
        self._book = book

    @property
    def message(self) -> AbstractIncomingMessage:
        """The delivery as aio-pika's ``IncomingMessage`` (properties, settle methods, the channel
        that carried it). Built on first use: the consume path reads the frame itself, an
        ``IncomingMessage`` costs ~13 us per message."""
        if self._message is None:
            self._message = _driver().IncomingMessage(self._delivered, no_ack=False)
        return self._message

    def _done(self) -> None:
        # counted in flight until RabbitMQ has the settle (or the copy), not merely asked for it
        self._sub._unsettled.discard(self)
        self._sub._room.set()

    async def _ack(self) -> None:
        """``basic.ack`` (boundary COMPLETED), coalesced: returns once an ack frame that covers
        this delivery is written (a ``multiple=True`` ack for a contiguous run of acked tags,
        see :class:`_AckBook`). On a dead channel: logged; the message comes back."""
        try:
            await self._sub._acks.ack(self)
        finally:
            self._done()

    async def ack_confirmed(self) -> None:
        """``ack()``, returning only once RabbitMQ has *processed* the ack, so that no crash of
        this process from then on brings the message back.

        AMQP 0-9-1 does not confirm acks, and a written frame is not a processed one: it can
        still sit in a socket buffer or a proxy, or queued in the broker's channel process, which
        a dying connection stops without reading the rest of its mailbox. So after the ack frame
        the subscription sends one synchronous method on the same channel (``basic.qos`` with
        the prefetch it already has); RabbitMQ answers it only after it has processed every
        frame sent before it, the ack included, and has passed the ack on to the queue. The
        round trip is shared by every ``ack_confirmed()`` of one loop tick (a batch costs one).

        Raises ``BrokerUnavailable`` when the delivery was already settled, when no ack frame
        could be written (the channel closed first: RabbitMQ requeues the message), or when the
        round trip was not answered (the channel closed after the ack was sent: the message may
        come back or be gone). What is left: a RabbitMQ crash or leader change right after the
        answer can bring the message back (see docs/broker-rabbitmq.md)."""
        if not self._settle():
            raise self._unconfirmable()
        confirmed = False
        try:
            written = await self._sub._acks.ack(self)
            confirmed = written and await self._sub._acks.barrier(self._delivered.channel)
        finally:
            self._done()
        if not written:
            raise BrokerUnavailable(
                f"RabbitMQ: the ack of {self.delivery_id} was not written (the channel closed "
                "first), so RabbitMQ requeues the message; do not run an at-most-once effect for "
                "it"
            )
        if not confirmed:
            raise BrokerUnavailable(
                f"RabbitMQ: the ack of {self.delivery_id} was sent, but the channel closed before "
                "RabbitMQ confirmed it had processed it; the message may come back or be gone, "
                "so do not run an at-most-once effect for it"
            )

    async def _nack(self, delay: float | None) -> None:
        """Redeliver: at once (``basic.reject(requeue=True)``) for None/0, else through the retry
        queue after ``delay`` seconds (copy confirmed first, then the original acked)."""
        held = False
        try:
            seconds = 0.0 if delay is None else float(delay)
            if not seconds > 0:  # also NaN
                await _settle_quietly(self, "requeue", lambda m: m.reject(requeue=True))
            else:
                held = await self._sub._delay(self, seconds)
        finally:
            if not held:
                self._done()

    async def _reject(self, reason: str) -> None:
        """``basic.reject(requeue=False)``: dead-lettered into the group's ``…/dead`` queue."""
        log.info("rejecting %s to %s: %s", self.delivery_id, self._sub.topology.queue, reason)
        try:
            await _settle_quietly(self, "reject", lambda m: m.reject(requeue=False))
        finally:
            self._done()

    async def extend(self, seconds: float) -> None:
        raise CapabilityError(
            f"RabbitMQBroker: queue {self._sub.topology.queue!r} has no visibility timer to "
            "extend (a delivery stays with its consumer until settled or until its channel "
            "closes); use nack(delay=...) to postpone redelivery"
        )

    def __repr__(self) -> str:
        return (
            f"<RabbitMQDelivery {self.delivery_id} op={self.headers.get(HEADER_OPERATION_ID)!r} "
            f"attempt={self.attempt} settled={self._settled}>"
        )


async def _settle_quietly(
    d: RabbitMQDelivery, what: str, send: Callable[[AbstractIncomingMessage], Awaitable[Any]]
) -> bool:
    """Send one settle frame for ``d``, unless its subscription is closing its channel; a dead
    channel is logged, not raised. True when the frame was written."""
    if d._sub._channel_closing:
        # Never a frame after our own channel.close: RabbitMQ answers a frame on a channel it has
        # closed with a *connection* error (504 "expected 'channel.open'"), killing every other
        # subscription on the connection. The close requeues this message anyway.
        log.warning(
            "%s of %s not sent: its subscription is closing, RabbitMQ requeues the message",
            what,
            d.delivery_id,
        )
        return False
    aiormq = _driver_aiormq()
    try:
        await send(d.message)
        return True
    except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError, OSError) as exc:
        # ChannelInvalidStateError is a RuntimeError. The channel is gone: RabbitMQ has requeued
        # the message and will redeliver it; a crash-equivalent, not an error of the caller's.
        log.warning(
            "%s of %s not delivered to RabbitMQ (%s: %s); the channel is closed, so the broker "
            "requeued the message and will redeliver it (the ledger answers the copy)",
            what,
            d.delivery_id,
            type(exc).__name__,
            exc,
        )
        return False
    finally:
        # its own frame is queued (or the channel is gone): a later multiple ack may pass it
        if d._book is not None:
            d._book.settled_alone(d.tag)
