"""One handed-out Kafka record: how its ack, nack and reject move the partition's offsets."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from replaysafe.brokers.base import Delivery
from replaysafe.brokers.kafka.offsets import TP
from replaysafe.errors import BrokerUnavailable, CapabilityError

if TYPE_CHECKING:
    from confluent_kafka import Message

    from replaysafe.brokers.kafka.consumer import _KafkaSubscription

log = logging.getLogger("replaysafe.brokers.kafka")


def _decode(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw
    # a bad byte survives as a lone surrogate: the runtime's validation then refuses the message
    # (quarantine) instead of this adapter raising or two different byte strings colliding
    return raw.decode("utf-8", "surrogateescape")


class _KafkaDelivery(Delivery):
    __slots__ = (
        "_settled",
        "_sub",
        "attempt",
        "body",
        "broker_timestamp",
        "content_type",
        "delivery_id",
        "headers",
        "key",
        "offset",
        "received_at",
        "redelivered",
        "settle_deadline",
        "token",
        "tp",
    )

    def __init__(
        self,
        sub: _KafkaSubscription,
        msg: Message,
        tp: TP,
        offset: int,
        token: int,
        attempt: int,
        received_at: float,
    ) -> None:
        raw = msg.headers() or []
        headers: dict[str, str] = {}
        content_type = None
        for name, value in raw.items() if isinstance(raw, dict) else raw:
            # a repeated name: the last value wins (Java's habit)
            text = headers[name] = (
                value.decode("utf-8", "surrogateescape") if type(value) is bytes else _decode(value)
            )
            if content_type is None and name.lower() == "content-type":
                content_type = text
        ts_type, ts_ms = msg.timestamp()
        self.body = msg.value() or b""
        self.headers = headers
        # the first name (in arrival order) that spells content-type, with its last value
        self.content_type = (
            None
            if content_type is None
            else next(v for k, v in headers.items() if k.lower() == "content-type")
        )
        key = msg.key()
        self.key = None if key is None else _decode(key)
        self.broker_timestamp = None if ts_type == sub.timestamp_na else ts_ms / 1000.0
        self.delivery_id = f"{tp[0]}/{tp[1]}@{offset}"
        self.attempt = attempt
        self.redelivered = attempt > 1
        self.received_at = received_at
        self.settle_deadline = None  # no timer: the record waits for us until the group moves
        self.tp = tp
        self.offset = offset
        self.token = token
        self._sub = sub
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        return True

    async def ack(self) -> None:
        """Mark the offset done (COMPLETED once a commit covers it -- see the module docstring)."""
        if self._settle():
            self._sub._settled_done(self)

    async def ack_confirmed(self) -> None:
        """``ack()``, then wait until a commit that covers this record is answered (at most the
        broker's ``request_timeout``). Raises ``BrokerUnavailable`` when the partition was
        revoked first, the subscription closed, or no commit was answered in time: the record
        may then be read again by the group, so the caller must not run an effect it has to
        run at most once. Also raised when the delivery was already settled."""
        sub = self._sub
        if self._settled:
            raise BrokerUnavailable(
                f"KafkaBroker: {self.delivery_id} was already settled, so this ack cannot be "
                "confirmed; do not run an at-most-once effect for it"
            )
        with sub._lock:
            generation = sub._tracker.generation(self.tp)
        await self.ack()
        await sub._commits.wait_covered(self, generation)

    async def nack(self, delay: float | None = None) -> None:
        """Rewind the partition to this offset after ``delay`` seconds (paused meanwhile): this
        record and every later record of the partition are delivered again."""
        if self._settle():
            self._sub._settled_rewind(self, max(0.0, delay or 0.0))

    async def reject(self, reason: str) -> None:
        """Skip the record: it counts as done for the commit. Kafka has no dead-letter queue; the
        runtime records the quarantine durably before it rejects."""
        if self._settle():
            log.info("rejected %s: %s", self.delivery_id, reason)
            self._sub._settled_done(self)

    async def extend(self, seconds: float) -> None:
        raise CapabilityError(
            "KafkaBroker: Kafka has no per-record timer to extend (a record waits for its "
            "consumer until the group rebalances); the runtime keeps the ledger lease instead. "
            "Keep handlers within max.poll.interval.ms, or use SQS for visibility timeouts"
        )

    def __repr__(self) -> str:
        return f"<KafkaDelivery {self.delivery_id} attempt={self.attempt} settled={self._settled}>"
