"""Deliveries and settling: one received copy of an SQS message (:class:`SQSDelivery`) and the
requests that settle it -- deletes coalesced into ``DeleteMessageBatch`` calls, visibility
changes, hand-backs on close and dead-letter copies."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Final

from replaysafe.brokers.base import Delivery
from replaysafe.brokers.sqs.admin import _Queue
from replaysafe.brokers.sqs.client import _Connection
from replaysafe.brokers.sqs.wire import (
    _INVALID_TEXT,
    CONTENT_TYPE,
    HEADER_BODY_ENCODING,
    HEADER_KEY,
    HEADER_REJECT_REASON,
    MAX_ATTRIBUTES,
    MAX_BATCH,
    MAX_VISIBILITY,
    _timestamp,
)
from replaysafe.clock import Clock
from replaysafe.envelope import HEADER_OPERATION_ID
from replaysafe.errors import BrokerError, BrokerUnavailable, ConfigurationError, ReplaysafeError

log = logging.getLogger("replaysafe.brokers.sqs")

#: seconds before a copy's visibility deadline after which its delete no longer confirms the
#: completion (``SQSDelivery.ack_confirmed``): the receive clock starts after SQS started the timer
CONFIRM_MARGIN: Final = 0.5


class SQSDelivery(Delivery):
    """One received copy of an SQS message, identified by its receipt handle.

    Settling marks the copy settled first (a second settle does nothing), then calls SQS:
    ``ack`` deletes (batched), ``nack`` changes the visibility, ``reject`` copies to the queue's
    dead-letter queue (when its redrive policy names one) and then deletes.
    """

    #: always known on SQS: receive time + visibility timeout (moved by ``extend``)
    settle_deadline: float

    def __init__(
        self,
        message: Mapping[str, Any],
        *,
        queue: _Queue,
        settler: _Settler,
        on_settled: Callable[[SQSDelivery], None],
        received_at: float,
        visibility: int,
    ) -> None:
        """Decode one ``ReceiveMessage`` entry of ``queue``, received at ``received_at`` and
        hidden for ``visibility`` seconds; its settle calls go through ``settler``, and
        ``on_settled`` is told (once) when it is settled."""
        attributes = message.get("Attributes") or {}
        raw_attributes: dict[str, Any] = dict(message.get("MessageAttributes") or {})
        headers: dict[str, str] = {}
        for name, value in raw_attributes.items():
            if "StringValue" in value:
                headers[name] = str(value["StringValue"])
            elif "BinaryValue" in value:
                headers[name] = base64.b64encode(bytes(value["BinaryValue"])).decode("ascii")
        text = str(message.get("Body", ""))
        body = text.encode("utf-8", "surrogatepass")
        if headers.get(HEADER_BODY_ENCODING) == "base64":
            try:
                body = base64.b64decode(text, validate=True)
                headers.pop(HEADER_BODY_ENCODING)
            except (binascii.Error, ValueError):
                # never raise here: the runtime sees the undecoded text and the marker, and
                # quarantines the message when it does not decode
                log.warning(
                    "SQS message %s: rs-body-encoding=base64 but the body is not base64",
                    message.get("MessageId"),
                )
        key = headers.pop(HEADER_KEY, None)
        if key is None and queue.fifo:
            group = attributes.get("MessageGroupId")
            key = None if group in (None, settler.default_group) else str(group)
        self.body = body
        self.headers = headers
        self.content_type = headers.get(CONTENT_TYPE)
        self.key = key
        self.broker_timestamp = _timestamp(attributes.get("SentTimestamp"))
        try:
            self.attempt = max(1, int(attributes.get("ApproximateReceiveCount", 1)))
        except (TypeError, ValueError):
            self.attempt = 1
        self.message_id = str(message.get("MessageId", ""))
        self.delivery_id = f"{queue.name}/{self.message_id}#{self.attempt}"
        self.redelivered = self.attempt > 1
        self.received_at = received_at
        self.settle_deadline = received_at + visibility
        self.receipt_handle = str(message.get("ReceiptHandle", ""))
        self._settler = settler
        self._on_settled = on_settled
        self._queue = queue
        self._raw_body = text
        self._raw_attributes = raw_attributes
        self._system_attributes = dict(attributes)
        self._settled = False
        #: why SQS refused to delete this receipt (set by the delete batch), else None
        self._delete_refused: str | None = None

    @property
    def settled(self) -> bool:
        return self._settled

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self._on_settled(self)
        return True

    async def ack(self) -> None:
        """Delete the message (COMPLETED), in a ``DeleteMessageBatch`` shared with the acks of
        the next ``delete_window`` seconds. A delete SQS refuses for this message is logged and
        counted (``delete_failures``), not raised: the message comes back and the ledger answers
        it. When the delete call itself failed, raises the mapped error (``BrokerUnavailable``;
        ``ConfigurationError`` if the queue is gone); the message then comes back when its
        visibility expires. Either way the delivery counts as settled."""
        if self._settle():
            await self._settler.delete(self._queue, self)

    async def ack_confirmed(self) -> None:
        """``ack()``, raising ``BrokerUnavailable`` unless the delete is known to have removed
        the message: SQS refused it for this receipt, or it was answered after this copy's
        visibility timeout (less ``CONFIRM_MARGIN`` seconds) ran out. SQS may then have handed
        the message to another consumer, and AWS documents that a delete with an older receipt
        handle "succeeds" without deleting the message. Also raised when the delivery was
        already settled; the mapped error when the delete call itself failed."""
        if not self._settle():
            raise BrokerUnavailable(
                f"SQS: {self.delivery_id} was already settled, so this ack cannot be confirmed; "
                "do not run an at-most-once effect for it"
            )
        await self._settler.delete(self._queue, self)
        if self._delete_refused is not None:
            why = f"SQS refused the delete ({self._delete_refused})"
        elif self._settler.clock.now() > self.settle_deadline - CONFIRM_MARGIN:
            why = "the delete was answered after this copy's visibility timeout ran out"
        else:
            return
        raise BrokerUnavailable(
            f"SQS: the completion of {self.delivery_id} is not confirmed: {why}; another "
            "consumer may have the message, so do not run an at-most-once effect for it"
        )

    async def nack(self, delay: float | None = None) -> None:
        """Make the message visible again after ``delay`` seconds (at once for None/0; rounded
        up to whole seconds, at most 12 hours). A refusal because the receipt is stale is
        ignored: the message is already back."""
        if self._settle():
            seconds = min(MAX_VISIBILITY, math.ceil(max(0.0, delay or 0.0)))
            await self._settler.change_visibility(self, seconds, strict=False)

    async def reject(self, reason: str) -> None:
        """Settle without redelivery. If the queue's redrive policy names a dead-letter queue, a
        copy (body, attributes and ``rs-reject-reason``) is sent there and confirmed *before* the
        original is deleted; if that send fails, ``BrokerUnavailable`` is raised and the original
        is not deleted (it comes back when its visibility expires). Without a dead-letter queue
        the message is deleted and the reason only logged."""
        if self._settle():
            if self._queue.dead_letter_url is not None:
                await self._settler.dead_letter(self, reason)
            else:
                log.warning(
                    "SQS queue %s has no dead-letter queue: rejected message %s is deleted "
                    "(reason: %s)",
                    self._queue.name,
                    self.message_id,
                    reason,
                )
            await self._settler.delete(self._queue, self)

    async def extend(self, seconds: float) -> None:
        """Hide the message until ``now + seconds`` (``ChangeMessageVisibility``, rounded up to
        whole seconds, at most 12 hours). A no-op once settled. Raises ``BrokerError`` when SQS
        refuses (the receipt is stale: the message may already be with another consumer) and
        ``BrokerUnavailable`` when the call failed."""
        if seconds < 0:
            raise ValueError(f"extend(seconds) needs seconds >= 0, got {seconds}")
        if self._settled:
            return
        whole = min(MAX_VISIBILITY, math.ceil(seconds))
        # SQS starts the new timer somewhere during the call: count from before it (earlier)
        started = self._settler.clock.now()
        await self._settler.change_visibility(self, whole, strict=True)
        self.settle_deadline = started + whole

    def __repr__(self) -> str:
        return (
            f"<SQSDelivery {self.delivery_id} op={self.headers.get(HEADER_OPERATION_ID)!r} "
            f"settled={self._settled}>"
        )


class _DeleteBatcher:
    """Coalesces acks on one queue into ``DeleteMessageBatch`` calls of up to 10 entries: a batch
    goes out when it is full or ``window`` seconds after its first entry. Each ack waits for its
    own entry's result. A cancelled ack does not withdraw its entry: the delete still happens."""

    def __init__(self, settler: _Settler, queue: _Queue) -> None:
        self._settler = settler
        self._queue = queue
        self._pending: list[tuple[SQSDelivery, asyncio.Future[None]]] = []
        self._timer: asyncio.Task[None] | None = None

    async def delete(self, d: SQSDelivery) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((d, fut))
        if len(self._pending) >= MAX_BATCH:
            self._send(self._pending[:MAX_BATCH])
            del self._pending[:MAX_BATCH]
        elif self._timer is None:
            self._timer = self._settler.spawn(self._after_window(), "sqs-delete-window")
        await fut

    async def _after_window(self) -> None:
        try:
            await asyncio.sleep(self._settler.delete_window)
        finally:
            self._timer = None
        self.flush()

    def flush(self) -> None:
        """Send everything pending now (also used on close)."""
        while self._pending:
            self._send(self._pending[:MAX_BATCH])
            del self._pending[:MAX_BATCH]

    def _send(self, batch: list[tuple[SQSDelivery, asyncio.Future[None]]]) -> None:
        self._settler.spawn(self._delete_batch(batch), "sqs-delete")

    async def _delete_batch(self, batch: list[tuple[SQSDelivery, asyncio.Future[None]]]) -> None:
        entries = [
            {"Id": str(i), "ReceiptHandle": d.receipt_handle} for i, (d, _) in enumerate(batch)
        ]
        try:
            response = await self._settler.conn.call(
                "delete",
                "delete_message_batch",
                "delete",
                self._queue.name,
                QueueUrl=self._queue.url,
                Entries=entries,
            )
        except ReplaysafeError as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
                    # retrieved here so a cancelled ack does not log "never retrieved"
                    fut.exception()
            return
        except BaseException as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.cancel()
            raise exc
        try:
            for failure in response.get("Failed") or []:
                d, _ = batch[int(failure["Id"])]
                self._settler.delete_failures += 1
                d._delete_refused = f"{failure.get('Code')}: {failure.get('Message')}"
                # the message stays in the queue and comes back; the ledger answers the copy
                log.warning(
                    "SQS refused to delete %s (%s: %s); it will be delivered again and the "
                    "ledger will answer it",
                    d.delivery_id,
                    failure.get("Code"),
                    failure.get("Message"),
                )
        except Exception as exc:
            # an unreadable response must not leave the acks waiting forever
            log.exception("unreadable DeleteMessageBatch response on %s", self._queue.name)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(
                        BrokerError(
                            f"SQS DeleteMessageBatch on {self._queue.name!r} answered in a way "
                            f"replaysafe cannot read ({exc!r}); the messages may come back and "
                            "the ledger will answer them"
                        )
                    )
                    fut.exception()
            return
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)


