"""Amazon SQS broker adapter (aiobotocore), keeping SQS's own semantics visible.

What SQS promises, and what this adapter therefore promises (see ``docs/broker-sqs.md``):

- **Completion is DeleteMessage.** ``ack`` deletes; acks are coalesced into ``DeleteMessageBatch``
  calls of up to 10 within ``delete_window`` seconds. A delete SQS refuses for one message (an
  expired receipt handle) is logged and counted, never raised: the message comes back and the
  ledger answers the copy.
- **Redelivery is the visibility timeout.** A received message is hidden until
  ``settle_deadline``; when the timer expires it is delivered again -- to any consumer, *even while
  the first one is still working on it* (the SQS overlap; ``extend`` postpones it with
  ``ChangeMessageVisibility``). ``nack(delay)`` sets the visibility to ``delay`` (0 = at once,
  at most 12 h). A crash (``close(abandon=True)``) returns nothing early: messages come back when
  their visibility expires. A graceful ``close()`` hands unsettled and buffered messages back at
  once (visibility 0).
- **One queue is shared by every consumer**: SQS has no consumer groups (``independent_groups`` is
  False; the group name is only a label). Fan-out to several groups is SNS's job: one queue per
  group, subscribed to a topic.
- ``attempt`` is ``ApproximateReceiveCount`` (it counts receives, including a receive whose response
  never reached a handler); ``broker_timestamp`` is ``SentTimestamp``.
- **FIFO queues** (name ends in ``.fifo``): ``MessageGroupId`` is the envelope key (a default group
  for ``key=None``) and ``MessageDeduplicationId`` the operation id, so SQS drops a re-publish of
  the same operation *within 5 minutes* (``native_dedup_window=300``); order holds within a key.

Wire format: the body is the payload text (UTF-8); metadata travels as String ``MessageAttributes``
(``Envelope.wire_headers()`` plus ``content-type``). SQS allows at most 10 attributes per message:
a publish that would need more raises ``ConfigurationError`` rather than dropping headers. Two
transport attributes exist only on SQS: ``rs-key`` carries the ordering key where the queue itself
cannot (standard queues, or a key that is not a valid ``MessageGroupId``), and
``rs-body-encoding: base64`` marks a payload that is not valid SQS text (binary bytes). Both are
removed from ``Delivery.headers``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import importlib
import json
import logging
import math
import re
import socket
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

from replaysafe._redact import redact as redact_url
from replaysafe._url import take_options
from replaysafe.brokers.base import (
    Broker,
    Capabilities,
    Delivery,
    GroupState,
    RedeliveryKind,
    SettleGranularity,
    SourceFacts,
    Subscription,
)
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.envelope import HEADER_OPERATION_ID, Envelope
from replaysafe.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    MissingExtra,
    PublishAmbiguous,
    ReplaysafeError,
)
from replaysafe.failpoints import (
    FAILPOINTS,
    PUBLISH_AFTER_ACCEPT,
    PUBLISH_BEFORE_ACCEPT,
    Failpoints,
)

__all__ = [
    "FIFO_DEDUP_WINDOW",
    "HEADER_BODY_ENCODING",
    "HEADER_KEY",
    "HEADER_REJECT_REASON",
    "MAX_ATTRIBUTES",
    "SQSBroker",
    "SQSDelivery",
]

log = logging.getLogger("replaysafe.brokers.sqs")

#: SQS limits
MAX_BATCH: Final = 10
MAX_ATTRIBUTES: Final = 10
MAX_VISIBILITY: Final = 43_200
MAX_WAIT_TIME: Final = 20
FIFO_DEDUP_WINDOW: Final = 300.0

#: seconds before a copy's visibility deadline after which its delete no longer confirms the
#: completion (``SQSDelivery.ack_confirmed``): the receive clock starts after SQS started the timer
CONFIRM_MARGIN: Final = 0.5
DEFAULT_MAX_MESSAGE_BYTES: Final = 1_048_576

CONTENT_TYPE: Final = "content-type"
#: the ordering key, where the queue cannot carry it natively
HEADER_KEY: Final = "rs-key"
#: ``base64`` when the body had to be encoded to be valid SQS text
HEADER_BODY_ENCODING: Final = "rs-body-encoding"
#: why a message was rejected (on the dead-letter copy)
HEADER_REJECT_REASON: Final = "rs-reject-reason"
_TRANSPORT_HEADERS: Final = frozenset({HEADER_KEY, HEADER_BODY_ENCODING})

_SYSTEM_ATTRIBUTES: Final = [
    "ApproximateReceiveCount",
    "SentTimestamp",
    "MessageGroupId",
    "MessageDeduplicationId",
]

_STANDARD: Final = Capabilities(
    redelivery=RedeliveryKind.VISIBILITY_TIMEOUT,
    settle_granularity=SettleGranularity.MESSAGE,
    extend_visibility=True,
    # competing consumers and visibility expiry reorder a standard queue
    ordered_within_key=False,
    # ApproximateReceiveCount is kept by SQS per message (it also counts receives lost in transit)
    delivery_count=True,
    native_dedup_window=None,
    delayed_nack=True,
    independent_groups=False,
)
_FIFO: Final = replace(_STANDARD, ordered_within_key=True, native_dedup_window=FIFO_DEDUP_WINDOW)

# SQS text: the XML character ranges SQS accepts in bodies and attribute values
_INVALID_TEXT = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$|^[A-Za-z0-9_-]{1,75}\.fifo$")
_ATTRIBUTE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,256}$")
# MessageGroupId / MessageDeduplicationId: alphanumerics and punctuation, 1..128
_GROUP_OR_DEDUP_ID = re.compile(r"""^[A-Za-z0-9!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]{1,128}$""")

_MISSING_QUEUE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_AUTH = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "InvalidSecurity",
        "ExpiredToken",
        "MissingAuthenticationToken",
        "IncompleteSignature",
    }
)
_THROTTLED = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "KmsThrottled",
    }
)
_CONFIG_BOTO_ERRORS: Final = (
    "NoCredentialsError",
    "PartialCredentialsError",
    "NoRegionError",
    "ParamValidationError",
    "ProfileNotFound",
    "InvalidRegionError",
    "UnknownServiceError",
)


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True, slots=True)
class _Driver:
    get_session: Any
    config: Any
    client_error: type[BaseException]
    #: errors meaning the request or the local configuration is wrong (never retried)
    config_errors: tuple[type[BaseException], ...]
    #: botocore's wrappers of connection failures (``kwargs["error"]`` holds the cause)
    connect_timeout: type[BaseException]
    endpoint_error: type[BaseException]
    #: causes inside ``endpoint_error`` that happen while connecting, before any byte is sent
    connect_phase: tuple[type[BaseException], ...]
    #: every error the driver may raise for a failed call
    errors: tuple[type[BaseException], ...]


def _driver() -> _Driver:
    """Import aiobotocore lazily; a missing one names the extra to install."""
    try:
        session = importlib.import_module("aiobotocore.session")
        config = importlib.import_module("aiobotocore.config")
        exc = importlib.import_module("botocore.exceptions")
        aiohttp = importlib.import_module("aiohttp")
    except ImportError as error:
        raise MissingExtra("sqs", "aiobotocore") from error
    config_errors = tuple(
        t for n in _CONFIG_BOTO_ERRORS if isinstance(t := getattr(exc, n, None), type)
    )
    return _Driver(
        get_session=session.get_session,
        config=config.AioConfig,
        client_error=exc.ClientError,
        config_errors=config_errors,
        connect_timeout=exc.ConnectTimeoutError,
        endpoint_error=exc.EndpointConnectionError,
        connect_phase=(aiohttp.ClientConnectorError, socket.gaierror),
        errors=(exc.ClientError, exc.BotoCoreError, aiohttp.ClientError, OSError, TimeoutError),
    )


def _error_code(exc: BaseException) -> tuple[str, int, str]:
    """(code, HTTP status, message) of a botocore ``ClientError``."""
    response = getattr(exc, "response", None) or {}
    error = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    return (
        str(error.get("Code", "")),
        int(meta.get("HTTPStatusCode") or 0),
        str(error.get("Message", "")),
    )


def _retries(source: Any) -> int:
    meta = source.get("ResponseMetadata") if isinstance(source, Mapping) else None
    if meta is None:
        response = getattr(source, "response", None)
        meta = response.get("ResponseMetadata") if isinstance(response, Mapping) else None
    return int((meta or {}).get("RetryAttempts") or 0)


# --------------------------------------------------------------------------- queues


@dataclass(frozen=True, slots=True)
class _Queue:
    name: str
    url: str
    fifo: bool
    #: the queue's own VisibilityTimeout attribute (seconds)
    visibility_timeout: int
    dead_letter_url: str | None
    dead_letter_name: str | None


@dataclass(slots=True)
class _Outgoing:
    """One validated ``SendMessageBatch`` entry and the envelope it carries."""

    envelope: Envelope
    params: dict[str, Any]
    size: int


def _check_queue_name(name: object) -> str:
    if not isinstance(name, str) or not _QUEUE_NAME.match(name):
        raise ConfigurationError(
            f"{name!r} is not a valid SQS queue name: use 1-80 letters, digits, '-' or '_' "
            "(FIFO queues end in '.fifo')"
        )
    return name


def _check_attribute(op: str, name: str, value: str) -> None:
    lowered = name.lower()
    if (
        not _ATTRIBUTE_NAME.match(name)
        or ".." in name
        or name.startswith(".")
        or name.endswith(".")
        or lowered.startswith(("aws.", "amazon."))
    ):
        raise ConfigurationError(
            f"operation {op!r}: header {name!r} cannot be an SQS message attribute name (letters, "
            "digits, '_', '-', '.', no leading/trailing or double '.', no 'AWS.'/'Amazon.' "
            "prefix); rename the header"
        )
    if not value:
        raise ConfigurationError(
            f"operation {op!r}: header {name!r} is empty and SQS refuses empty attribute values; "
            "omit the header or give it a value"
        )
    if _INVALID_TEXT.search(value):
        raise ConfigurationError(
            f"operation {op!r}: header {name!r} contains characters SQS does not accept in "
            "attribute values; encode the value (e.g. base64) or move it into the payload"
        )


def _body_text(payload: bytes) -> tuple[str, bool]:
    """The SQS body for ``payload`` and whether it had to be base64-encoded."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode("ascii"), True
    if _INVALID_TEXT.search(text):
        return base64.b64encode(payload).decode("ascii"), True
    return text, False


