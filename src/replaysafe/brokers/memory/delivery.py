"""One transport copy of a stored message, as a consumer of the memory broker receives it."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from replaysafe.brokers.base import SettleOnce
from replaysafe.brokers.memory.store import StoredMessage
from replaysafe.errors import BrokerUnavailable

if TYPE_CHECKING:
    from replaysafe.brokers.memory.consumer import _MemorySubscription
    from replaysafe.brokers.memory.group import _Group


class _MemoryDelivery(SettleOnce):
    """One transport copy. Its settle calls are forwarded to the group, which decides whether the
    copy is still the current one (a stale copy's settle is ignored or, for SQS-like deletes,
    accepted) -- so a late settle never corrupts the group's state."""

    broker_name = "memory broker"

    def __init__(
        self,
        group: _Group,
        sub: _MemorySubscription,
        message: StoredMessage,
        *,
        delivery_id: str,
        attempt: int,
        received_at: float,
        settle_deadline: float | None,
    ) -> None:
        self.body = message.body
        # a copy per delivery: a consumer that mutates its headers cannot alter the stored message
        self.headers = dict(message.headers)
        self.content_type = message.content_type
        self.key = message.key
        self.broker_timestamp = message.timestamp
        self.delivery_id = delivery_id
        self.attempt = attempt
        self.redelivered = attempt > 1
        self.received_at = received_at
        self.settle_deadline = settle_deadline
        self.message = message
        self._group = group
        self._sub = sub
        self._settled = False

    def _settling(self) -> None:
        self._sub._unsettled.discard(self)

    async def _ack(self) -> None:
        """Complete at the broker (COMPLETED): ack / delete / mark the offset done."""
        self._group.ack(self)
        self._group.notify()

    async def ack_confirmed(self) -> None:
        """``ack()``; raises ``BrokerUnavailable`` when this copy was no longer the current one
        (its settle was ignored, or raced another receipt) or, on an offset destination, when the
        commit did not cover it within about 5 s (earlier records still unfinished)."""
        if not self._settle():
            raise self._unconfirmable()
        counted = self._group.ack(self)
        self._group.notify()
        for _ in range(5000) if counted else ():
            covered = self._group.covered(self)
            if covered:
                return
            if covered is False:
                break
            await asyncio.sleep(0.001)  # real time: the broker's clock may be a test's fake one
        raise BrokerUnavailable(
            f"memory broker: the completion of {self.delivery_id} is not confirmed (a stale "
            "copy, or no commit covered it); do not run an at-most-once effect for it"
        )

    async def _nack(self, delay: float | None) -> None:
        """Redeliver after ``delay`` seconds on the broker's clock (at once for None or <= 0)."""
        self._group.nack(self, max(0.0, delay or 0.0))
        self._group.notify()

    async def _reject(self, reason: str) -> None:
        """Settle without redelivery; the message goes to the group's dead-letter list."""
        self._group.reject(self, reason)
        self._group.notify()

    async def extend(self, seconds: float) -> None:
        """Hide the message until ``now + seconds`` (VISIBILITY_TIMEOUT destinations only; others
        raise ``CapabilityError``). A no-op once settled or once the message was received again
        elsewhere: a stale receipt must not move the current holder's timer."""
        self._group.check_extend()
        if seconds < 0:
            raise ValueError(f"extend(seconds) needs seconds >= 0, got {seconds}")
        if not self._settled:
            self._group.extend(self, seconds)
            self._group.notify()

    def __repr__(self) -> str:
        return (
            f"<MemoryDelivery {self.delivery_id} op={self.message.operation_id!r} "
            f"attempt={self.attempt} settled={self._settled}>"
        )