class _Settler:
    """The settle side of the broker: owns the per-queue delete batchers and the count of deletes
    SQS refused (``SQSBroker.delete_failures``), and makes the visibility changes, hand-backs and
    dead-letter copies a delivery's settle calls need. Background requests go through ``spawn``
    (the broker's task set, which ``close`` waits for)."""

    def __init__(
        self,
        conn: _Connection,
        *,
        clock: Clock,
        default_group: str,
        delete_window: float,
        spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]],
    ) -> None:
        self.conn = conn
        self.clock = clock
        self.default_group = default_group
        self.delete_window = delete_window
        self.spawn = spawn
        #: queue name -> its delete batcher
        self.batchers: dict[str, _DeleteBatcher] = {}
        self.delete_failures = 0

    async def delete(self, queue: _Queue, d: SQSDelivery) -> None:
        """Delete ``d`` through its queue's batcher (see ``SQSDelivery.ack`` for the outcomes)."""
        batcher = self.batchers.get(queue.name)
        if batcher is None:
            batcher = self.batchers[queue.name] = _DeleteBatcher(self, queue)
        await batcher.delete(d)

    def flush(self) -> None:
        """Send every pending delete now (close)."""
        for batcher in self.batchers.values():
            batcher.flush()

    async def change_visibility(self, d: SQSDelivery, seconds: int, *, strict: bool) -> None:
        """Hide ``d`` for ``seconds`` from now. SQS refusing its receipt raises ``BrokerError``
        when ``strict`` (``extend``), else is only logged (``nack``: the message is back anyway);
        a failed call raises the mapped error."""
        try:
            await self.conn.call(
                "change_visibility",
                "change_message_visibility",
                "ChangeMessageVisibility",
                d._queue.name,
                QueueUrl=d._queue.url,
                ReceiptHandle=d.receipt_handle,
                VisibilityTimeout=seconds,
            )
        except ConfigurationError as exc:
            # SQS refused this receipt (expired, deleted, past the 12-hour limit)
            if strict:
                raise BrokerError(
                    f"SQS refused to change the visibility of {d.delivery_id}: {exc}. The "
                    "message may already be visible to other consumers; the ledger lease still "
                    "guards the effect"
                ) from exc
            log.info("visibility of %s not changed (%s); it returns on its own", d.delivery_id, exc)

    async def return_now(self, queue: _Queue, deliveries: Sequence[SQSDelivery]) -> None:
        """Make ``deliveries`` visible at once (graceful close). Failures are logged only: the
        messages then come back when their visibility expires."""
        for i in range(0, len(deliveries), MAX_BATCH):
            chunk = deliveries[i : i + MAX_BATCH]
            try:
                response = await self.conn.call(
                    "change_visibility",
                    "change_message_visibility_batch",
                    "ChangeMessageVisibilityBatch",
                    queue.name,
                    QueueUrl=queue.url,
                    Entries=[
                        {"Id": str(j), "ReceiptHandle": d.receipt_handle, "VisibilityTimeout": 0}
                        for j, d in enumerate(chunk)
                    ],
                )
            except ReplaysafeError as exc:
                log.warning("could not hand %d messages back at once: %s", len(chunk), exc)
                continue
            for failure in response.get("Failed") or []:
                log.info("message not handed back at once: %s", failure.get("Message"))

    async def dead_letter(self, d: SQSDelivery, reason: str) -> None:
        """Copy ``d`` to its queue's dead-letter queue; raise if SQS did not confirm it."""
        queue = d._queue
        assert queue.dead_letter_url is not None and queue.dead_letter_name is not None
        attributes: dict[str, dict[str, Any]] = {}
        for name, value in d._raw_attributes.items():
            kept = {k: value[k] for k in ("DataType", "StringValue", "BinaryValue") if k in value}
            attributes[name] = kept
        text = _INVALID_TEXT.sub("?", reason)[:1024] or "rejected"
        if len(attributes) < MAX_ATTRIBUTES:
            attributes[HEADER_REJECT_REASON] = {"DataType": "String", "StringValue": text}
        else:
            log.warning(
                "%s already has %d attributes: its dead-letter copy carries no %s (reason: %s)",
                d.delivery_id,
                MAX_ATTRIBUTES,
                HEADER_REJECT_REASON,
                reason,
            )
        params: dict[str, Any] = {
            "QueueUrl": queue.dead_letter_url,
            "MessageBody": d._raw_body,
            "MessageAttributes": attributes,
        }
        if queue.dead_letter_name.endswith(".fifo"):
            system = d._system_attributes
            params["MessageGroupId"] = system.get("MessageGroupId") or self.default_group
            params["MessageDeduplicationId"] = system.get("MessageDeduplicationId") or d.message_id
        try:
            await self.conn.call(
                "send",
                "send_message",
                "SendMessage (dead letter)",
                queue.dead_letter_name,
                **params,
            )
        except ReplaysafeError as exc:
            raise BrokerUnavailable(
                f"could not copy rejected {d.delivery_id} to dead-letter queue "
                f"{queue.dead_letter_name!r}: {exc}; the original was NOT deleted and comes back "
                "when its visibility expires"
            ) from exc