def _attribute_bytes(attributes: Mapping[str, Mapping[str, Any]]) -> int:
    total = 0
    for name, value in attributes.items():
        total += len(name.encode()) + len(str(value.get("DataType", "")).encode())
        total += len(str(value.get("StringValue", "")).encode("utf-8", "surrogatepass"))
        total += len(value.get("BinaryValue", b"") or b"")
    return total


# --------------------------------------------------------------------------- deliveries


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
        sub: _SQSSubscription,
        message: Mapping[str, Any],
        *,
        received_at: float,
        visibility: int,
    ) -> None:
        broker = sub._broker
        queue = sub._queue
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
            key = None if group in (None, broker._default_group) else str(group)
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
        self._sub = sub
        self._broker = broker
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
        self._sub._on_settled(self)
        return True

    async def ack(self) -> None:
        """Delete the message (COMPLETED), in a ``DeleteMessageBatch`` shared with the acks of
        the next ``delete_window`` seconds. A delete SQS refuses for this message is logged and
        counted (``delete_failures``), not raised: the message comes back and the ledger answers
        it. When the delete call itself failed, raises the mapped error (``BrokerUnavailable``;
        ``ConfigurationError`` if the queue is gone); the message then comes back when its
        visibility expires. Either way the delivery counts as settled."""
        if self._settle():
            await self._broker._delete(self._queue, self)

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
        await self._broker._delete(self._queue, self)
        if self._delete_refused is not None:
            why = f"SQS refused the delete ({self._delete_refused})"
        elif self._broker._clock.now() > self.settle_deadline - CONFIRM_MARGIN:
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
            await self._broker._change_visibility(self, seconds, strict=False)

    async def reject(self, reason: str) -> None:
        """Settle without redelivery. If the queue's redrive policy names a dead-letter queue, a
        copy (body, attributes and ``rs-reject-reason``) is sent there and confirmed *before* the
        original is deleted; if that send fails, ``BrokerUnavailable`` is raised and the original
        is not deleted (it comes back when its visibility expires). Without a dead-letter queue
        the message is deleted and the reason only logged."""
        if self._settle():
            if self._queue.dead_letter_url is not None:
                await self._broker._dead_letter(self, reason)
            else:
                log.warning(
                    "SQS queue %s has no dead-letter queue: rejected message %s is deleted "
                    "(reason: %s)",
                    self._queue.name,
                    self.message_id,
                    reason,
                )
            await self._broker._delete(self._queue, self)

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
        started = self._broker._clock.now()
        await self._broker._change_visibility(self, whole, strict=True)
        self.settle_deadline = started + whole

    def __repr__(self) -> str:
        return (
            f"<SQSDelivery {self.delivery_id} op={self.headers.get(HEADER_OPERATION_ID)!r} "
            f"settled={self._settled}>"
        )


