"""Publishing to RabbitMQ: confirmed, ``mandatory`` publishes on one confirm-mode channel, and the
delayed-nack copies sent to the retry queues."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from replaysafe.brokers.rabbitmq._driver import _driver_aiormq
from replaysafe.brokers.rabbitmq.topology import Topology
from replaysafe.brokers.rabbitmq.wire import (
    _PERSISTENT,
    ATTEMPTS_HEADER,
    KEY_HEADER,
    _is_transport,
)
from replaysafe.envelope import HEADER_MALFORMED_TRANSPORT, Envelope
from replaysafe.errors import BrokerUnavailable, ConfigurationError, PublishAmbiguous
from replaysafe.failpoints import PUBLISH_AFTER_ACCEPT, PUBLISH_BEFORE_ACCEPT

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustChannel
    from aiormq.abc import AbstractChannel

    from replaysafe.brokers.rabbitmq.broker import RabbitMQBroker
    from replaysafe.brokers.rabbitmq.delivery import RabbitMQDelivery


class _Publisher:
    """The publishing side of one broker: owns the confirm-mode channel (on the publish
    connection) and the one-publish-per-message-id rule that keeps aiormq from swapping the
    outcomes of two concurrent publishes of one operation."""

    def __init__(self, broker: RabbitMQBroker) -> None:
        self._broker = broker
        self._channel: AbstractRobustChannel | None = None
        # one publish per message_id at a time: aiormq matches a basic.return to its publish by
        # message_id, so two concurrent publishes of one operation could swap their outcomes
        self._sending: dict[str, asyncio.Future[None]] = {}

    async def _underlay(self) -> AbstractChannel:
        """The confirm-mode channel's current underlying channel (waits out a reconnect)."""
        broker = self._broker
        conn = await broker._connection("publish")
        if self._channel is None:
            self._channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        try:
            async with asyncio.timeout(broker.connect_timeout):
                return await self._channel.get_underlay_channel()
        except TimeoutError:
            raise BrokerUnavailable(
                f"RabbitMQ at {broker.url} is not reachable (reconnecting for more than "
                f"{broker.connect_timeout}s); nothing was sent, retry later"
            ) from None

    async def publish(self, destination: str, envelopes: Sequence[Envelope]) -> None:
        """:meth:`RabbitMQBroker.publish` (see there), on an open broker, for a non-empty
        ``envelopes``."""
        broker = self._broker
        clock, failpoints = broker.clock, broker.failpoints
        await broker.declare(destination)
        for env in envelopes:
            if KEY_HEADER in env.headers or ATTEMPTS_HEADER in env.headers:
                raise ConfigurationError(
                    f"headers {KEY_HEADER!r} and {ATTEMPTS_HEADER!r} are reserved by the "
                    "RabbitMQ adapter; rename your header"
                )
        sent: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        try:
            for env in envelopes:
                ctx: dict[str, Any] = {
                    "operation_id": env.operation_id,
                    "destination": destination,
                    "sleep": clock.sleep,
                }
                await failpoints.hit(PUBLISH_BEFORE_ACCEPT, ctx)
                headers: dict[str, Any] = env.wire_headers()
                if env.key is not None:
                    headers[KEY_HEADER] = env.key
                props = self._properties(
                    content_type=env.content_type,
                    headers=headers,
                    message_id=env.operation_id,
                    timestamp=datetime.fromtimestamp(clock.now(), UTC),
                )
                sent.append(
                    (ctx, asyncio.ensure_future(self._send(destination, "", env.payload, props)))
                )
            for ctx, fut in sent:
                await fut
                await failpoints.hit(PUBLISH_AFTER_ACCEPT, ctx)
        finally:
            pending = [f for _, f in sent if not f.done()]
            if pending:
                # outcomes we will not report (an earlier one failed, or we are cancelled): let
                # them finish (bounded by confirm_timeout) so nothing is left running
                await asyncio.wait(pending)
            for _, f in sent:
                if f.done() and not f.cancelled():
                    f.exception()  # retrieved: the first failure is the one raised

    @staticmethod
    def _properties(**fields: Any) -> Any:
        """AMQP properties of a persistent message."""
        aiormq = _driver_aiormq()
        return aiormq.spec.Basic.Properties(delivery_mode=_PERSISTENT, **fields)

    async def _send(self, exchange: str, routing_key: str, body: bytes, properties: Any) -> None:
        """One publish with ``mandatory=True``, confirmed; driver errors mapped (see publish)."""
        aiormq = _driver_aiormq()
        message_id: str | None = properties.message_id
        done: asyncio.Future[None] | None = None
        if message_id is not None:
            while (prev := self._sending.get(message_id)) is not None:
                await asyncio.wait({prev})
            done = asyncio.get_running_loop().create_future()
            self._sending[message_id] = done
        where = f"exchange {exchange!r}" if exchange else f"queue {routing_key!r}"
        what = f"{message_id!r} to {where}"
        broker = self._broker
        try:
            channel = await self._underlay()
            if channel.is_closed:
                raise BrokerUnavailable(
                    f"the publishing channel to {broker.url} is closed (reconnecting); {what} was "
                    "not sent, retry"
                )
            try:
                result = await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=True,
                    timeout=broker.confirm_timeout,
                )
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # our caller's cancellation
                raise PublishAmbiguous(
                    f"the channel closed while {what} awaited its confirm; retry with the SAME "
                    "operation id"
                ) from None
            except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
                if isinstance(exc, aiormq.exceptions.PublishError):
                    if not exchange:  # a deleted retry queue: declare it again
                        broker._admin.forget(queue=routing_key)
                elif isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
                    broker._admin.forget(exchange=exchange, queue=routing_key)
                raise broker._errors.publish_error(
                    exc,
                    what=what,
                    where=where,
                    target=exchange or routing_key,
                    confirm_timeout=broker.confirm_timeout,
                ) from None
            if not isinstance(result, aiormq.spec.Basic.Ack):
                raise PublishAmbiguous(
                    f"RabbitMQ answered {what} with {type(result).__name__}, not a confirm; "
                    "retry with the SAME operation id"
                )
        finally:
            if message_id is not None and done is not None:
                self._sending.pop(message_id, None)
                done.set_result(None)

    async def republish_delayed(
        self, topo: Topology, band: int, d: RabbitMQDelivery, seconds: float
    ) -> None:
        """Publish ``d``'s copy to the retry queue of ``band`` with a ``seconds`` TTL; returns
        once RabbitMQ confirmed it."""
        queue = await self._broker._admin.ensure_retry_queue(topo, band)
        m = d.message
        # keep what the producer sent; drop RabbitMQ's bookkeeping (it re-adds its own)
        headers = {
            k: v for k, v in d.amqp_headers.items() if not _is_transport(k) or k == KEY_HEADER
        }
        headers[ATTEMPTS_HEADER] = d.attempt
        if d.undecodable:
            # the copy's properties are clean; it must be refused the same way as the original
            headers[HEADER_MALFORMED_TRANSPORT] = d.headers[HEADER_MALFORMED_TRANSPORT]
        props = self._properties(
            content_type=m.content_type,
            content_encoding=m.content_encoding,
            headers=headers,
            message_id=m.message_id,
            correlation_id=m.correlation_id,
            reply_to=m.reply_to,
            message_type=m.type,
            app_id=m.app_id,
            # the first publish time stays the broker timestamp of every copy
            timestamp=m.timestamp,
            # RabbitMQ rounds nothing up: never early
            expiration=str(max(1, math.ceil(seconds * 1000))),
        )
        await self._send("", queue, d.body, props)
