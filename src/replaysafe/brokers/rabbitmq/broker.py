"""The RabbitMQ adapter (aio-pika): RabbitMQ's own semantics, visible rather than disguised.

Topology (declared idempotently by :meth:`RabbitMQBroker.declare` and by ``subscribe``)::

    publish(dest) ──► exchange ``dest`` (fanout, durable)
                        ├──► queue ``dest/groupA`` ──reject / delivery-limit──► ``dest/groupA/dead``
                        │        ▲
                        │        └── dead-letters back on expiry ── ``dest/groupA/retry/<N>s``
                        └──► queue ``dest/groupB`` …

- A **fanout** exchange per destination, one durable queue per consumer group bound to it: every
  group receives every message (``independent_groups=True``) and consumers of one group compete for
  its queue. Fanout rather than direct because routing has nothing to decide here: a destination
  *is* the routing decision, and a fanout never drops a message over a routing-key typo.
- Queues are **quorum** queues by default (replicated, ``x-delivery-count``); ``queue_type=
  "classic"`` is available for servers or policies that need it. Quorum queues need RabbitMQ
  >= 3.10 here (per-message TTL and at-least-once dead-lettering).
- Each group queue dead-letters through the default exchange straight into its own
  ``…/dead`` queue (a reject, or the quorum ``delivery-limit`` — 20 by default from RabbitMQ 4.0,
  unlimited on 3.x unless ``delivery_limit`` is given). Without a dead-letter target a quorum queue
  *drops* a message past the limit; with one it moves it. Dead-lettering from quorum queues uses
  the ``at-least-once`` strategy (with ``x-overflow=reject-publish``, which it requires), so a
  broker failure during the move duplicates rather than loses.
- Names are composed from escaped parts (``%`` → ``%25``, ``/`` → ``%2F``), so ``("a/b", "c")``
  and ``("a", "b/c")`` never share a queue.

Wire format: body = the payload bytes; AMQP ``content_type`` = the envelope's content type;
``message_id`` = the operation id; ``timestamp`` = the publish time (seconds, the broker-timestamp
fallback); headers = :meth:`Envelope.wire_headers` plus ``x-replaysafe-key`` (the ordering key).
Deliveries carry the raw body and *text* headers (non-string AMQP values are rendered as text;
broker bookkeeping such as ``x-death`` and ``x-delivery-count`` is kept out of ``headers`` and
available in ``RabbitMQDelivery.amqp_headers``). A message from a plain AMQP client arrives as a
delivery like any other: nothing here raises on a bad message; the runtime decides.

Semantics:

- ``ack`` = ``basic.ack`` (COMPLETED), coalesced: the acks of one loop tick (a batch) go out on
  the next tick as ONE ``basic.ack(multiple=True)`` for the highest tag below which every tag of
  the channel is acked or already settled by its own frame; acked tags above a still-unsettled one
  go out one by one in the same flush. A nack or reject is never covered by a multiple ack (its
  tag stops the run until its own frame is queued). ``ack()`` returns once the covering frame is
  written. An ack on a channel that has died is *not* an error: RabbitMQ already requeued the
  message and will redeliver it; the ledger answers the copy. It is logged. Acks not yet written
  when the channel closes (or when the subscription is abandoned) are never sent.
- ``ack_confirmed`` (at-most-once) = the ack, then ONE ``basic.qos`` round trip on the same
  channel shared by the confirmations of a loop tick: RabbitMQ answers it only after it has
  processed the frames before it, so a crash of this process after it returns cannot bring the
  message back (a written frame alone could still be in a buffer, a proxy or the broker's
  channel mailbox, which a dying connection discards).
- Prefetch: ``subscribe(prefetch=n)`` hands out at most ``n`` unsettled deliveries and asks
  RabbitMQ for ``basic.qos(2n)``, so the next batch is already buffered while one runs;
  ``next_batch`` lets a burst of deliveries grow the batch for a couple of loop ticks.
- ``nack()`` / ``nack(0)`` = ``basic.reject(requeue=True)``: redelivered at once with
  ``redelivered=True``. (``basic.reject`` rather than ``basic.nack``: from RabbitMQ 4.3 only a
  reject counts as a failed delivery in ``x-delivery-count`` / ``delivery-limit``.)
- ``nack(delay)`` with delay > 0 never spins: a copy (same body and properties, plus
  ``x-replaysafe-attempts``) is published with a per-message TTL to a retry queue that
  dead-letters back into the group's queue; only after the copy is *confirmed* is the original
  acked. A crash in between leaves two copies (the ledger dedupes), never none. Retry queues are
  banded by powers of two (``retry/1s``, ``retry/2s``, ``retry/4s`` …; a delay d goes to the band
  ``2**ceil(log2 d)``): RabbitMQ expires messages only at the head of a queue, so one retry queue
  for all delays would hold a 1 s retry behind a 60 s one; within a band the wait is at most twice
  the requested delay and never shorter. If the copy cannot be published, the original is held
  (unacked, occupying a prefetch slot) and requeued after the delay instead.
- ``reject(reason)`` = ``basic.reject(requeue=False)``: the message moves to ``…/dead``
  (with RabbitMQ's ``x-death`` record; the reason string is logged, AMQP cannot carry it).
- ``extend`` raises ``CapabilityError``: an unacked delivery is held until it is settled or its
  channel closes (RabbitMQ's ``consumer_timeout``, 30 min by default, closes a channel that holds a
  delivery too long). Use ``nack(delay=…)`` to postpone.
- ``Delivery.attempt``: quorum queues count every return (``x-delivery-count`` + 1, plus the
  deliveries carried across retry-queue hops), so ``delivery_count=True``. Classic queues only say
  "redelivered": ``attempt`` is then a lower bound (``delivery_count=False``).
- Connection loss: both connections (one publishing, one consuming, so that flow control on
  publishers never stalls acks) reconnect on their own (aio-pika robust connections) and
  subscriptions resume consuming. Deliveries of a dead channel are requeued by RabbitMQ; those
  still buffered are dropped and come back. A subscription consumes on the aiormq channel
  underneath its robust channel (aio-pika's consumer would build an ``IncomingMessage`` and a
  second task per delivery) and consumes again when that channel reopens (``reopen_callbacks``,
  after the queue is declared again); ``RabbitMQDelivery.message`` builds the aio-pika view on
  first use.
- ``publish`` waits for publisher confirms with ``mandatory=True``: unroutable (no queue bound) is a
  plain :class:`~replaysafe.errors.BrokerError`, nothing stored; no confirm within
  ``confirm_timeout``, a broker nack, or a connection lost after sending is
  :class:`~replaysafe.errors.PublishAmbiguous` (retry with the SAME envelopes).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import re
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, unquote, urlsplit

from replaysafe._redact import redact as redact_url
from replaysafe.brokers import _amqp_decode
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
from replaysafe.envelope import (
    HEADER_MALFORMED_TRANSPORT,
    HEADER_OPERATION_ID,
    RESERVED_HEADERS,
    Envelope,
)
from replaysafe.errors import (
    BrokerError,
    BrokerUnavailable,
    CapabilityError,
    ConfigurationError,
    MissingExtra,
    PublishAmbiguous,
)
from replaysafe.failpoints import (
    FAILPOINTS,
    PUBLISH_AFTER_ACCEPT,
    PUBLISH_BEFORE_ACCEPT,
    Failpoints,
)

if TYPE_CHECKING:
    from aio_pika.abc import (
        AbstractIncomingMessage,
        AbstractRobustChannel,
        AbstractRobustConnection,
        AbstractRobustQueue,
    )
    from aiormq.abc import AbstractChannel, DeliveredMessage

__all__ = [
    "ATTEMPTS_HEADER",
    "KEY_HEADER",
    "QueueType",
    "RabbitMQBroker",
    "RabbitMQDelivery",
    "Topology",
    "redact_url",
    "retry_band",
]

log = logging.getLogger("replaysafe.brokers.rabbitmq")

#: the ordering key of the envelope (AMQP has no key of its own; the routing key is rewritten on
#: the retry hop, a header survives it)
#: the AMQP port a URL without one means
AMQP_PORT = 5672

KEY_HEADER = "x-replaysafe-key"
#: deliveries a message had before it went through a retry queue (a retry copy is a new message
#: to RabbitMQ, whose x-delivery-count starts again at 0)
ATTEMPTS_HEADER = "x-replaysafe-attempts"
#: broker bookkeeping kept out of ``Delivery.headers`` (they are in ``amqp_headers``)
_TRANSPORT_HEADERS = frozenset(
    {KEY_HEADER, ATTEMPTS_HEADER, "x-delivery-count", "x-acquired-count", "x-death"}
)
_TRANSPORT_PREFIXES = ("x-first-death-", "x-last-death-")
#: the wire format's own headers, in a stable order (for the findings of undecodable values)
_RESERVED_SORTED = tuple(sorted(RESERVED_HEADERS))

#: the longest delayed nack (longer ones are clamped, with a warning)
MAX_DELAY = 86_400.0
#: retry bands: 1 s, 2 s, 4 s … up to the first power of two >= MAX_DELAY
RETRY_BANDS: tuple[int, ...] = tuple(2**k for k in range(math.ceil(math.log2(MAX_DELAY)) + 1))

_PERSISTENT = 2
#: basic.qos is this many times ``prefetch``: ``prefetch`` deliveries handed out and unsettled,
#: the rest buffered, so the next batch is already here when one completes
_QOS_FACTOR = 2
#: how long ``next_batch`` lets a burst of deliveries grow its batch (see there)
_LINGER_TICKS = 2
_LINGER_SECONDS = 0.005
_MAX_NAME_BYTES = 255
QueueType = Literal["quorum", "classic"]


def _driver() -> ModuleType:
    try:
        import aio_pika
    except ImportError as exc:
        raise MissingExtra("rabbitmq", "aio-pika") from exc
    # a property the client cannot decode must not kill the consuming connection (it would
    # wedge the queue): decoded tolerantly, the delivery is marked and quarantined
    _amqp_decode.install()
    return aio_pika


# --------------------------------------------------------------------------- names


def _escape(part: str) -> str:
    # '/' separates the parts of a queue name and '%' escapes: both are escaped inside a part
    return part.replace("%", "%25").replace("/", "%2F")


def _unescape(part: str) -> str:
    return re.sub("%(25|2F)", lambda m: "%" if m.group(1) == "25" else "/", part)


def _management_get(url: str, auth: tuple[str, str], timeout: float) -> Any:
    """One GET on the RabbitMQ management HTTP API; the decoded JSON."""
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{what} name must be a non-empty string, got {name!r}")
    if name.startswith("amq."):
        raise ConfigurationError(
            f"{what} name {name!r} starts with 'amq.', which RabbitMQ reserves for itself; "
            "choose another name"
        )
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ConfigurationError(f"{what} name {name!r} contains control characters")
    return name


def _check_length(name: str) -> str:
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        raise ConfigurationError(
            f"RabbitMQ name {name[:60]!r}… is longer than {_MAX_NAME_BYTES} bytes (AMQP short "
            "string); use shorter destination and group names"
        )
    return name


@dataclass(frozen=True, slots=True)
class Topology:
    """The RabbitMQ names behind one (destination, group): for operators and tests."""

    exchange: str
    queue: str
    dead_letter_queue: str

    @classmethod
    def of(cls, source: str, group: str) -> Topology:
        _check_name("destination", source)
        _check_name("group", group)
        queue = f"{_escape(source)}/{_escape(group)}"
        topo = cls(_check_length(source), _check_length(queue), _check_length(f"{queue}/dead"))
        _check_length(topo.retry_queue(RETRY_BANDS[-1]))
        return topo

    def retry_queue(self, band: int) -> str:
        """The retry queue holding delays in ``(band/2, band]`` seconds (``(0, 1]`` for band 1)."""
        return f"{self.queue}/retry/{band}s"

    @property
    def retry_queues(self) -> tuple[str, ...]:
        return tuple(self.retry_queue(b) for b in RETRY_BANDS)


def retry_band(delay: float) -> int:
    """The retry band of ``delay`` seconds: the smallest power of two >= delay (at least 1)."""
    if delay <= 1.0:
        return 1
    return min(b for b in RETRY_BANDS if b >= min(delay, MAX_DELAY))


# --------------------------------------------------------------------------- headers


def _text(value: Any, *, exact: bool = False) -> str:
    """An AMQP field value as text (plain clients send ints, bools, bytes, timestamps…).
    ``exact``: bytes that are not UTF-8 as ``\\xNN`` escapes, not U+FFFD, so that two values
    stay two (the rs-* headers: such a message is refused, and its quarantine entry must not
    merge with another one's)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        # 'replace', not 'surrogateescape': a lone surrogate would break the ledger's encoders
        return bytes(value).decode("utf-8", "backslashreplace" if exact else "replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        dt = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return dt.isoformat()
    return str(value)


def _undecodable_text(found: Sequence[str]) -> str:
    listed = "; ".join(found)
    if len(listed) > 1000:
        listed = listed[:1000] + "…"
    return (
        f"RabbitMQ delivered AMQP metadata the client could not decode: {listed}. Fix the "
        "producer: AMQP short strings (content type, message id, type, app id, header names, "
        "routing key) and rs-* header values must be UTF-8 and the timestamp seconds since 1970"
    )


def _is_transport(name: str) -> bool:
    return name in _TRANSPORT_HEADERS or name.startswith(_TRANSPORT_PREFIXES)


def _count(value: Any) -> int | None:
    """A non-negative integer header (x-delivery-count, our attempts), or None if unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str | bytes):
        try:
            n = int(value)
        except ValueError:
            return None
        return n if n >= 0 else None
    return None


def _epoch(value: Any) -> float | None:
    if isinstance(value, datetime):
        dt = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return dt.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


# --------------------------------------------------------------------------- deliveries


class RabbitMQDelivery(Delivery):
    """One AMQP delivery. Settling twice is harmless; a settle on a dead channel is logged, not
    raised (RabbitMQ requeued the message when the channel died)."""

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

    @property
    def settled(self) -> bool:
        return self._settled

    def _begin(self) -> bool:
        """Mark settled; False when it already was (the second settle does nothing)."""
        if self._settled:
            return False
        self._settled = True
        return True

    def _done(self) -> None:
        # counted in flight until RabbitMQ has the settle (or the copy), not merely asked for it
        self._sub._unsettled.discard(self)
        self._sub._room.set()

    async def ack(self) -> None:
        """``basic.ack`` (boundary COMPLETED), coalesced: returns once an ack frame that covers
        this delivery is written (a ``multiple=True`` ack for a contiguous run of acked tags,
        see :class:`_AckBook`). On a dead channel: logged; the message comes back."""
        if self._begin():
            try:
                await self._sub._ack(self)
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
        if not self._begin():
            raise BrokerUnavailable(
                f"RabbitMQ: {self.delivery_id} was already settled, so this ack cannot be "
                "confirmed; do not run an at-most-once effect for it"
            )
        confirmed = False
        try:
            written = await self._sub._ack(self)
            confirmed = written and await self._sub._barrier(self._delivered.channel)
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

    async def nack(self, delay: float | None = None) -> None:
        """Redeliver: at once (``basic.reject(requeue=True)``) for None/0, else through the retry
        queue after ``delay`` seconds (copy confirmed first, then the original acked)."""
        if not self._begin():
            return
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

    async def reject(self, reason: str) -> None:
        """``basic.reject(requeue=False)``: dead-lettered into the group's ``…/dead`` queue."""
        if self._begin():
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


def _driver_aiormq() -> ModuleType:
    try:
        import aiormq
    except ImportError as exc:
        raise MissingExtra("rabbitmq", "aio-pika") from exc
    return aiormq


# --------------------------------------------------------------------------- ack coalescing


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


# --------------------------------------------------------------------------- subscription

_CLOSED = None  # buffer sentinel: wakes every pending __anext__ after close


class _RabbitSubscription(Subscription):
    def __init__(
        self, broker: RabbitMQBroker, topology: Topology, group: str, prefetch: int
    ) -> None:
        self.broker = broker
        self.topology = topology
        self.group = group
        self.prefetch = prefetch
        self._buffer: asyncio.Queue[DeliveredMessage | None] = asyncio.Queue()
        self._unsettled: set[RabbitMQDelivery] = set()
        self._held: set[asyncio.Task[None]] = set()
        #: set when a delivery settles: room to hand out another within ``prefetch``
        self._room = asyncio.Event()
        #: set when a message is buffered (or on close): ``next_batch`` waits on it
        self._arrived = asyncio.Event()
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractRobustQueue | None = None
        #: the consumer tag, on the channel (underneath the robust one) that consumes now
        self._tag: str | None = None
        self._underlay: AbstractChannel | None = None
        self._closed = False
        #: set right before channel.close: from then on no settle frame may be sent on it
        self._channel_closing = False
        #: the ack book of the channel delivering now, and every book with acks still to send
        self._book: _AckBook | None = None
        self._books: list[_AckBook] = []
        self._flusher: asyncio.Future[None] | None = None
        #: closed as a crash: no ack that is not on the wire yet may go out any more
        self._abandoned = False
        #: per channel, the round trip that the next ``_barrier`` callers share (not sent yet)
        self._barriers: dict[AbstractChannel, asyncio.Future[bool]] = {}
        self._barrier_tasks: set[asyncio.Task[None]] = set()

    async def _open(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        self._channel = channel
        # twice the deliveries handed out: the next batch is already here when one completes
        await channel.set_qos(prefetch_count=self.prefetch * _QOS_FACTOR)
        # declared (not just referenced) on this channel so that a reconnect re-declares it
        self._queue = await channel.declare_queue(
            self.topology.queue, durable=True, arguments=self.broker._queue_args(self.topology)
        )
        # consumed on the aiormq channel underneath: aio-pika's own consumer would wrap every
        # delivery in an IncomingMessage (~13 us) and one more task. A reconnect (or a channel the
        # server closed) re-declares the queue and then calls reopen_callbacks: consume again.
        channel.reopen_callbacks.add(self._reconsume)
        await self._consume_on(await channel.get_underlay_channel())

    async def _consume_on(self, underlay: AbstractChannel) -> None:
        ok = await underlay.basic_consume(self.topology.queue, self._on_message, no_ack=False)
        self._tag = ok.consumer_tag
        self._underlay = underlay

    async def _reconsume(self, channel: object) -> None:
        if self._closed or self._channel is None:
            return
        aiormq = _driver_aiormq()
        try:
            await self._consume_on(await self._channel.get_underlay_channel())
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError, OSError) as exc:
            log.error(
                "%s: could not consume again after the channel reopened (%s: %s); close this "
                "subscription and subscribe again",
                self,
                type(exc).__name__,
                self.broker._scrub(str(exc)),
            )

    async def _on_message(self, message: DeliveredMessage) -> None:
        self._track(message)  # even after close: an unsettled tag must stop a multiple ack
        if not self._closed:
            self._buffer.put_nowait(message)
            self._arrived.set()

    def _track(self, message: DeliveredMessage) -> None:
        tag = message.delivery_tag
        channel = message.channel
        if channel.is_closed:
            return  # RabbitMQ requeued it with the channel; _wrap drops it
        book = self._book
        if book is None or book.channel is not channel:
            # a new channel (first open or a reconnect): its tags start again at 1
            book = self._book = _AckBook(channel)
            self._books = [b for b in self._books if b.acked]
            self._books.append(book)
        if tag:
            book.receive(tag)

    async def _ack(self, d: RabbitMQDelivery) -> bool:
        """Ack ``d`` through its channel's book: sent on the next loop tick, together with every
        other ack of that tick (one ``multiple=True`` frame for a contiguous run). True once a
        frame covering it is written; False when the channel closed first."""
        book = d._book
        tag = d.tag
        if book is None or tag not in book.live or tag in book.acked:
            return await _settle_quietly(d, "ack", lambda m: m.ack())
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        book.acked[tag] = fut
        if book is not self._book and book not in self._books:
            self._books.append(book)  # an older channel's: the flush finds it dead, drops it
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_acks())
        return await fut

    async def _flush_acks(self) -> None:
        try:
            while True:
                await asyncio.sleep(0)  # the other acks of this tick (the batch) join
                books = [b for b in self._books if b.acked]
                if not books:
                    return
                for book in books:
                    await self._send_acks(book)
                self._books = [b for b in self._books if b is self._book or b.acked]
        finally:
            self._flusher = None

    async def _send_acks(self, book: _AckBook) -> None:
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
                if self._channel_closing or self._abandoned or book.channel.is_closed:
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
                self.topology.queue,
            )
        finally:
            missed = (0 if covered_sent else len(covered)) + len(waiters) - singles_sent
            if missed > 0:
                log.warning(
                    "%d acks on %s not sent: the channel closed (or is closing) first, so "
                    "RabbitMQ requeues those messages and will redeliver them",
                    missed,
                    self.topology.queue,
                )
            for fut in covered:
                if not fut.done():
                    fut.set_result(covered_sent)
            for i, fut in enumerate(waiters):  # singles go out in order
                if not fut.done():
                    fut.set_result(i < singles_sent)

    async def _barrier(self, channel: AbstractChannel) -> bool:
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
            self._barrier_tasks.add(task)
            task.add_done_callback(self._barrier_tasks.discard)
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
            if self._channel_closing or self._abandoned or channel.is_closed:
                return
            # basic.qos with the prefetch the channel already has: answered by the channel
            # process itself, in order, with no other effect (global=False only sets the
            # prefetch of consumers created later, and it is the same value)
            await channel.basic_qos(
                prefetch_count=self.prefetch * _QOS_FACTOR, timeout=self.broker.confirm_timeout
            )
            answered = True
        except TimeoutError:  # before OSError, of which it is a subclass
            # aiormq closes a channel whose call timed out: RabbitMQ requeues what it held
            log.warning(
                "RabbitMQ did not confirm the acks sent on %s within %gs; the channel is "
                "closed, so those messages may come back or be gone",
                self.topology.queue,
                self.broker.confirm_timeout,
            )
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError, OSError) as exc:
            log.warning(
                "RabbitMQ did not confirm the acks sent on %s (%s: %s): the channel closed, so "
                "those messages may come back or be gone",
                self.topology.queue,
                type(exc).__name__,
                exc,
            )
        finally:
            if self._barriers.get(channel) is fut:
                del self._barriers[channel]
            if not fut.done():
                fut.set_result(answered)

    def _drop_acks(self) -> None:
        """Abandon acks not yet sent (they stay unacked: RabbitMQ requeues them) and wake their
        waiters."""
        for book in self._books:
            for fut in book.acked.values():
                if not fut.done():
                    fut.set_result(False)
            book.acked.clear()

    def _wrap(self, message: DeliveredMessage) -> RabbitMQDelivery | None:
        channel = message.channel
        if channel.is_closed or not getattr(channel.connection, "is_opened", True):
            # RabbitMQ requeues it when the channel dies; the copy on the new channel follows
            return None
        book = self._book
        if book is not None and (
            book.channel is not channel or message.delivery_tag not in book.live
        ):
            book = None
        d = RabbitMQDelivery(self, message, book)
        self._unsettled.add(d)
        return d

    async def __anext__(self) -> Delivery:
        """The next delivery. Cancelling a pending call loses nothing (the buffer keeps it)."""
        while True:
            if self._closed:
                raise StopAsyncIteration
            while len(self._unsettled) >= self.prefetch and not self._closed:
                self._room.clear()
                await self._room.wait()
            if self._closed:
                raise StopAsyncIteration
            message = await self._buffer.get()
            if message is _CLOSED:
                self._buffer.put_nowait(_CLOSED)
                raise StopAsyncIteration
            d = self._wrap(message)
            if d is not None:
                return d

    async def next_batch(self, max_items: int) -> list[Delivery]:
        """One delivery (waiting for it) plus what else arrives while RabbitMQ is still sending,
        up to ``max_items`` and within ``prefetch`` unsettled.

        A prefetch window's worth of messages arrives as a burst spread over several loop ticks
        (each frame goes through aiormq and aio-pika tasks before it is buffered), so taking only
        what is buffered at the first delivery gives batches of 2-7. The batch keeps growing
        while the buffer does: it is taken after ``_LINGER_TICKS`` ticks without a new message,
        or after ``_LINGER_SECONDS``; an idle queue costs two loop ticks, not a timer. Nothing
        is taken before the last wait: a cancelled call loses nothing (the buffer keeps it)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._ready()
            deadline = loop.time() + _LINGER_SECONDS
            idle = 0
            while (
                idle < _LINGER_TICKS
                and self._buffer.qsize() < max_items
                and not self._closed
                and loop.time() < deadline
            ):
                before = self._buffer.qsize()
                await asyncio.sleep(0)
                idle = idle + 1 if self._buffer.qsize() == before else 0
            # from here on no await: the batch is handed out whole or not at all
            batch: list[Delivery] = []
            room = min(max_items, self.prefetch - len(self._unsettled))
            while len(batch) < room and not self._buffer.empty():
                message = self._buffer.get_nowait()
                if message is _CLOSED:
                    self._buffer.put_nowait(_CLOSED)
                    break
                d = self._wrap(message)
                if d is not None:
                    batch.append(d)
            if batch:
                return batch
            if self._closed:
                raise StopAsyncIteration

    async def _ready(self) -> None:
        """Wait (taking nothing) until a message is buffered and one more may be handed out
        within ``prefetch``. ``StopAsyncIteration`` once closed."""
        while True:
            if self._closed:
                raise StopAsyncIteration
            if len(self._unsettled) >= self.prefetch:
                self._room.clear()
                await self._room.wait()
            elif self._buffer.empty():
                self._arrived.clear()
                await self._arrived.wait()
            else:
                return

    async def _delay(self, d: RabbitMQDelivery, seconds: float) -> bool:
        """Delayed redelivery of ``d``; True when the original is held here (fallback)."""
        if seconds > MAX_DELAY:
            log.warning(
                "nack delay of %.0fs on %s clamped to %.0fs", seconds, d.delivery_id, MAX_DELAY
            )
            seconds = MAX_DELAY
        band = retry_band(seconds)
        try:
            await self.broker._republish_delayed(self.topology, band, d, seconds)
        except (BrokerError, ConfigurationError) as exc:
            # never a tight requeue loop: hold the original (unacked) and requeue it after the
            # delay; if the channel dies meanwhile RabbitMQ requeues it anyway
            log.warning(
                "delayed nack of %s could not use the retry queue (%s); holding it for %.1fs, "
                "then requeueing",
                d.delivery_id,
                exc,
                seconds,
            )
            task = asyncio.ensure_future(self._requeue_later(d, seconds))
            self._held.add(task)
            task.add_done_callback(self._held.discard)
            return True
        # the copy is confirmed: acking the original now can only duplicate, never lose
        await self._ack(d)
        return False

    async def _requeue_later(self, d: RabbitMQDelivery, seconds: float) -> None:
        try:
            await self.broker.clock.sleep(seconds)
            await _settle_quietly(d, "delayed requeue", lambda m: m.reject(requeue=True))
        finally:
            d._done()

    async def close(self, *, abandon: bool = False) -> None:
        """Stop consuming and wake pending ``__anext__`` calls.

        Graceful: cancel the consumer, requeue what was buffered but never handed out
        (``basic.nack``: not a failed delivery), then close the channel (RabbitMQ requeues any
        delivery still unsettled). ``abandon=True`` only closes the channel, as a crash would:
        RabbitMQ requeues everything unacked. Held delayed-nack timers are dropped in both cases
        (their messages return at once with the channel). Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._abandoned = abandon
        self._room.set()
        self._arrived.set()
        self._buffer.put_nowait(_CLOSED)
        self.broker._subs.discard(self)
        for task in list(self._held):
            task.cancel()
        aiormq = _driver_aiormq()
        gone = (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError, OSError, TimeoutError)
        # bounded: a robust channel waits for a reconnect before any call, and the server may be
        # gone for good; RabbitMQ requeues whatever this does not get to settle
        flusher = self._flusher
        if abandon and flusher is not None:
            # as a crash: acks not yet written stay unacked and their messages come back
            flusher.cancel()
            await asyncio.wait({flusher})
        if abandon and self._barrier_tasks:
            # as a crash: an ack not yet confirmed stays unconfirmed for its waiter
            for task in list(self._barrier_tasks):
                task.cancel()
            await asyncio.wait(list(self._barrier_tasks))
        with contextlib.suppress(*gone):
            async with asyncio.timeout(self.broker.connect_timeout):
                if not abandon and self._underlay is not None and self._tag is not None:
                    with contextlib.suppress(*gone):
                        await self._underlay.basic_cancel(self._tag)
                    if self._flusher is not None:  # acks already made are sent, not redelivered
                        await asyncio.wait({self._flusher})
                    while self._barrier_tasks:  # and the confirmations asked for are answered
                        await asyncio.wait(list(self._barrier_tasks))
                    while not self._buffer.empty():
                        message = self._buffer.get_nowait()
                        if message is not _CLOSED and message.delivery_tag:
                            with contextlib.suppress(*gone):
                                await message.channel.basic_nack(
                                    delivery_tag=message.delivery_tag, requeue=True
                                )
                    self._buffer.put_nowait(_CLOSED)
                if self._channel is not None:
                    self._channel.reopen_callbacks.discard(self._reconsume)
                    self._channel_closing = True
                    self._drop_acks()
                    await self._channel.close()
        self._drop_acks()

    def __repr__(self) -> str:
        return (
            f"<RabbitMQSubscription {self.topology.queue!r} prefetch={self.prefetch} "
            f"unsettled={len(self._unsettled)} closed={self._closed}>"
        )