def _timestamp(value: Any) -> float | None:
    try:
        return int(value) / 1000.0 if value is not None else None
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- subscription


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
        self, broker: SQSBroker, queue: _Queue, group: str, prefetch: int, visibility: int
    ) -> None:
        self._broker = broker
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
        now = self._broker._clock.now()
        while self._buffer and self._buffer[0].settle_deadline <= now:
            d = self._buffer.popleft()
            d._settled = True
            log.debug("dropped %s: its visibility expired while buffered", d.delivery_id)
            self._room.set()

    # ---------------------------------------------------------------- poller

    def _start(self) -> None:
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll(), name=f"sqs-poll:{self._queue.name}")
            self._broker._background.add(self._poller)
            self._poller.add_done_callback(self._broker._background.discard)

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
                messages = await self._broker._receive(
                    self._queue, min(MAX_BATCH, room), self._visibility
                )
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
            now = self._broker._clock.now()
            got = [
                SQSDelivery(self, m, received_at=now, visibility=self._visibility) for m in messages
            ]
            if self._closed:
                # closed gracefully while this receive was in flight: hand them straight back
                for d in got:
                    d._settled = True
                await self._broker._return_now(self._queue, got)
                return
            self._buffer.extend(got)
            if got:
                self._arrived.set()
            elif self._broker._wait_time == 0:
                # short polling: do not spin on an empty queue
                await asyncio.sleep(0.2)

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
        self._broker._subs.discard(self)
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
        await self._broker._return_now(self._queue, back)

    def __repr__(self) -> str:
        return (
            f"<SQSSubscription {self._queue.name} group={self._group!r} "
            f"buffered={len(self._buffer)} unsettled={len(self._unsettled)} "
            f"closed={self._closed}>"
        )


# --------------------------------------------------------------------------- delete batching


class _DeleteBatcher:
    """Coalesces acks on one queue into ``DeleteMessageBatch`` calls of up to 10 entries: a batch
    goes out when it is full or ``window`` seconds after its first entry. Each ack waits for its
    own entry's result. A cancelled ack does not withdraw its entry: the delete still happens."""

    def __init__(self, broker: SQSBroker, queue: _Queue) -> None:
        self._broker = broker
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
            self._timer = self._broker._spawn(self._after_window(), "sqs-delete-window")
        await fut

    async def _after_window(self) -> None:
        try:
            await asyncio.sleep(self._broker._delete_window)
        finally:
            self._timer = None
        self.flush()

    def flush(self) -> None:
        """Send everything pending now (also used by ``SQSBroker.close``)."""
        while self._pending:
            self._send(self._pending[:MAX_BATCH])
            del self._pending[:MAX_BATCH]

    def _send(self, batch: list[tuple[SQSDelivery, asyncio.Future[None]]]) -> None:
        self._broker._spawn(self._delete_batch(batch), "sqs-delete")

    async def _delete_batch(self, batch: list[tuple[SQSDelivery, asyncio.Future[None]]]) -> None:
        entries = [
            {"Id": str(i), "ReceiptHandle": d.receipt_handle} for i, (d, _) in enumerate(batch)
        ]
        try:
            response = await self._broker._call(
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
                self._broker._delete_failures += 1
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


# --------------------------------------------------------------------------- the broker


#: SQSBroker.from_url's query parameters (any other is refused)
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "region": str, "wait_time": int, "visibility_timeout": int, "delete_window": float,
    "default_group": str, "max_retries": int,
}  # fmt: skip


