"""One JetStream delivery: settling maps to JetStream's acks, one for one.

``ack`` = ``+ACK`` (written, not confirmed); ``ack_confirmed`` = the double ack (``ack_sync``:
the server answers once it holds the ack); ``nack(delay)`` = ``-NAK`` with that delay;
``reject`` = a copy published to the dead-letter subject, confirmed, then ``+TERM``;
``extend`` = ``+WPI`` (in progress), repeated until the requested deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from replaysafe.brokers.base import SettleOnce
from replaysafe.envelope import HEADER_OPERATION_ID
from replaysafe.errors import BrokerUnavailable, ReplaysafeError

if TYPE_CHECKING:
    from replaysafe.brokers.nats.consumer import NATSSubscription

log = logging.getLogger("replaysafe.brokers.nats")

#: the envelope key travels in this header (NATS messages have no key of their own)
HEADER_KEY: Final = "rs-key"
CONTENT_TYPE: Final = "content-type"
#: why a message was dead-lettered, and where from (on the dead-letter copy only)
HEADER_REJECT_REASON: Final = "rs-reject-reason"
HEADER_DEAD_LETTER_FROM: Final = "rs-dead-letter-from"
#: JetStream's own headers (Nats-Msg-Id, Nats-Expected-*): transport, never the application's
NATS_PREFIX: Final = "nats-"


def app_headers(raw: Mapping[str, str] | None) -> dict[str, str]:
    """The message's headers without JetStream's own (``Nats-*``) and the key header."""
    return {
        k: v
        for k, v in (raw or {}).items()
        if not k.lower().startswith(NATS_PREFIX) and k != HEADER_KEY
    }


class NATSDelivery(SettleOnce):
    """One delivered copy of a JetStream message (identified by stream and delivery count).

    Settling marks the copy settled first (``SettleOnce``: a second settle does nothing), stops
    any ``extend`` keep-alive, then answers the server."""

    broker_name = "NATS"
    settle_deadline: float

    def __init__(self, sub: NATSSubscription, msg: Any, *, received_at: float) -> None:
        meta = msg.metadata
        raw = dict(msg.headers or {})
        self.body = bytes(msg.data)
        self.headers = app_headers(raw)
        self.content_type = raw.get(CONTENT_TYPE)
        self.key = raw.get(HEADER_KEY)
        stamp = getattr(meta, "timestamp", None)
        self.broker_timestamp = stamp.timestamp() if stamp is not None else None
        #: JetStream's exact per-consumer delivery count
        self.attempt = max(1, int(meta.num_delivered))
        self.stream_sequence = int(meta.sequence.stream)
        self.delivery_id = f"{meta.stream}/{self.stream_sequence}#{self.attempt}"
        self.redelivered = self.attempt > 1
        self.received_at = received_at
        self.settle_deadline = received_at + sub.limits.ack_wait
        self.raw_headers = raw
        self._msg = msg
        self._sub = sub
        self._keepalive: asyncio.Task[None] | None = None

    @property
    def last_attempt(self) -> bool:
        """No further delivery will reach a handler: a nack dead-letters instead."""
        limit = self._sub.limits.limit
        return limit is not None and self.attempt >= limit

    def _settling(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self._sub.on_settled(self)

    async def _call(self, doing: str, send: Callable[[], Any]) -> Any:
        try:
            return await send()
        except ReplaysafeError:
            raise
        except Exception as exc:
            raise self._sub.broker.map(exc, f"{doing} {self.delivery_id}") from None

    async def _ack(self) -> None:
        """``+ACK`` (COMPLETED once the server reads it): returns when the ack is written to
        the connection, not when the server holds it; a crash before it arrives redelivers
        after ``ack_wait`` (the ledger answers that copy). Use ``ack_confirmed`` to know."""
        await self._call("acking", self._msg.ack)

    async def ack_confirmed(self) -> None:
        """The double ack (``ack_sync``): returns once the server answered the ack. Raises
        ``BrokerUnavailable`` when no answer came within ``publish_timeout``, when the answer
        came after this copy's ``ack_wait`` ran out (JetStream may have handed the message to
        another consumer by then), or when the delivery was already settled: in each case do
        not run an at-most-once effect for it."""
        if not self._settle():
            raise self._unconfirmable()
        timeout = self._sub.broker.config.publish_timeout
        try:
            await self._msg.ack_sync(timeout=timeout)
        except Exception as exc:
            raise BrokerUnavailable(
                f"NATS: the ack of {self.delivery_id} was not confirmed within {timeout} s "
                f"({type(exc).__name__}); the message may come back, so do not run an "
                "at-most-once effect for it"
            ) from None
        if self._sub.broker.clock.now() > self.settle_deadline:
            raise BrokerUnavailable(
                f"NATS: the ack of {self.delivery_id} was confirmed after its ack_wait ran out; "
                "another consumer may have the message, so do not run an at-most-once effect "
                "for it"
            )

    async def _nack(self, delay: float | None) -> None:
        """``-NAK``: redeliver after ``delay`` seconds (at once for None/0), the server counts
        the delay. On the last attempt (``attempt >= max_deliver``) the message goes to the
        dead-letter subject instead, as ``reject`` does: the server would not deliver it to a
        handler again."""
        if self.last_attempt:
            await self._sub.dead_letter(
                self, f"max_deliver reached: attempt {self.attempt} was nacked"
            )
            return
        wait = max(0.0, delay or 0.0)
        await self._call("nacking", lambda: self._msg.nak(delay=wait or None))

    async def _reject(self, reason: str) -> None:
        """Settle without redelivery: a copy (body, headers, ``rs-reject-reason``,
        ``rs-dead-letter-from``) is published to the dead-letter subject and its PubAck awaited,
        *then* the original is terminated (``+TERM``). A crash between the two redelivers the
        original after ``ack_wait``; rejecting it again publishes the copy with the same
        ``Nats-Msg-Id``, which the dead-letter stream drops within its duplicate window. If the
        copy cannot be stored the error is raised and the original is not terminated."""
        await self._sub.dead_letter(self, reason)

    async def hand_back(self) -> None:
        """``-NAK`` a copy no handler saw (a graceful close returns its buffer at once)."""
        await self._call("handing back", self._msg.nak)

    async def terminate(self) -> None:
        """``+TERM``: the server never redelivers this message to the group."""
        await self._call("terminating", self._msg.term)

    async def extend(self, seconds: float) -> None:
        """Keep the message from redelivery until at least ``now + seconds``.

        JetStream's ``in_progress`` (``+WPI``) cannot name a duration: it restarts the timer at
        the consumer's ``ack_wait``. So this sends one at once (the deadline becomes
        ``now + ack_wait``) and, when ``seconds`` is longer, sends more from a background task,
        the last one ``ack_wait`` before the requested deadline. ``settle_deadline`` becomes
        ``max(now + seconds, now + ack_wait)``: a shorter extension still hides the message
        for a whole ``ack_wait``. The keep-alive stops when the delivery is settled or its
        subscription closed (a crash lets the last timer run out). A no-op once settled."""
        if seconds < 0:
            raise ValueError(f"extend(seconds) needs seconds >= 0, got {seconds}")
        if self._settled:
            return
        clock = self._sub.broker.clock
        ack_wait = self._sub.limits.ack_wait
        started = clock.now()
        await self._call("extending", self._msg.in_progress)
        target = started + seconds
        server = started + ack_wait
        self.settle_deadline = max(target, server)
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if target > server:
            self._keepalive = asyncio.ensure_future(self._keep_until(target, server))

    async def _keep_until(self, target: float, server: float) -> None:
        clock = self._sub.broker.clock
        ack_wait = self._sub.limits.ack_wait
        # send each +WPI a safe distance before the server's timer runs out
        slack = min(1.0, ack_wait / 4)
        while target > server and not self._settled:
            at = min(target - ack_wait, server - slack)
            await clock.sleep(max(0.0, at - clock.now()))
            if self._settled:
                return
            sent = clock.now()
            try:
                await self._msg.in_progress()
            except Exception as exc:
                log.warning(
                    "NATS: keeping %s in progress failed (%s); it may be redelivered at %.3f",
                    self.delivery_id,
                    exc,
                    server,
                )
                self.settle_deadline = server
                return
            server = sent + ack_wait

    def stop_keepalive(self) -> None:
        """Stop extending (the subscription closed): the last timer runs out on its own."""
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def __repr__(self) -> str:
        return (
            f"<NATSDelivery {self.delivery_id} op={self.headers.get(HEADER_OPERATION_ID)!r} "
            f"settled={self._settled}>"
        )


__all__ = ["NATSDelivery", "app_headers"]
