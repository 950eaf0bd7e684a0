"""Consuming: a long-polling subscription on one queue (``ReceiveMessage`` batches into a
bounded buffer; its deliveries settle through the broker's settler)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from replaysafe.brokers.base import Delivery, Subscription
from replaysafe.brokers.sqs.admin import _Queue
from replaysafe.brokers.sqs.delivery import SQSDelivery, _Settler
from replaysafe.brokers.sqs.wire import _SYSTEM_ATTRIBUTES, MAX_BATCH
from replaysafe.errors import ConfigurationError, ReplaysafeError

log = logging.getLogger("replaysafe.brokers.sqs")


class _SQSSubscription(Subscription):
    """A long-polling consumer on one queue.

    One background poller per subscription fills a buffer with ``ReceiveMessage`` batches; at
    most ``prefetch`` messages are buffered or handed out and unsettled at a time. The poller asks
    again only when at least half a batch fits, so a busy consumer keeps receiving in batches
    instead of one message per call. ``__anext__`` only takes from the buffer: cancelling it never
    loses a message. A buffered message whose visibility expired is dropped (SQS already made it
    visible to others; handing out the stale copy would only add an overlap).
    """

    def __init__(
        self,
        queue: _Queue,
        group: str,
        prefetch: int,
        visibility: int,
        *,
        settler: _Settler,
        wait_time: int,
        spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]],
        forget: Callable[[_SQSSubscription], None],
    ) -> None:
        self._settler = settler
        self._wait_time = wait_time
        self._spawn = spawn
        #: called on close: the broker stops tracking this subscription
        self._forget = forget
        self._queue = queue
        self._group = group
        self._prefetch = prefetch
        self._visibility = visibility
        self._batch = min(MAX_BATCH, prefetch)
        self._low_water = max(1, self._batch // 2)
        self._buffer: deque[SQSDelivery] = deque()
        self._unsettled: set[SQSDelivery] = set()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._closed = False
        self._receiving = False
        self._error: ReplaysafeError | None = None
        self._poller: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- consumer side

    async def __anext__(self) -> Delivery:
        """The next buffered delivery; waits for the poller. Raises ``StopAsyncIteration`` once
        closed, or the poller's ``ConfigurationError`` (queue deleted, access denied)."""
        while True:
            if self._closed:
                raise StopAsyncIteration
            self._drop_expired()
            if self._buffer:
                d = self._buffer.popleft()
                self._unsettled.add(d)
                return d
            if self._error is not None:
                raise self._error
            self._start()
            self._arrived.clear()
            await self._arrived.wait()

    async def next_batch(self, max_items: int) -> list[Delivery]:
        """One delivery (waiting for it), plus every other one already buffered, up to
        ``max_items``: one ``ReceiveMessage`` batch becomes one runtime batch."""
        batch: list[Delivery] = [await self.__anext__()]
        self._drop_expired()
        while len(batch) < max_items and self._buffer:
            d = self._buffer.popleft()
            self._unsettled.add(d)
            batch.append(d)
        return batch

    def _on_settled(self, d: SQSDelivery) -> None:
        self._unsettled.discard(d)
        self._room.set()

    def _drop_expired(self) -> None:
        now = self._settler.clock.now()
        while self._buffer and self._buffer[0].settle_deadline <= now:
            d = self._buffer.popleft()
            d._settled = True
            log.debug("dropped %s: its visibility expired while buffered", d.delivery_id)
            self._room.set()

    # ---------------------------------------------------------------- poller

    def _start(self) -> None:
        if self._poller is None:
            self._poller = self._spawn(self._poll(), f"sqs-poll:{self._queue.name}")

    async def _poll(self) -> None:
        failures = 0
        while not self._closed:
            self._drop_expired()
            room = self._prefetch - len(self._buffer) - len(self._unsettled)
            if room < self._low_water:
                self._room.clear()
                await self._room.wait()
                continue
            self._receiving = True
            failure: ReplaysafeError | None = None
            try:
                messages = await self._receive(min(MAX_BATCH, room))
            except ReplaysafeError as exc:
                failure, messages = exc, []
            finally:
                self._receiving = False
            if isinstance(failure, ConfigurationError):
                # the queue is gone or access is denied: waiting will not fix it
                self._error = failure
                self._arrived.set()
                return
            if failure is not None:
                failures += 1
                pause = min(5.0, 0.1 * 2**failures)
                log.warning("%s; polling %s again in %.1fs", failure, self._queue.name, pause)
                await asyncio.sleep(pause)
                continue
            failures = 0
            now = self._settler.clock.now()
            got = [
                SQSDelivery(
                    m,
                    queue=self._queue,
                    settler=self._settler,
                    on_settled=self._on_settled,
                    received_at=now,
                    visibility=self._visibility,
                )
                for m in messages
            ]
            if self._closed:
                # closed gracefully while this receive was in flight: hand them straight back
                for d in got:
                    d._settled = True
                await self._settler.return_now(self._queue, got)
                return
            self._buffer.extend(got)
            if got:
                self._arrived.set()
            elif self._wait_time == 0:
                # short polling: do not spin on an empty queue
                await asyncio.sleep(0.2)

    async def _receive(self, n: int) -> list[dict[str, Any]]:
        response = await self._settler.conn.call(
            "receive",
            "receive_message",
            "ReceiveMessage",
            self._queue.name,
            QueueUrl=self._queue.url,
            MaxNumberOfMessages=n,
            WaitTimeSeconds=self._wait_time,
            VisibilityTimeout=self._visibility,
            MessageAttributeNames=["All"],
            # AttributeNames is the older spelling; compatible servers may know only one of them
            AttributeNames=_SYSTEM_ATTRIBUTES,
            MessageSystemAttributeNames=_SYSTEM_ATTRIBUTES,
        )
        return list(response.get("Messages") or [])

    # ---------------------------------------------------------------- close

    async def close(self, *, abandon: bool = False) -> None:
        """Stop polling and wake a pending ``__anext__``. Idempotent.

        ``abandon=True`` (a crash): nothing else happens; received messages come back when their
        visibility expires, and a receive in flight is cut off (what it fetched also waits for
        the timer). Graceful: buffered and unsettled messages are made visible again at once
        (``ChangeMessageVisibility`` 0) and their deliveries become settled (a late ack does
        nothing); a receive in flight finishes in the background and hands back what it got.
        """
        if self._closed:
            return
        self._closed = True
        self._arrived.set()
        self._room.set()
        self._forget(self)
        poller = self._poller
        if abandon:
            if poller is not None:
                poller.cancel()
                await asyncio.wait({poller})
            self._buffer.clear()
            self._unsettled.clear()
            return
        if poller is not None and not self._receiving:
            poller.cancel()
            await asyncio.wait({poller})
        back = [*self._buffer, *self._unsettled]
        self._buffer.clear()
        self._unsettled.clear()
        for d in back:
            d._settled = True
        await self._settler.return_now(self._queue, back)

    def __repr__(self) -> str:
        return (
            f"<SQSSubscription {self._queue.name} group={self._group!r} "
            f"buffered={len(self._buffer)} unsettled={len(self._unsettled)} "
            f"closed={self._closed}>"
        )