class SQSBroker(Broker):
    """Amazon SQS (or an SQS-compatible server such as moto or LocalStack) through aiobotocore.

    Sources and destinations are queue names in the broker's region and account; their URLs and
    attributes are looked up once and cached. The client is created on first use.

    Options: ``region``; ``endpoint_url`` (for a compatible server; default: AWS); explicit
    credentials (default: the AWS credential chain); ``wait_time`` (long-poll seconds, 0-20);
    ``visibility_timeout`` (seconds each receive hides a message; default: the queue's own
    attribute); ``delete_window`` (seconds an ack waits for others to share its
    ``DeleteMessageBatch``); ``default_group`` (the FIFO ``MessageGroupId`` of ``key=None``);
    ``max_retries`` (botocore retries for receive/delete/visibility calls; publishes are never
    retried by the driver, so an unknown outcome is reported as ``PublishAmbiguous`` instead of
    hidden); ``connect_timeout``/``read_timeout``; ``max_pool_connections`` (each subscription's
    long poll holds one); ``max_message_bytes`` (body plus attributes, per message and per batch).

    ``failpoints`` (default: the process-wide registry) is hit for each envelope before its batch
    is sent (``PUBLISH_BEFORE_ACCEPT``) and after SQS accepted it (``PUBLISH_AFTER_ACCEPT``), with
    ctx ``operation_id``, ``destination`` and ``sleep``.

    ``api_calls`` counts the SQS requests made, by kind (``receive``, ``delete``,
    ``change_visibility``, ``send``, ``metadata``), including the driver's own retries.
    """

    def __init__(
        self,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        wait_time: int = 20,
        visibility_timeout: int | None = None,
        delete_window: float = 0.01,
        default_group: str = "rs-no-key",
        max_retries: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_pool_connections: int = 50,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        clock: Clock = SYSTEM_CLOCK,
        failpoints: Failpoints | None = None,
    ) -> None:
        if not isinstance(wait_time, int) or not 0 <= wait_time <= MAX_WAIT_TIME:
            raise ConfigurationError(
                f"wait_time must be whole seconds from 0 to {MAX_WAIT_TIME} (SQS long polling), "
                f"got {wait_time!r}"
            )
        if visibility_timeout is not None and (
            not isinstance(visibility_timeout, int) or not 0 < visibility_timeout <= MAX_VISIBILITY
        ):
            raise ConfigurationError(
                f"visibility_timeout must be whole seconds from 1 to {MAX_VISIBILITY}, "
                f"got {visibility_timeout!r}"
            )
        if delete_window < 0:
            raise ConfigurationError(f"delete_window must be >= 0 seconds, got {delete_window}")
        if not _GROUP_OR_DEDUP_ID.match(default_group):
            raise ConfigurationError(
                f"default_group {default_group!r} is not a valid SQS MessageGroupId "
                "(1-128 letters, digits or punctuation)"
            )
        if max_retries < 1 or max_pool_connections < 1 or max_message_bytes < 1024:
            raise ConfigurationError(
                "max_retries and max_pool_connections must be >= 1 and max_message_bytes >= 1024"
            )
        if endpoint_url is not None and urlsplit(endpoint_url).password is not None:
            raise ConfigurationError(
                f"endpoint_url {redact_url(endpoint_url)} carries credentials; pass them as "
                "aws_access_key_id/aws_secret_access_key or use SQSBroker.from_url"
            )
        self._region = region
        self._endpoint = endpoint_url
        self._credentials = {
            k: v
            for k, v in (
                ("aws_access_key_id", aws_access_key_id),
                ("aws_secret_access_key", aws_secret_access_key),
                ("aws_session_token", aws_session_token),
            )
            if v is not None
        }
        self._wait_time = wait_time
        self._visibility_override = visibility_timeout
        self._delete_window = delete_window
        self._default_group = default_group
        self._max_retries = max_retries
        self._connect_timeout = connect_timeout
        # a long poll must never look like a read timeout
        self._read_timeout = max(read_timeout, wait_time + 10.0)
        self._max_pool = max_pool_connections
        self._max_message_bytes = max_message_bytes
        self._clock = clock
        self._failpoints = FAILPOINTS if failpoints is None else failpoints
        self._calls: Counter[str] = Counter()
        self._delete_failures = 0
        self._queues: dict[str, _Queue] = {}
        self._deleters: dict[str, _DeleteBatcher] = {}
        self._subs: set[_SQSSubscription] = set()
        self._background: set[asyncio.Task[Any]] = set()
        # the driver is imported now (a missing extra fails at construction), used on first call
        self._drv = _driver()
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._send_client: Any = None
        self._connect_lock = asyncio.Lock()
        #: no new publishes or subscriptions (close() started)
        self._closing = False
        #: no calls at all (close() finished)
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **opts: Any) -> SQSBroker:
        """A broker from a URL (the one SQS URL grammar: ``broker_from_url`` comes here);
        keyword options override the URL's query parameters.

        - ``sqs://``, ``sqs://REGION`` or ``sqs://?region=REGION``: AWS, default credential chain
          (a host with a dot or a port, ``sqs://host:port``, is an HTTPS endpoint instead).
        - ``sqs+http://[KEY:SECRET@]host:port[/REGION]`` (or ``sqs+https://…``, or a plain
          ``http(s)://`` URL): an SQS-compatible endpoint (moto, LocalStack); user and password
          are the access key id and secret (redacted in repr and errors); the region is the path
          or ``?region=``, ``us-east-1`` when neither is given.

        Query parameters: ``region``, ``wait_time``, ``visibility_timeout``, ``delete_window``,
        ``default_group``, ``max_retries``.
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(
                f"cannot parse SQS URL {redact_url(url)}: {exc}; use sqs://REGION or "
                "sqs+http://host:port/REGION"
            ) from None
        scheme = parts.scheme.lower()
        endpoint: str | None
        path_region = parts.path.strip("/") or None
        if path_region is not None and "/" in path_region:
            raise ConfigurationError(
                f"SQS URL {redact_url(url)}: the path is the region (one name, e.g. /eu-west-1), "
                f"not {parts.path!r}"
            )
        if scheme == "sqs":
            host = parts.hostname
            if host and "." not in host and not port:
                # sqs://eu-west-1: a region name, never a host
                if path_region is not None:
                    raise ConfigurationError(
                        f"SQS URL {redact_url(url)} names a region twice; use sqs://REGION"
                    )
                path_region, endpoint = host, None
            else:
                endpoint = f"https://{host}{f':{port}' if port else ''}" if host else None
        elif scheme in ("sqs+http", "sqs+https", "http", "https"):
            if not parts.hostname:
                raise ConfigurationError(f"SQS URL {redact_url(url)} names no host")
            real = scheme.removeprefix("sqs+")
            endpoint = f"{real}://{parts.hostname}{f':{port}' if port else ''}"
        else:
            raise ConfigurationError(
                f"SQS URL {redact_url(url)} has scheme {parts.scheme!r}; use sqs://, "
                "sqs+http:// or sqs+https://"
            )
        rest, kwargs = take_options(url, _URL_OPTIONS, what="SQS")
        unknown = [name for name, _ in parse_qsl(urlsplit(rest).query, keep_blank_values=True)]
        if unknown:
            raise ConfigurationError(
                f"SQS URL {redact_url(url)}: unknown parameter {unknown[0]!r}; known: "
                f"{', '.join(sorted(_URL_OPTIONS))}"
            )
        if path_region is not None:
            if kwargs.get("region", path_region) != path_region:
                raise ConfigurationError(
                    f"SQS URL {redact_url(url)} names two regions ({path_region!r} and "
                    f"{kwargs['region']!r}); keep one"
                )
            kwargs["region"] = path_region
        if scheme != "sqs":
            kwargs.setdefault("region", "us-east-1")  # an SQS-compatible server needs one
        if parts.username is not None:
            kwargs["aws_access_key_id"] = unquote(parts.username)
            kwargs["aws_secret_access_key"] = unquote(parts.password or "")
        kwargs["endpoint_url"] = endpoint
        kwargs.update(opts)
        return cls(**kwargs)

    # ---------------------------------------------------------------- properties

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def failpoints(self) -> Failpoints:
        return self._failpoints

    @property
    def api_calls(self) -> dict[str, int]:
        """SQS requests made so far, by kind (a copy)."""
        out = dict.fromkeys(("receive", "delete", "change_visibility", "send", "metadata"), 0)
        out.update(self._calls)
        return out

    @property
    def delete_failures(self) -> int:
        """Deletes SQS refused per message (the message comes back; not an error)."""
        return self._delete_failures

    def capabilities(self, source: str) -> Capabilities:
        """FIFO queues (name ends in ``.fifo``) keep order within a key and drop duplicate
        operation ids for 5 minutes; standard queues do neither. Neither has consumer groups."""
        return _FIFO if source.endswith(".fifo") else _STANDARD

    async def describe(self, source: str) -> SourceFacts:
        """What ``explain`` needs about ``source``, read from the queue's attributes: retention,
        the redrive policy (dead-letter queue and ``maxReceiveCount``), the dead-letter queue's
        retention and the visibility timeout receives use.

        ``redrive_window`` is counted from the original publish: a message may sit in the queue
        for its retention and then in the dead-letter queue for the DLQ's retention (FIFO moves and
        ``reject`` copies restart the DLQ clock; standard-queue moves keep the first enqueue
        time, so this is the upper bound)."""
        queue = await self._queue(source)
        attrs = await self._attributes(queue.name, queue.url, "MessageRetentionPeriod")
        retention = float(attrs.get("MessageRetentionPeriod", 345_600))
        dlq_retention = limit = None
        if queue.dead_letter_url is not None and queue.dead_letter_name is not None:
            dlq = await self._attributes(
                queue.dead_letter_name, queue.dead_letter_url, "MessageRetentionPeriod"
            )
            dlq_retention = float(dlq.get("MessageRetentionPeriod", 345_600))
            redrive = await self._attributes(queue.name, queue.url, "RedrivePolicy")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                limit = int(json.loads(redrive["RedrivePolicy"])["maxReceiveCount"])
        notes = [
            "no consumer groups: every subscriber of the queue competes for the same messages "
            "(fan out with SNS, one queue per group)",
            "a message is redelivered when its visibility expires, also while a handler still "
            "works on it; the runtime extends visibility with the lease",
        ]
        if queue.fifo:
            notes.append(
                "FIFO: SQS drops a re-publish of an operation id only within 5 minutes, also one "
                "with a different payload (that conflict is never seen)"
            )
        return SourceFacts(
            broker="sqs",
            retention=retention,
            dead_letter=queue.dead_letter_name,
            dead_letter_retention=dlq_retention,
            redrive_window=None if dlq_retention is None else retention + dlq_retention,
            delivery_limit=limit,
            visibility_timeout=float(self._visibility_override or queue.visibility_timeout),
            broker_timestamps=True,
            notes=tuple(notes),
        )

    def group_name(self, source: str, group: str) -> str:
        """The queue's URL once it was looked up, else its name: SQS has no consumer groups, so
        every group (handler) on ``source`` reads this one queue, whatever its name."""
        cached = self._queues.get(source)
        return cached.url if cached is not None else source

    async def group_state(self, source: str, group: str) -> GroupState:
        """``ApproximateNumberOfMessages`` (visible) of the queue, by its URL. SQS cannot say
        how many consumers poll it (``consumers`` is None), and the count is approximate. A
        missing queue raises ``ConfigurationError`` (subscribe would too: nothing creates it)."""
        queue = await self._queue(source)
        attrs = await self._attributes(queue.name, queue.url, "ApproximateNumberOfMessages")
        messages = int(attrs.get("ApproximateNumberOfMessages", 0))
        return GroupState(source, group, queue.url, messages=messages, exists=True)

    async def check(self) -> None:
        """One ``GetQueueAttributes`` on a queue this broker already looked up (a worker's role
        need not be allowed ``ListQueues``): the endpoint answers and the credentials are
        accepted, or ``BrokerUnavailable`` / ``ConfigurationError``. Nothing to ask before the
        first queue was looked up (:meth:`group_state` and ``subscribe`` do that)."""
        for queue in list(self._queues.values())[:1]:
            await self._attributes(queue.name, queue.url, "QueueArn")

    async def _attributes(self, name: str, url: str, *attributes: str) -> dict[str, str]:
        response = await self._call(
            "metadata",
            "get_queue_attributes",
            "GetQueueAttributes",
            name,
            QueueUrl=url,
            AttributeNames=list(attributes),
        )
        return dict(response.get("Attributes") or {})

    # ---------------------------------------------------------------- client and calls

    def _check_open(self) -> None:
        if self._closing:
            raise BrokerUnavailable(
                f"{self!r} is closed; create a new SQSBroker to publish or consume"
            )

    async def _clients(self) -> tuple[Any, Any]:
        if self._closed:
            raise BrokerUnavailable(
                f"{self!r} is closed; create a new SQSBroker to publish or consume"
            )
        if self._client is None:
            async with self._connect_lock:
                if self._client is None:
                    await self._connect()
        return self._client, self._send_client

    async def _connect(self) -> None:
        drv = self._drv
        session = drv.get_session()
        kwargs: dict[str, Any] = dict(self._credentials)
        if self._region is not None:
            kwargs["region_name"] = self._region
        if self._endpoint is not None:
            kwargs["endpoint_url"] = self._endpoint

        def config(attempts: int) -> Any:
            return drv.config(
                connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
                max_pool_connections=self._max_pool,
                retries={"mode": "standard", "total_max_attempts": attempts},
            )

        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                session.create_client("sqs", config=config(self._max_retries), **kwargs)
            )
            # publishes are never retried by the driver: a retry after a lost response would
            # hide the ambiguity (and a refusal after it would hide an accepted publish)
            send_client = await stack.enter_async_context(
                session.create_client("sqs", config=config(1), **kwargs)
            )
        except drv.errors as exc:
            await stack.aclose()
            raise ConfigurationError(
                f"cannot create an SQS client for {self._where()}: {type(exc).__name__}: {exc}; "
                "set region (and credentials or endpoint_url)"
            ) from None
        self._stack = stack
        self._client, self._send_client = client, send_client

    def _where(self) -> str:
        return f"endpoint {self._endpoint or 'AWS'} region {self._region or '(default)'}"

    async def _call(
        self, kind: str, operation: str, doing: str, queue: str | None, **params: Any
    ) -> dict[str, Any]:
        """One SQS request, counted in ``api_calls``; driver errors mapped to the error tree
        (``ConfigurationError`` for a missing queue, credentials or a refused request;
        ``BrokerUnavailable`` otherwise). Publishes use :meth:`_send_batch` instead."""
        client, _ = await self._clients()
        self._calls[kind] += 1
        try:
            response: dict[str, Any] = await getattr(client, operation)(**params)
        except self._driver_errors() as exc:
            self._calls[kind] += _retries(exc)
            raise self._map(exc, doing, queue) from exc
        self._calls[kind] += _retries(response)
        return response

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return self._drv.errors

    def _map(self, exc: BaseException, doing: str, queue: str | None) -> ReplaysafeError:
        """Map a driver error to the error tree, saying what happened and what to do."""
        where = f"queue {queue!r} ({self._where()})" if queue else self._where()
        what = f"SQS {doing} on {where} failed"
        if isinstance(exc, self._drv.client_error):
            code, status, message = _error_code(exc)
            if code in _MISSING_QUEUE:
                return ConfigurationError(
                    f"{what}: the queue does not exist; create it (SQSBroker.create_queue or "
                    "your infrastructure code) or fix the name"
                )
            if code in _AUTH:
                return ConfigurationError(
                    f"{what}: {code}: {message}; check the credentials and the IAM policy"
                )
            if status >= 500 or code in _THROTTLED:
                return BrokerUnavailable(
                    f"{what}: {code or status}: {message}; SQS is overloaded or failing, retry "
                    "later"
                )
            return ConfigurationError(
                f"{what}: SQS refused the request: {code}: {message}; check the queue's "
                "attributes and the request"
            )
        if isinstance(exc, self._drv.config_errors):
            return ConfigurationError(
                f"{what}: {type(exc).__name__}: {exc}; configure region and credentials"
            )
        return BrokerUnavailable(
            f"{what}: {type(exc).__name__}: {exc}; the endpoint is unreachable, retry later"
        )

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ---------------------------------------------------------------- queues

    async def _queue(self, name: str) -> _Queue:
        """The queue's URL and attributes (looked up once, then cached)."""
        cached = self._queues.get(name)
        if cached is not None:
            return cached
        _check_queue_name(name)
        url = (await self._call("metadata", "get_queue_url", "GetQueueUrl", name, QueueName=name))[
            "QueueUrl"
        ]
        attrs = await self._attributes(name, url, "VisibilityTimeout", "RedrivePolicy", "FifoQueue")
        dlq_url = dlq_name = None
        if attrs.get("RedrivePolicy"):
            try:
                arn = str(json.loads(attrs["RedrivePolicy"])["deadLetterTargetArn"])
            except (ValueError, KeyError, TypeError):
                raise ConfigurationError(
                    f"SQS queue {name!r} has an unreadable RedrivePolicy "
                    f"{attrs['RedrivePolicy']!r}; fix it or remove it"
                ) from None
            arn_parts = arn.split(":")
            dlq_name = arn_parts[-1]
            extra = {"QueueOwnerAWSAccountId": arn_parts[4]} if len(arn_parts) >= 6 else {}
            dlq_url = (
                await self._call(
                    "metadata",
                    "get_queue_url",
                    "GetQueueUrl (dead-letter queue)",
                    dlq_name,
                    QueueName=dlq_name,
                    **extra,
                )
            )["QueueUrl"]
        queue = _Queue(
            name=name,
            url=str(url),
            fifo=str(attrs.get("FifoQueue", "false")).lower() == "true",
            visibility_timeout=int(attrs.get("VisibilityTimeout", 30)),
            dead_letter_url=dlq_url,
            dead_letter_name=dlq_name,
        )
        self._queues[name] = queue
        return queue

    async def drop_source(self, source: str, groups: Sequence[str] = ()) -> None:
        """Delete the source and what was declared for it, messages included."""
        await self.delete_queue(source)

    async def prepare_source(
        self,
        source: str,
        groups: Sequence[str] = (),
        *,
        visibility_timeout: float | None = None,
        partitions: int | None = None,
    ) -> None:
        """Create the queue (SQS has no groups: everyone shares it). Without
        ``visibility_timeout`` an existing queue is kept as it is (a new one gets 30 s); with it,
        an existing queue must have that timeout (SQS refuses other attributes)."""
        if visibility_timeout is None and await self._existing(source) is not None:
            return
        vis = 30 if visibility_timeout is None else max(1, round(visibility_timeout))
        await self.create_queue(source, visibility_timeout=vis)

    async def _existing(self, name: str) -> _Queue | None:
        """The queue ``name``, or None when it does not exist (other errors raise)."""
        try:
            return await self._queue(name)
        except ConfigurationError as exc:
            cause = exc.__cause__
            if (
                isinstance(cause, self._drv.client_error)
                and _error_code(cause)[0] in _MISSING_QUEUE
            ):
                return None
            raise

    async def declared_names(self, source: str, group: str) -> dict[str, str]:
        """The queue (publish there) and its URL, read from SQS, and its dead-letter queue when
        it has one. ``group`` is only a label: every consumer shares the queue."""
        names = {"queue": source}
        queue = await self._existing(source)
        if queue is None:
            names["queue URL"] = "(the queue does not exist yet)"
            return names
        names["queue URL"] = queue.url
        if queue.dead_letter_url is not None:
            names["dead-letter queue URL"] = queue.dead_letter_url
        return names

    async def create_queue(
        self,
        name: str,
        *,
        visibility_timeout: int = 30,
        fifo: bool | None = None,
        dlq: str | None = None,
        max_receive_count: int = 5,
        retention: int | None = None,
    ) -> str:
        """Create ``name`` (idempotent with the same attributes) and return its URL.

        ``fifo`` defaults to whether the name ends in ``.fifo`` (SQS requires that suffix).
        ``dlq`` names a dead-letter queue, created too (with the same FIFO-ness) and set as the
        redrive target: SQS moves a message there once it was received ``max_receive_count``
        times without being deleted; ``reject`` copies there at once. ``retention`` is the
        message retention in seconds (SQS default 4 days); a DLQ keeps its own retention.
        """
        _check_queue_name(name)
        is_fifo = name.endswith(".fifo") if fifo is None else fifo
        if is_fifo != name.endswith(".fifo"):
            raise ConfigurationError(
                f"queue {name!r}: FIFO queue names must end in '.fifo' and only FIFO queues may; "
                "rename it or drop fifo="
            )
        if not 0 <= visibility_timeout <= MAX_VISIBILITY:
            raise ConfigurationError(
                f"visibility_timeout must be 0..{MAX_VISIBILITY} seconds, got {visibility_timeout}"
            )
        attributes: dict[str, str] = {"VisibilityTimeout": str(int(visibility_timeout))}
        if is_fifo:
            attributes["FifoQueue"] = "true"
        if retention is not None:
            attributes["MessageRetentionPeriod"] = str(int(retention))
        if dlq is not None:
            if dlq.endswith(".fifo") != is_fifo:
                raise ConfigurationError(
                    f"the dead-letter queue of {name!r} must be "
                    f"{'a FIFO' if is_fifo else 'a standard'} queue like it; got {dlq!r}"
                )
            if not 1 <= max_receive_count <= 1000:
                raise ConfigurationError(
                    f"max_receive_count must be 1..1000, got {max_receive_count}"
                )
            dlq_url = await self.create_queue(dlq, visibility_timeout=visibility_timeout)
            arn = (await self._attributes(dlq, dlq_url, "QueueArn"))["QueueArn"]
            attributes["RedrivePolicy"] = json.dumps(
                {"deadLetterTargetArn": arn, "maxReceiveCount": str(max_receive_count)}
            )
        response = await self._call(
            "metadata", "create_queue", "CreateQueue", name, QueueName=name, Attributes=attributes
        )
        self._queues.pop(name, None)
        return str(response["QueueUrl"])

    async def delete_queue(self, name: str) -> None:
        """Delete ``name`` and its messages (a missing queue is not an error)."""
        try:
            queue = await self._queue(name)
        except ConfigurationError:
            return
        await self._call("metadata", "delete_queue", "DeleteQueue", name, QueueUrl=queue.url)
        self._queues.pop(name, None)
        self._deleters.pop(name, None)

    async def approximate_depth(self, name: str) -> dict[str, int]:
        """SQS's approximate counts for ``name``: ``visible``, ``in_flight`` (received, not
        deleted, visibility not expired) and ``delayed``. Eventually consistent on AWS."""
        queue = await self._queue(name)
        attrs = await self._attributes(
            name,
            queue.url,
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        )
        return {
            "visible": int(attrs.get("ApproximateNumberOfMessages", 0)),
            "in_flight": int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
            "delayed": int(attrs.get("ApproximateNumberOfMessagesDelayed", 0)),
        }

    # ---------------------------------------------------------------- publish

    def _outgoing(self, queue: _Queue, index: int, env: Envelope) -> _Outgoing:
        """Validate and encode one envelope as a ``SendMessageBatch`` entry."""
        op = env.operation_id
        headers = env.wire_headers()
        headers[CONTENT_TYPE] = env.content_type
        clash = _TRANSPORT_HEADERS.intersection(headers)
        if clash:
            raise ConfigurationError(
                f"operation {op!r}: headers {sorted(clash)} are reserved by the SQS adapter; "
                "rename them"
            )
        body, encoded = _body_text(env.payload)
        if encoded:
            headers[HEADER_BODY_ENCODING] = "base64"
        params: dict[str, Any] = {"Id": str(index), "MessageBody": body}
        if queue.fifo:
            group = self._default_group if env.key is None else env.key
            if not _GROUP_OR_DEDUP_ID.match(group):
                # not a valid MessageGroupId: group by its hash, carry the key itself as rs-key
                group = hashlib.sha256(group.encode("utf-8", "surrogatepass")).hexdigest()
                headers[HEADER_KEY] = str(env.key)
            params["MessageGroupId"] = group
            params["MessageDeduplicationId"] = (
                op
                if _GROUP_OR_DEDUP_ID.match(op)
                else hashlib.sha256(op.encode("utf-8", "surrogatepass")).hexdigest()
            )
        elif env.key is not None:
            headers[HEADER_KEY] = env.key
        if len(headers) > MAX_ATTRIBUTES:
            raise ConfigurationError(
                f"operation {op!r} needs {len(headers)} SQS message attributes "
                f"({', '.join(sorted(headers))}), over SQS's limit of {MAX_ATTRIBUTES}; "
                f"replaysafe uses up to {len(headers) - len(env.headers)} of them: send at most "
                f"{MAX_ATTRIBUTES - (len(headers) - len(env.headers))} headers of your own or "
                "move data into the payload"
            )
        attributes: dict[str, dict[str, str]] = {}
        for name, value in headers.items():
            _check_attribute(op, name, value)
            attributes[name] = {"DataType": "String", "StringValue": value}
        params["MessageAttributes"] = attributes
        size = len(body.encode("utf-8")) + _attribute_bytes(attributes)
        if size > self._max_message_bytes:
            raise ConfigurationError(
                f"operation {op!r} is {size} bytes on the wire, over the SQS message limit of "
                f"{self._max_message_bytes}; store the payload elsewhere (S3) and send a reference"
            )
        return _Outgoing(env, params, size)

    def _chunks(self, entries: list[_Outgoing]) -> list[list[_Outgoing]]:
        chunks: list[list[_Outgoing]] = []
        current: list[_Outgoing] = []
        size = 0
        for e in entries:
            if current and (len(current) == MAX_BATCH or size + e.size > self._max_message_bytes):
                chunks.append(current)
                current, size = [], 0
            e.params["Id"] = str(len(current))
            current.append(e)
            size += e.size
        if current:
            chunks.append(current)
        return chunks

    async def publish(self, destination: str, envelopes: Sequence[Envelope]) -> None:
        """Send ``envelopes`` with ``SendMessageBatch`` in chunks of up to 10 (boundary PUBLISHED
        when this returns). Every envelope is validated before anything is sent
        (``ConfigurationError``: too many headers, bad attribute names, oversize).

        Chunks go out in order and stop at the first failure. SQS refusing some entries raises
        ``BrokerUnavailable`` (a server fault: retry) or ``ConfigurationError`` (a sender fault)
        listing the refused operation ids -- they were NOT accepted, the others of that chunk
        were. A lost response, a timeout or a dropped connection after sending raises
        ``PublishAmbiguous``: retry with the SAME envelopes (on FIFO queues SQS drops the
        duplicate within 5 minutes; elsewhere the ledger does).
        """
        self._check_open()
        queue = await self._queue(destination)
        entries = [self._outgoing(queue, i, env) for i, env in enumerate(envelopes)]
        chunks = self._chunks(entries)
        sent = 0
        for chunk in chunks:
            for e in chunk:
                await self._failpoints.hit(PUBLISH_BEFORE_ACCEPT, self._ctx(e, destination))
            response = await self._send_batch(queue, chunk, sent, len(entries))
            accepted = {str(s["Id"]) for s in response.get("Successful") or []}
            failed = {str(f["Id"]): f for f in response.get("Failed") or []}
            for e in chunk:
                if e.params["Id"] in accepted:
                    await self._failpoints.hit(PUBLISH_AFTER_ACCEPT, self._ctx(e, destination))
            unanswered = [
                e.envelope.operation_id
                for e in chunk
                if e.params["Id"] not in accepted and e.params["Id"] not in failed
            ]
            if unanswered:
                raise PublishAmbiguous(
                    f"SQS SendMessageBatch to {destination!r} answered neither success nor "
                    f"failure for {unanswered}; retry them with the SAME operation ids"
                )
            if failed:
                self._raise_refused(destination, chunk, failed, sent, len(entries))
            sent += len(chunk)

    def _ctx(self, e: _Outgoing, destination: str) -> dict[str, Any]:
        return {
            "operation_id": e.envelope.operation_id,
            "destination": destination,
            "sleep": self._clock.sleep,
        }

    async def _send_batch(
        self, queue: _Queue, chunk: list[_Outgoing], sent: int, total: int
    ) -> dict[str, Any]:
        _, client = await self._clients()
        ops = [e.envelope.operation_id for e in chunk]
        self._calls["send"] += 1
        try:
            response: dict[str, Any] = await client.send_message_batch(
                QueueUrl=queue.url, Entries=[e.params for e in chunk]
            )
        except self._drv.errors as exc:
            if isinstance(exc, self._drv.client_error):
                _, status, _ = _error_code(exc)
                # a 5xx may have been processed (AWS says so); a 4xx was refused whole
                if status < 500:
                    raise self._map(exc, "SendMessageBatch", queue.name) from exc
            elif self._not_sent(exc):
                raise BrokerUnavailable(
                    f"SQS SendMessageBatch to {queue.name!r} could not connect "
                    f"({self._where()}): {exc}; nothing of {ops} was sent "
                    f"({sent} of {total} envelopes were accepted before); retry later"
                ) from exc
            raise PublishAmbiguous(
                f"SQS SendMessageBatch to {queue.name!r} may or may not have been accepted "
                f"({type(exc).__name__}: {exc}) for {ops} ({sent} of {total} envelopes were "
                "accepted before); retry with the SAME envelopes"
            ) from exc
        return response

    def _not_sent(self, exc: BaseException) -> bool:
        """True when ``exc`` happened while connecting, before any byte of the request left.
        (aiobotocore wraps both connect failures and some mid-request connection errors in
        ``EndpointConnectionError``; only the cause tells them apart.)"""
        drv = self._drv
        if isinstance(exc, drv.connect_timeout):
            return True
        cause = getattr(exc, "kwargs", {}).get("error")
        return isinstance(exc, drv.endpoint_error) and isinstance(cause, drv.connect_phase)

    def _raise_refused(
        self,
        destination: str,
        chunk: list[_Outgoing],
        failed: Mapping[str, Mapping[str, Any]],
        sent: int,
        total: int,
    ) -> None:
        by_id = {e.params["Id"]: e.envelope.operation_id for e in chunk}
        detail = "; ".join(
            f"{by_id[i]!r}: {f.get('Code')}: {f.get('Message')}" for i, f in failed.items()
        )
        accepted = sent + len(chunk) - len(failed)
        text = (
            f"SQS refused {len(failed)} of {len(chunk)} messages sent to {destination!r} "
            f"(NOT accepted, not ambiguous): {detail}. {accepted} of {total} envelopes were "
            f"accepted, {total - sent - len(chunk)} not attempted"
        )
        if any(str(f.get("SenderFault")).lower() == "true" for f in failed.values()):
            raise ConfigurationError(text + "; fix these messages before retrying them")
        raise BrokerUnavailable(text + "; retry the refused and unattempted ones later")

    # ---------------------------------------------------------------- subscribe

    async def subscribe(self, source: str, group: str, *, prefetch: int = 16) -> Subscription:
        """Consume ``source``. ``group`` is only a label: every subscription on a queue competes
        for the same messages (SQS has no consumer groups). At most ``prefetch`` messages are
        received and unsettled at a time; receives ask for up to ``min(10, prefetch)``."""
        self._check_open()
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be >= 1, got {prefetch}")
        queue = await self._queue(source)
        visibility = self._visibility_override or queue.visibility_timeout
        if visibility < 1:
            raise ConfigurationError(
                f"queue {source!r} has VisibilityTimeout 0: every receive would be redelivered at "
                "once; set visibility_timeout on the SQSBroker or the queue"
            )
        sub = _SQSSubscription(self, queue, group, prefetch, visibility)
        self._subs.add(sub)
        return sub

    async def _receive(self, queue: _Queue, n: int, visibility: int) -> list[dict[str, Any]]:
        response = await self._call(
            "receive",
            "receive_message",
            "ReceiveMessage",
            queue.name,
            QueueUrl=queue.url,
            MaxNumberOfMessages=n,
            WaitTimeSeconds=self._wait_time,
            VisibilityTimeout=visibility,
            MessageAttributeNames=["All"],
            # AttributeNames is the older spelling; compatible servers may know only one of them
            AttributeNames=_SYSTEM_ATTRIBUTES,
            MessageSystemAttributeNames=_SYSTEM_ATTRIBUTES,
        )
        return list(response.get("Messages") or [])

    # ---------------------------------------------------------------- settling

    async def _delete(self, queue: _Queue, d: SQSDelivery) -> None:
        batcher = self._deleters.get(queue.name)
        if batcher is None:
            batcher = self._deleters[queue.name] = _DeleteBatcher(self, queue)
        await batcher.delete(d)

    async def _change_visibility(self, d: SQSDelivery, seconds: int, *, strict: bool) -> None:
        try:
            await self._call(
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

    async def _return_now(self, queue: _Queue, deliveries: Sequence[SQSDelivery]) -> None:
        """Make ``deliveries`` visible at once (graceful close). Failures are logged only: the
        messages then come back when their visibility expires."""
        for i in range(0, len(deliveries), MAX_BATCH):
            chunk = deliveries[i : i + MAX_BATCH]
            try:
                response = await self._call(
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

    async def _dead_letter(self, d: SQSDelivery, reason: str) -> None:
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
            params["MessageGroupId"] = system.get("MessageGroupId") or self._default_group
            params["MessageDeduplicationId"] = system.get("MessageDeduplicationId") or d.message_id
        try:
            await self._call(
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

    # ---------------------------------------------------------------- close

    async def close(self) -> None:
        """Close every subscription gracefully, send pending deletes, wait (bounded) for
        background calls, then close the clients. Idempotent."""
        if self._closing:
            return
        self._closing = True
        for sub in list(self._subs):
            await sub.close()
        for batcher in self._deleters.values():
            batcher.flush()
        if self._background:
            # a long poll in flight finishes within wait_time; everything else is quick
            _, pending = await asyncio.wait(set(self._background), timeout=self._wait_time + 5.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._closed = True
        if self._stack is not None:
            await self._stack.aclose()
        self._client = self._send_client = self._stack = None

    def __repr__(self) -> str:
        creds = ", credentials=***" if self._credentials else ""
        return (
            f"SQSBroker(endpoint={self._endpoint or 'AWS'!r}, region={self._region!r}{creds}, "
            f"queues={sorted(self._queues)})"
        )
