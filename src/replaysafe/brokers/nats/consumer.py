"""A subscription: one pull subscription bound to a group's durable consumer.

Each fetch asks the server for up to ``prefetch`` messages and waits at most ``fetch_wait``
seconds (then asks again): a pull request outlives a closed subscription by at most that long,
and a message it still takes waits out ``ack_wait`` like any unsettled one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from replaysafe.brokers.base import Delivery, Subscription
from replaysafe.brokers.nats.admin import ConsumerLimits
from replaysafe.brokers.nats.delivery import (
    HEADER_DEAD_LETTER_FROM,
    HEADER_REJECT_REASON,
    NATSDelivery,
)

if TYPE_CHECKING:
    from replaysafe.brokers.nats.broker import NATSBroker

log = logging.getLogger("replaysafe.brokers.nats")


class NATSSubscription(Subscription):
    """Deliveries of ``group`` on ``source``, fetched in batches of up to ``prefetch``."""

    def __init__(
        self,
        broker: NATSBroker,
        source: str,
        group: str,
        psub: Any,
        *,
        stream: str,
        durable: str,
        dead_letter: str,
        limits: ConsumerLimits,
        prefetch: int,
    ) -> None:
        self.broker = broker
        self.source = source
        self.group = group
        self.stream = stream
        self.durable = durable
        self.dead_letter_subject = dead_letter
        self.limits = limits
        self._psub = psub
        self._prefetch = prefetch
        self._buffer: deque[NATSDelivery] = deque()
        self._unsettled: set[NATSDelivery] = set()
        self._closed = asyncio.Event()
        self._fetch_lock = asyncio.Lock()

    # ------------------------------------------------------------------ iteration

    async def __anext__(self) -> Delivery:
        while True:
            if self._closed.is_set():
                raise StopAsyncIteration
            if self._buffer:
                return self._hand_out()
            async with self._fetch_lock:
                if not self._buffer and not self._closed.is_set():
                    await self._fill()

    async def next_batch(self, max_items: int) -> list[Delivery]:
        """One delivery (waiting for it), then whatever else the last fetch brought, up to
        ``max_items`` in all."""
        first = await self.__anext__()
        out = [first]
        while self._buffer and len(out) < max_items:
            out.append(self._hand_out())
        return out

    def _hand_out(self) -> NATSDelivery:
        d = self._buffer.popleft()
        self._unsettled.add(d)
        return d

    def on_settled(self, d: NATSDelivery) -> None:
        self._unsettled.discard(d)

    async def _fill(self) -> None:
        """One pull request (``fetch_wait`` seconds at most), racing ``close``."""
        cfg = self.broker.config
        fetch = asyncio.ensure_future(self._psub.fetch(self._prefetch, timeout=cfg.fetch_wait))
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({fetch, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not fetch.done():
                fetch.cancel()
                # the driver keeps what already arrived in its queue for the next fetch
                await asyncio.wait({fetch})
        if fetch.cancelled():
            return
        exc = fetch.exception()
        if exc is not None:
            if isinstance(exc, asyncio.TimeoutError | self.broker.drv.errors.TimeoutError):
                return  # nothing arrived within fetch_wait: ask again
            raise self.broker.map(exc, f"fetching from {self.durable!r} on {self.stream!r}")
        now = self.broker.clock.now()
        for msg in fetch.result():
            d = NATSDelivery(self, msg, received_at=now)
            if (
                self.limits.spare
                and self.limits.limit is not None
                and d.attempt > self.limits.limit
            ):
                # the spare delivery after a crash on the last attempt: never a handler's
                await self._exhausted(d)
                continue
            self._buffer.append(d)

    async def _exhausted(self, d: NATSDelivery) -> None:
        try:
            await d.reject(f"max_deliver reached: attempt {d.attempt - 1} was never settled")
        except Exception as exc:
            # the server delivers it no more: log loudly, the stream still holds it
            log.error(
                "NATS: could not dead-letter exhausted %s (%s); it stays in stream %s at "
                "sequence %d, delivered to no one",
                d.delivery_id,
                exc,
                self.stream,
                d.stream_sequence,
            )

    # ------------------------------------------------------------------ dead letter

    async def dead_letter(self, d: NATSDelivery, reason: str) -> None:
        """Publish a copy of ``d`` to the dead-letter subject (awaiting its PubAck), then
        terminate the original. The copy's ``Nats-Msg-Id`` is ``<stream>:<sequence>``, so a
        retry after a crash between the two is dropped by the dead-letter stream's window."""
        headers = dict(d.raw_headers)
        headers = {k: v for k, v in headers.items() if not k.lower().startswith("nats-")}
        headers[HEADER_REJECT_REASON] = reason.replace("\r", " ").replace("\n", " ")
        headers[HEADER_DEAD_LETTER_FROM] = self.source
        await self.broker.publish_raw(
            self.dead_letter_subject,
            d.body,
            headers,
            msg_id=f"{self.stream}:{d.stream_sequence}",
            what=f"the dead-letter copy of {d.delivery_id}",
        )
        await d.terminate()

    # ------------------------------------------------------------------ close

    async def close(self, *, abandon: bool = False) -> None:
        """Stop consuming (idempotent). Every ``extend`` keep-alive stops. A graceful close
        hands buffered messages (never given to a handler) back at once with ``-NAK``;
        ``abandon=True`` (a crash) leaves them, and unsettled deliveries, to ``ack_wait``."""
        if self._closed.is_set():
            return
        self._closed.set()
        for d in self._unsettled:
            d.stop_keepalive()
        buffered = list(self._buffer)
        self._buffer.clear()
        if not abandon:
            for d in buffered:
                if d.last_attempt:
                    continue  # a nack would strand it: the spare delivery dead-letters it
                try:
                    await d.hand_back()
                except Exception as exc:
                    log.debug("NATS: nak of buffered %s on close failed: %s", d.delivery_id, exc)
        async with self._fetch_lock:
            try:
                await self._psub.unsubscribe()
            except Exception as exc:
                log.debug("NATS: unsubscribe of %s failed: %s", self.durable, exc)
        self.broker.forget(self)

    def __repr__(self) -> str:
        return (
            f"<NATSSubscription {self.source!r} group={self.group!r} durable={self.durable!r} "
            f"stream={self.stream!r}>"
        )


__all__ = ["NATSSubscription"]