# --------------------------------------------------------------------------- the broker


class RabbitMQBroker(Broker):
    """RabbitMQ through aio-pika (see the module docstring for topology and semantics).

    ``url`` is an ``amqp://`` or ``amqps://`` URL (its password is redacted in repr, logs and
    errors). ``queue_type`` chooses quorum (default; ``delivery_count=True``) or classic queues.
    ``confirm_timeout`` bounds the wait for a publisher confirm (then ``PublishAmbiguous``);
    ``connect_timeout`` bounds connecting and declaring (then ``BrokerUnavailable``);
    ``reconnect_interval`` is the pause between reconnection attempts. ``delivery_limit`` sets the
    quorum ``x-delivery-limit`` (None: the server's default, unlimited on 3.x, 20 on 4.x); past it
    RabbitMQ moves the message to the group's dead-letter queue. ``management_url`` is the
    management HTTP API (default ``http://<AMQP host>:15672``, ``""`` for none), used only to list
    the queues bound to a source (:meth:`stray_groups`): AMQP itself cannot.

    ``failpoints`` (default: the process-wide registry) is hit around each envelope's publish:
    ``PUBLISH_BEFORE_ACCEPT`` before it is sent, ``PUBLISH_AFTER_ACCEPT`` right after its confirm.
    Connections are opened on first use (or by :meth:`connect`).
    """

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        clock: Clock = SYSTEM_CLOCK,
        failpoints: Failpoints | None = None,
        queue_type: QueueType = "quorum",
        confirm_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        reconnect_interval: float = 1.0,
        delivery_limit: int | None = None,
        management_url: str | None = None,
    ) -> None:
        _driver()
        scheme = urlsplit(url).scheme if isinstance(url, str) else ""
        if scheme not in ("amqp", "amqps"):
            raise ConfigurationError(
                f"RabbitMQBroker needs an amqp:// or amqps:// URL, got {redact_url(str(url))!r}"
            )
        if queue_type not in ("quorum", "classic"):
            raise ConfigurationError(
                f"queue_type must be 'quorum' or 'classic', got {queue_type!r}"
            )
        for name, value in (
            ("confirm_timeout", confirm_timeout),
            ("connect_timeout", connect_timeout),
            ("reconnect_interval", reconnect_interval),
        ):
            if not value > 0:
                raise ConfigurationError(f"{name} must be > 0 seconds, got {value!r}")
        if delivery_limit is not None and (queue_type != "quorum" or delivery_limit < 1):
            raise ConfigurationError(
                "delivery_limit needs queue_type='quorum' and a value >= 1 "
                f"(got {delivery_limit!r} with {queue_type!r}); classic queues have no limit"
            )
        self._url = url
        self._password = urlsplit(url).password or ""
        if management_url is None:  # the management plugin's default port on the AMQP host
            host = urlsplit(url).hostname or "127.0.0.1"
            web = "https" if scheme == "amqps" else "http"
            management_url = f"{web}://{'[' + host + ']' if ':' in host else host}:15672"
        #: the management HTTP API :meth:`stray_groups` lists queues through ("" disables it)
        self._management_url = management_url
        self.url = redact_url(url)
        self._clock = clock
        self._failpoints = FAILPOINTS if failpoints is None else failpoints
        self.queue_type: QueueType = queue_type
        self.confirm_timeout = float(confirm_timeout)
        self.connect_timeout = float(connect_timeout)
        self.reconnect_interval = float(reconnect_interval)
        self.delivery_limit = delivery_limit
        self.server_version: tuple[int, ...] | None = None
        self._publish_conn: AbstractRobustConnection | None = None
        self._consume_conn: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._conn_lock = asyncio.Lock()
        self._exchanges: set[str] = set()
        self._queues: set[str] = set()
        self._declared: dict[str, set[str]] = {}
        # one publish per message_id at a time: aiormq matches a basic.return to its publish by
        # message_id, so two concurrent publishes of one operation could swap their outcomes
        self._sending: dict[str, asyncio.Future[None]] = {}
        self._subs: set[_RabbitSubscription] = set()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **opts: Any) -> RabbitMQBroker:
        """``RabbitMQBroker(url, **opts)``: the constructor under the name the CLI resolves."""
        return cls(url, **opts)

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def failpoints(self) -> Failpoints:
        return self._failpoints

    @property
    def declared(self) -> Mapping[str, frozenset[str]]:
        """Destinations and groups this broker object declared (for tests and cleanup)."""
        return {s: frozenset(g) for s, g in self._declared.items()}

    def in_flight(self) -> int:
        """Deliveries held by this broker's open subscriptions: buffered, handed out and not yet
        settled (a settle counts until RabbitMQ has it). With ``queue_depths`` (ready messages)
        it tells when a group is quiet."""
        return sum(len(s._unsettled) + s._buffer.qsize() for s in list(self._subs) if not s._closed)

    def topology(self, source: str, group: str) -> Topology:
        return Topology.of(source, group)

    def capabilities(self, source: str) -> Capabilities:
        return Capabilities(
            redelivery=RedeliveryKind.NACK,
            settle_granularity=SettleGranularity.MESSAGE,
            extend_visibility=False,
            # competing consumers and requeues reorder a queue
            ordered_within_key=False,
            delivery_count=self.queue_type == "quorum",
            native_dedup_window=None,
            delayed_nack=True,
            independent_groups=True,
        )

    async def describe(self, source: str) -> SourceFacts:
        """What ``explain`` needs about ``source``. Read from this broker's configuration and the
        server version (one connection, no management API): RabbitMQ keeps a queued message until
        it is consumed (no retention unless a policy sets one), every group has its own
        dead-letter queue, and the quorum delivery limit is ``delivery_limit`` or the server's
        default (20 from RabbitMQ 4.0, none on 3.x)."""
        notes = [
            "no visibility timer: a delivery stays with its consumer until settled or until its "
            "channel closes (consumer_timeout, 30 min by default, closes a stuck one)",
            "nack(delay) goes through per-band retry queues (retry/1s, /2s, /4s ...): never "
            "earlier than asked, under twice the delay",
            "RabbitMQ stamps no publish time of its own: the AMQP timestamp is set by the "
            "publisher (replaysafe does; plain clients may not)",
        ]
        limit = self.delivery_limit
        if self.queue_type == "quorum":
            if self.server_version is None:
                with contextlib.suppress(BrokerError, ConfigurationError):
                    await self._connection("publish")
            if limit is None and self.server_version is not None and self.server_version >= (4,):
                limit = 20  # the server's default delivery-limit from 4.0
            if limit is not None:
                notes.append(
                    "the delivery limit counts returns per hop: a retry-queue copy starts again "
                    "at 0 (replaysafe's own attempt count carries over)"
                )
        else:
            notes.append("classic queues only say 'redelivered': attempt is a lower bound")
        return SourceFacts(
            broker="rabbitmq",
            retention=None,
            dead_letter=f"{_escape(source)}/<group>/dead (one per consumer group)",
            dead_letter_retention=None,
            redrive_window=None,
            delivery_limit=limit,
            visibility_timeout=None,
            broker_timestamps=False,
            notes=tuple(notes),
        )

    def __repr__(self) -> str:
        return f"RabbitMQBroker({self.url!r}, queue_type={self.queue_type!r})"

    # ---------------------------------------------------------------- errors

    def _scrub(self, text: str) -> str:
        """Remove the password from driver text (aio-pika masks its own URLs; other messages
        may not). A very short password is only removed where it sits in a URL, so that it does
        not blank out ordinary words."""
        pw = self._password
        if not pw:
            return text
        text = text.replace(f":{pw}@", ":***@")
        return text.replace(pw, "***") if len(pw) >= 4 else text

    def _describe(self, exc: BaseException) -> str:
        return self._scrub(f"{type(exc).__name__}: {exc}")

    def _declare_error(self, what: str, exc: BaseException) -> Exception:
        aiormq = _driver_aiormq()
        if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
            return ConfigurationError(
                f"RabbitMQ refused to declare {what} ({self._describe(exc)}): it already exists "
                f"with other settings (e.g. a different queue type than {self.queue_type!r}). "
                "Delete it, or configure RabbitMQBroker to match it"
            )
        if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
            return ConfigurationError(
                f"RabbitMQ refused access to {what} ({self._describe(exc)}); grant the user "
                f"configure/write/read permissions on it in {self.url}"
            )
        return BrokerUnavailable(
            f"could not declare {what} on {self.url} ({self._describe(exc)}); check that "
            "RabbitMQ is reachable, then retry"
        )

    # ---------------------------------------------------------------- connections

    async def connect(self) -> None:
        """Open both connections now (otherwise they open on first use)."""
        await self._connection("publish")
        await self._connection("consume")

    async def _connection(self, role: Literal["publish", "consume"]) -> AbstractRobustConnection:
        if self._closed:
            raise BrokerUnavailable("RabbitMQBroker is closed; create a new one")
        async with self._conn_lock:
            conn = self._publish_conn if role == "publish" else self._consume_conn
            if conn is not None:
                return conn
            conn = await self._open_connection(role)
            if role == "publish":
                self._publish_conn = conn
            else:
                self._consume_conn = conn
            return conn

    async def _open_connection(self, role: str) -> AbstractRobustConnection:
        aio_pika = _driver()
        aiormq = _driver_aiormq()
        try:
            async with asyncio.timeout(self.connect_timeout):
                conn: AbstractRobustConnection = await aio_pika.connect_robust(
                    self._url,
                    timeout=self.connect_timeout,
                    reconnect_interval=self.reconnect_interval,
                    # the pid tells an operator (and the chaos nemesis) whose connection it is
                    client_properties={"connection_name": f"replaysafe {role} pid={os.getpid()}"},
                )
        except aiormq.exceptions.ProbableAuthenticationError as exc:
            raise ConfigurationError(
                f"RabbitMQ at {self.url} refused the credentials ({self._describe(exc)}); check "
                "the user and password in the URL"
            ) from None
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            raise BrokerUnavailable(
                f"cannot connect to RabbitMQ at {self.url} ({self._describe(exc)}); check that "
                "the server runs and the URL is right, then retry"
            ) from None
        if self.server_version is None:
            self.server_version = _server_version(conn)
        if (
            self.queue_type == "quorum"
            and self.server_version is not None
            and self.server_version < (3, 10)
        ):
            await conn.close()
            raise ConfigurationError(
                f"RabbitMQ {'.'.join(map(str, self.server_version))} at {self.url} is too old "
                "for quorum queues with per-message TTL and at-least-once dead-lettering "
                "(3.10+); upgrade, or use queue_type='classic'"
            )
        return conn

    async def _publisher_channel(self) -> AbstractChannel:
        """The confirm-mode channel's current underlying channel (waits out a reconnect)."""
        conn = await self._connection("publish")
        if self._publisher is None:
            self._publisher = await conn.channel(publisher_confirms=True, on_return_raises=True)
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await self._publisher.get_underlay_channel()
        except TimeoutError:
            raise BrokerUnavailable(
                f"RabbitMQ at {self.url} is not reachable (reconnecting for more than "
                f"{self.connect_timeout}s); nothing was sent, retry later"
            ) from None

    # ---------------------------------------------------------------- topology

    def _queue_args(self, topo: Topology) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-queue-type": self.queue_type,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": topo.dead_letter_queue,
        }
        if self.queue_type == "quorum":
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
            if self.delivery_limit is not None:
                args["x-delivery-limit"] = self.delivery_limit
        return args

    def _retry_args(self, topo: Topology) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-queue-type": self.queue_type,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": topo.queue,
        }
        if self.queue_type == "quorum":
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
        return args

    async def _declare_on(self, what: str, steps: Any) -> None:
        """Run ``steps(channel)`` on a short-lived channel (a refused declaration closes its
        channel; the long-lived ones must not be the casualty)."""
        aiormq = _driver_aiormq()
        conn = await self._connection("publish")
        channel: AbstractRobustChannel | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                channel = await conn.channel(publisher_confirms=False)
                await steps(channel)
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            raise self._declare_error(what, exc) from None
        finally:
            if channel is not None:
                with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, OSError):
                    await channel.close()

    async def drop_source(self, source: str, groups: Sequence[str] = ()) -> None:
        """Delete the source and what was declared for it, messages included."""
        await self.delete(source, groups)

    async def prepare_source(
        self,
        source: str,
        groups: Sequence[str] = (),
        *,
        visibility_timeout: float | None = None,
        partitions: int | None = None,
    ) -> None:
        """The exchange and a queue (with its dead-letter queue) per group: see :meth:`declare`."""
        await self.declare(source, groups)

    async def declared_names(self, source: str, group: str) -> dict[str, str]:
        """The fanout exchange (publish there, any routing key), the group's queue bound to it
        and its dead-letter queue: names only, nothing is read from the server."""
        topo = Topology.of(source, group)
        return {
            "exchange": topo.exchange,
            "queue": topo.queue,
            "dead-letter queue": topo.dead_letter_queue,
        }

    async def declare(self, source: str, groups: Iterable[str] = ()) -> None:
        """Declare ``source``'s exchange and, for each group, its queue (bound to the exchange)
        and dead-letter queue. Idempotent; call it before publishing so that messages published
        before the first ``subscribe`` are kept, not returned as unroutable. A queue that exists
        with other settings raises ``ConfigurationError``."""
        aio_pika = _driver()
        _check_length(_check_name("destination", source))
        names_of_groups = list(groups)
        topos = [Topology.of(source, g) for g in names_of_groups]
        todo = [t for t in topos if t.queue not in self._queues]
        if source in self._exchanges and not todo:
            return

        async def steps(channel: AbstractRobustChannel) -> None:
            exchange = await channel.declare_exchange(
                source, aio_pika.ExchangeType.FANOUT, durable=True, robust=False
            )
            for t in todo:
                await channel.declare_queue(
                    t.dead_letter_queue,
                    durable=True,
                    arguments={"x-queue-type": self.queue_type},
                    robust=False,
                )
                queue = await channel.declare_queue(
                    t.queue, durable=True, arguments=self._queue_args(t), robust=False
                )
                await queue.bind(exchange, routing_key="", robust=False)

        names = ", ".join([f"exchange {source!r}", *(f"queue {t.queue!r}" for t in todo)])
        await self._declare_on(names, steps)
        self._exchanges.add(source)
        self._declared.setdefault(source, set()).update(names_of_groups)
        self._queues.update(t.queue for t in todo)

    async def _ensure_retry_queue(self, topo: Topology, band: int) -> str:
        name = topo.retry_queue(band)
        if name in self._queues:
            return name

        async def steps(channel: AbstractRobustChannel) -> None:
            await channel.declare_queue(
                name, durable=True, arguments=self._retry_args(topo), robust=False
            )

        await self._declare_on(f"retry queue {name!r}", steps)
        self._queues.add(name)
        return name

    async def delete(self, source: str, groups: Iterable[str]) -> None:
        """Delete ``groups``' queues (main, dead-letter, every retry band) and ``source``'s
        exchange. Destructive: the messages in them are gone. For tests and decommissioning."""
        aiormq = _driver_aiormq()
        topos = [Topology.of(source, g) for g in groups]
        conn = await self._connection("publish")
        names = [n for t in topos for n in (t.queue, t.dead_letter_queue, *t.retry_queues)]
        try:
            async with asyncio.timeout(self.connect_timeout * 3):
                channel = await conn.channel(publisher_confirms=False)
                try:
                    for n in names:
                        await channel.queue_delete(n)
                        self._queues.discard(n)
                    await channel.exchange_delete(source)
                finally:
                    with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, OSError):
                        await channel.close()
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            raise self._declare_error(f"the topology of {source!r}", exc) from None
        self._exchanges.discard(source)
        self._declared.pop(source, None)

    async def queue_depths(self, source: str, group: str) -> dict[str, int]:
        """Ready (not unacked) messages per queue of ``group``: main, dead-letter and each retry
        band that exists. For tests and operators; one passive declare per queue."""
        topo = Topology.of(source, group)
        found = await self._passive(
            f"the queues of {topo.queue!r}",
            [topo.queue, topo.dead_letter_queue, *topo.retry_queues],
        )
        return {name: messages for name, (messages, _) in found.items()}

    async def _passive(self, what: str, names: Sequence[str]) -> dict[str, tuple[int, int]]:
        """``(ready messages, consumers)`` of each queue of ``names`` that exists (a passive
        declare each; a missing queue is left out)."""
        aiormq = _driver_aiormq()
        conn = await self._connection("publish")
        out: dict[str, tuple[int, int]] = {}
        channel: AbstractRobustChannel | None = None
        try:
            async with asyncio.timeout(self.connect_timeout * 3):
                for name in names:
                    if channel is None:
                        channel = await conn.channel(publisher_confirms=False)
                    try:
                        q = await channel.declare_queue(name, passive=True, robust=False)
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        # the 404 closed the channel; open another for the next name. Close
                        # ours too: a robust channel the server closed reopens itself, and
                        # each probe of a missing queue leaked one (channel_max after ~110 calls)
                        dead, channel = channel, None
                        with contextlib.suppress(
                            aiormq.exceptions.AMQPError, RuntimeError, OSError
                        ):
                            await dead.close()
                        continue
                    result = q.declaration_result
                    out[name] = (int(result.message_count or 0), int(result.consumer_count or 0))
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            raise self._declare_error(what, exc) from None
        finally:
            if channel is not None:
                with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, OSError):
                    await channel.close()
        return out

    def group_name(self, source: str, group: str) -> str:
        """The group's queue (``<source>/<group>``, escaped: see :class:`Topology`)."""
        return Topology.of(source, group).queue

    async def group_state(self, source: str, group: str) -> GroupState:
        """Ready messages and consumers of the group's queue (a passive ``queue.declare``);
        ``exists=False`` until a subscribe or :meth:`declare` created it."""
        queue = Topology.of(source, group).queue
        found = (await self._passive(f"queue {queue!r}", [queue])).get(queue)
        if found is None:
            return GroupState(source, group, queue, messages=0, consumers=0, exists=False)
        return GroupState(source, group, queue, messages=found[0], consumers=found[1], exists=True)

    async def stray_groups(self, source: str, prefix: str) -> list[GroupState]:
        """Queues bound to ``source``'s exchange whose group starts with ``prefix``. AMQP 0-9-1
        cannot list bindings: they are read from the management HTTP API (``management_url``,
        by default ``http://<host>:15672`` with the AMQP URL's credentials); the counts then
        come from a passive ``queue.declare`` each (the API's own counts lag by its statistics
        interval, 5 s by default). Empty, with a debug log line, when the API cannot be reached
        (the plugin is off, or the port is closed)."""
        url = self._management_url
        if not url:
            return []
        parts = urlsplit(self._url)
        vhost = quote(unquote(parts.path[1:]) if len(parts.path) > 1 else "/", safe="")
        auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
        bindings_url = (
            f"{url.rstrip('/')}/api/exchanges/{vhost}/{quote(source, safe='')}/bindings/source"
        )
        try:
            # short: an unreachable API must not hold up a start (its thread outlives a cancel)
            bindings = await asyncio.to_thread(
                _management_get, bindings_url, auth, min(self.connect_timeout, 2.0)
            )
            head = f"{_escape(source)}/{_escape(prefix)}"
            names = sorted({str(b["destination"]) for b in bindings
                            if b.get("destination_type") == "queue"
                            and str(b.get("destination", "")).startswith(head)})  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug("RabbitMQ management API at %s: %s", url, self._scrub(str(exc)))
            return []
        found = await self._passive(f"the queues bound to {source!r}", names)
        return [
            GroupState(source, _unescape(name[len(_escape(source)) + 1 :]), name, n, c, True)
            for name, (n, c) in sorted(found.items())
        ]

    async def check(self) -> None:
        """Both connections are open, or ``BrokerUnavailable`` (a robust connection that is
        reconnecting counts as unreachable). Opens them if needed; no other I/O."""
        for role in ("publish", "consume"):
            conn = await self._connection(role)
            if conn.is_closed or not conn.connected.is_set():
                raise BrokerUnavailable(
                    f"the {role} connection to RabbitMQ at {self.url} is down (reconnecting "
                    f"every {self.reconnect_interval:g}s); check the server and the network"
                )

    # ---------------------------------------------------------------- publish

    async def publish(self, destination: str, envelopes: Sequence[Envelope]) -> None:
        """Publish each envelope to ``destination``'s exchange and wait for its confirm (boundary
        PUBLISHED when this returns). Sends are pipelined; outcomes are checked in order.

        Raises ``BrokerError`` when RabbitMQ returns a message as unroutable (no queue bound:
        nothing was stored -- declare the groups first), ``PublishAmbiguous`` when a confirm does
        not come within ``confirm_timeout``, the broker nacks, or the connection drops after a
        send (some envelopes may be stored: retry with the SAME envelopes; consumers dedupe),
        ``BrokerUnavailable`` when nothing could be sent.
        """
        if self._closed:
            raise BrokerUnavailable("RabbitMQBroker is closed; create a new one to publish")
        if not envelopes:
            return
        await self.declare(destination)
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
                    "sleep": self._clock.sleep,
                }
                await self._failpoints.hit(PUBLISH_BEFORE_ACCEPT, ctx)
                headers: dict[str, Any] = env.wire_headers()
                if env.key is not None:
                    headers[KEY_HEADER] = env.key
                props = self._properties(
                    content_type=env.content_type,
                    headers=headers,
                    message_id=env.operation_id,
                    timestamp=datetime.fromtimestamp(self._clock.now(), UTC),
                )
                sent.append(
                    (ctx, asyncio.ensure_future(self._send(destination, "", env.payload, props)))
                )
            for ctx, fut in sent:
                await fut
                await self._failpoints.hit(PUBLISH_AFTER_ACCEPT, ctx)
        finally:
            pending = [f for _, f in sent if not f.done()]
            if pending:
                # outcomes we will not report (an earlier one failed, or we are cancelled): let
                # them finish (bounded by confirm_timeout) so nothing is left running
                await asyncio.wait(pending)
            for _, f in sent:
                if f.done() and not f.cancelled():
                    f.exception()  # retrieved: the first failure is the one raised

    def _properties(self, **fields: Any) -> Any:
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
        try:
            channel = await self._publisher_channel()
            if channel.is_closed:
                raise BrokerUnavailable(
                    f"the publishing channel to {self.url} is closed (reconnecting); {what} was "
                    "not sent, retry"
                )
            try:
                result = await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=True,
                    timeout=self.confirm_timeout,
                )
            except aiormq.exceptions.PublishError as exc:
                if not exchange:
                    self._queues.discard(routing_key)  # a deleted retry queue: declare it again
                frame = getattr(exc, "frame", None)
                reply = getattr(frame, "reply_text", "returned")
                raise BrokerError(
                    f"RabbitMQ returned {what} as unroutable ({reply}): no queue is bound, so "
                    "nothing was stored. Declare the consumer groups first: "
                    f"await broker.declare({exchange or routing_key!r}, groups=[...])"
                ) from None
            except aiormq.exceptions.DeliveryError as exc:
                raise PublishAmbiguous(
                    f"RabbitMQ nacked {what} ({self._describe(exc)}): some queues may hold it; "
                    "retry with the SAME operation id"
                ) from None
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                self._exchanges.discard(exchange)
                self._queues.discard(routing_key)
                raise BrokerError(
                    f"RabbitMQ has no {where} ({self._describe(exc)}); nothing was stored. "
                    "It was deleted after it was declared: declare it again"
                ) from None
            except aiormq.exceptions.ChannelAccessRefused as exc:
                raise ConfigurationError(
                    f"RabbitMQ refused to let this user publish to {where} "
                    f"({self._describe(exc)}); grant write permission"
                ) from None
            except TimeoutError:
                raise PublishAmbiguous(
                    f"no publisher confirm for {what} within {self.confirm_timeout}s; RabbitMQ "
                    "may or may not have stored it: retry with the SAME operation id"
                ) from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # our caller's cancellation
                raise PublishAmbiguous(
                    f"the channel closed while {what} awaited its confirm; retry with the SAME "
                    "operation id"
                ) from None
            except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
                raise PublishAmbiguous(
                    f"the connection to {self.url} failed while publishing {what} "
                    f"({self._describe(exc)}); it may have been stored: retry with the SAME "
                    "operation id"
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

    async def _republish_delayed(
        self, topo: Topology, band: int, d: RabbitMQDelivery, seconds: float
    ) -> None:
        """Publish ``d``'s copy to the retry queue of ``band`` with a ``seconds`` TTL; returns
        once RabbitMQ confirmed it."""
        queue = await self._ensure_retry_queue(topo, band)
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

    # ---------------------------------------------------------------- subscribe / close

    async def subscribe(self, source: str, group: str, *, prefetch: int = 16) -> Subscription:
        """Consume ``group``'s queue on ``source`` (declared first, with its dead-letter queue).
        At most ``prefetch`` deliveries are handed out and unsettled at a time; RabbitMQ may hold
        as many again in this consumer's buffer (``basic.qos(2 * prefetch)``), which a crash
        returns to the queue like the rest."""
        if self._closed:
            raise BrokerUnavailable("RabbitMQBroker is closed; create a new one to subscribe")
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be >= 1, got {prefetch}")
        topo = Topology.of(source, group)
        await self.declare(source, [group])
        conn = await self._connection("consume")
        sub = _RabbitSubscription(self, topo, group, prefetch)
        aiormq = _driver_aiormq()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await sub._open(conn)
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            await sub.close(abandon=True)
            raise self._declare_error(f"a consumer on {topo.queue!r}", exc) from None
        self._subs.add(sub)
        return sub

    async def close(self) -> None:
        """Close every subscription (gracefully) and both connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            await sub.close()
        aiormq = _driver_aiormq()
        for conn in (self._publish_conn, self._consume_conn):
            if conn is not None:
                with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, OSError):
                    await conn.close()


def _server_version(conn: AbstractRobustConnection) -> tuple[int, ...] | None:
    transport = getattr(conn, "transport", None)
    props = getattr(getattr(transport, "connection", None), "server_properties", None) or {}
    raw = props.get("version")
    text = _text(raw) if raw is not None else ""
    nums: list[int] = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        nums.append(int(digits))
    return tuple(nums) or None
