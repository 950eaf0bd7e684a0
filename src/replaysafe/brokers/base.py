"""The broker seam: Publisher, Subscriber, Subscription, Delivery and Capabilities.

A tiny core every backend implements, keeping each broker's own semantics visible through
``Capabilities`` instead of forcing them into one vocabulary: RabbitMQ redelivers on nack or channel
loss, SQS when a visibility timeout expires, Kafka from the committed offset.

Deliveries carry the *raw* message (body, headers, content type, key, broker timestamp). The runtime
decodes it into an :class:`~replaysafe.envelope.Envelope`, so that a bad message becomes a
quarantine decision in one place instead of an exception inside an adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from replaysafe.envelope import Envelope
from replaysafe.errors import BrokerUnavailable


class RedeliveryKind(StrEnum):
    NACK = "nack"  # RabbitMQ: requeued on nack or when the consumer's channel dies
    VISIBILITY_TIMEOUT = "visibility_timeout"  # SQS: visible again when the timer expires
    OFFSET_REWIND = "offset_rewind"  # Kafka: re-read from the committed offset


class SettleGranularity(StrEnum):
    MESSAGE = "message"  # each delivery settles alone
    CUMULATIVE_OFFSET = "cumulative_offset"  # a commit covers every earlier offset


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a broker (for one source) can do. The runtime validates handler configuration against
    it at start-up; the broker contract suite decides what to assert from it."""

    redelivery: RedeliveryKind
    settle_granularity: SettleGranularity
    #: ``Delivery.extend`` postpones redelivery (SQS ChangeMessageVisibility)
    extend_visibility: bool
    #: deliveries with the same key arrive in publish order
    ordered_within_key: bool
    #: ``Delivery.attempt`` counts every delivery exactly; otherwise it is a lower bound
    #: (e.g. RabbitMQ classic queues only say "redelivered")
    delivery_count: bool
    #: the broker itself drops duplicate publishes of one operation within this many seconds
    #: (SQS FIFO: 300); None when it has no such window
    native_dedup_window: float | None = None
    #: ``nack(delay=…)`` waits before redelivering (otherwise the delay is best effort)
    delayed_nack: bool = True
    #: each consumer group receives every message (Kafka groups, a queue per group on RabbitMQ);
    #: False where one queue is shared by everyone and the group name is only a label (SQS)
    independent_groups: bool = True


@dataclass(frozen=True, slots=True)
class SourceFacts:
    """What a broker can say about one source, for ``explain``. None means unknown/unbounded."""

    broker: str
    #: how long the broker keeps a message that nobody completes (seconds)
    retention: float | None = None
    dead_letter: str | None = None
    dead_letter_retention: float | None = None
    #: how long after quarantine/dead-lettering a message may still be redriven
    redrive_window: float | None = None
    #: deliveries after which the broker itself drops or dead-letters a message
    delivery_limit: int | None = None
    visibility_timeout: float | None = None
    #: the consumer commits before the handler runs (Kafka enable.auto.commit)
    auto_commit: bool | None = None
    #: the broker stamps its own publish time (fallback for rs-published-at)
    broker_timestamps: bool = True
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GroupState:
    """What a broker can say, right now, about the queue (or group) one consumer group reads:
    for ``replaysafe run``'s start line and start-up check, and for ``explain``. ``None`` means
    the broker cannot tell."""

    source: str
    group: str
    #: the name the broker really uses: the RabbitMQ queue, the SQS queue URL, the Kafka topic
    #: and group id (renaming a handler renames its group, and with it this, where groups are
    #: real)
    name: str
    #: messages waiting for the group: ready (not delivered) on RabbitMQ, visible on SQS, the
    #: group's lag on Kafka
    messages: int | None = None
    #: consumers attached now (RabbitMQ consumers, Kafka group members; SQS cannot tell)
    consumers: int | None = None
    #: False when the queue or group does not exist (yet): the first subscribe declares it
    exists: bool | None = None

    @property
    def unread(self) -> bool:
        """Messages wait and nobody consumes them (where the broker can tell both)."""
        return bool(self.messages) and self.consumers == 0


class Delivery(ABC):
    """One transport copy of a message, handed to the runtime.

    Settling (``ack``/``nack``/``reject``) twice is harmless: the second call does nothing
    (:class:`SettleOnce`, every adapter's base, keeps that promise in one place).
    """

    body: bytes
    headers: Mapping[str, str]
    content_type: str | None
    key: str | None
    #: the broker's own publish time (Kafka record timestamp, SQS SentTimestamp, AMQP timestamp)
    broker_timestamp: float | None
    #: identifies this transport copy (offset, receipt, delivery tag): for logs, never for dedup
    delivery_id: str
    #: 1-based delivery count (a lower bound where ``Capabilities.delivery_count`` is False)
    attempt: int
    redelivered: bool
    received_at: float
    #: when the broker will redeliver if this copy is not settled (visibility end), or None
    settle_deadline: float | None

    @property
    @abstractmethod
    def settled(self) -> bool: ...

    @abstractmethod
    async def ack(self) -> None:
        """Complete at the broker (boundary COMPLETED): delete / ack / mark offset done."""

    async def ack_confirmed(self) -> None:
        """``ack()``, returning only once the broker holds the completion, so that no crash from
        now on brings this copy back. At-most-once needs it: its effect runs *after* the
        completion, and a completion still in flight when the process dies would redeliver the
        message and run the effect twice. Raises ``BrokerError`` when the completion cannot be
        confirmed (the caller must then not run the effect: the message may come back).

        The default is ``ack()``: for adapters whose ``ack()`` returns once the broker has it
        (memory; SQS: the delete is answered). Kafka overrides it: its ``ack()`` only marks the
        offset done, and the commit that covers it follows. RabbitMQ overrides it: a written ack
        frame is not a processed one, so a synchronous round trip on the channel follows it."""
        await self.ack()

    @abstractmethod
    async def nack(self, delay: float | None = None) -> None:
        """Ask for redelivery, after ``delay`` seconds where the broker can wait."""

    @abstractmethod
    async def reject(self, reason: str) -> None:
        """Settle without redelivery (dead-letter where the broker has one)."""

    @abstractmethod
    async def extend(self, seconds: float) -> None:
        """Postpone redelivery to ``now + seconds``. Raises ``CapabilityError`` where the broker
        has no timer to extend."""


class SettleOnce(Delivery):
    """The base of every adapter's delivery: each copy is settled once. The first ``ack``,
    ``nack`` or ``reject`` marks it settled (:meth:`_settling` tells the adapter at that moment)
    and then calls the adapter's ``_ack`` / ``_nack`` / ``_reject``; every later settle does
    nothing, and ``ack_confirmed`` on a settled copy raises (the caller must not run an
    at-most-once effect on a completion it cannot confirm). Wrappers that delegate to another
    delivery subclass :class:`Delivery` itself."""

    #: the name errors give the broker (``"SQS"``, ``"RabbitMQ"``…)
    broker_name: str = "broker"
    _settled: bool = False

    @property
    def settled(self) -> bool:
        return self._settled

    def _settle(self) -> bool:
        """Mark this copy settled; False when it already was (the caller then does nothing)."""
        if self._settled:
            return False
        self._settled = True
        self._settling()
        return True

    def _settling(self) -> None:
        """Called once, when the copy becomes settled (before the broker call): e.g. stop
        counting it among the consumer's unsettled deliveries."""

    def _unconfirmable(self) -> BrokerUnavailable:
        """The error of ``ack_confirmed`` on a copy that was settled already."""
        return BrokerUnavailable(
            f"{self.broker_name}: {self.delivery_id} was already settled, so this ack cannot be "
            "confirmed; do not run an at-most-once effect for it"
        )

    async def ack(self) -> None:
        if self._settle():
            await self._ack()

    async def ack_confirmed(self) -> None:
        """:meth:`Delivery.ack_confirmed`; raises ``BrokerUnavailable`` when the copy was
        settled already. The default confirms through ``_ack`` (an adapter whose ``_ack``
        returns once the broker has the completion); others override it."""
        if not self._settle():
            raise self._unconfirmable()
        await self._ack()

    async def nack(self, delay: float | None = None) -> None:
        if self._settle():
            await self._nack(delay)

    async def reject(self, reason: str) -> None:
        if self._settle():
            await self._reject(reason)

    @abstractmethod
    async def _ack(self) -> None:
        """The broker's completion of this copy (see :meth:`Delivery.ack`)."""

    @abstractmethod
    async def _nack(self, delay: float | None) -> None:
        """The broker's redelivery of this copy (see :meth:`Delivery.nack`)."""

    @abstractmethod
    async def _reject(self, reason: str) -> None:
        """The broker's settle without redelivery (see :meth:`Delivery.reject`)."""


class Subscription(ABC):
    """An open consumer: iterate it for deliveries; close it to stop."""

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self

    @abstractmethod
    async def __anext__(self) -> Delivery: ...

    async def next_batch(self, max_items: int) -> list[Delivery]:
        """Wait for one delivery, then return it with whatever else is ready *now*, up to
        ``max_items`` in all (one fetched batch: the runtime claims and completes a batch in one
        ledger round trip). Raises ``StopAsyncIteration`` once closed. The default hands out one
        delivery at a time; adapters that fetch in batches (SQS receive, Kafka consume, a
        prefetch buffer) override it."""
        return [await self.__anext__()]

    @abstractmethod
    async def close(self, *, abandon: bool = False) -> None:
        """Stop consuming. ``abandon=True`` behaves like a crash: unsettled deliveries are left to
        the broker's own recovery (requeue on connection loss, visibility expiry, rewind to the
        committed offset). Idempotent."""


class Publisher(ABC):
    @abstractmethod
    async def publish(self, destination: str, envelopes: Sequence[Envelope]) -> None:
        """Publish (boundary PUBLISHED when it returns). Raises ``PublishAmbiguous`` when the
        broker may or may not have accepted some of them: retry with the SAME envelopes."""


class Subscriber(ABC):
    @abstractmethod
    async def subscribe(self, source: str, group: str, *, prefetch: int = 16) -> Subscription:
        """Open a consumer on ``source`` as part of consumer ``group``."""

    @abstractmethod
    def capabilities(self, source: str) -> Capabilities:
        """The semantics of ``source`` on this broker."""


class Broker(Publisher, Subscriber):
    """A backend that both publishes and subscribes."""

    async def describe(self, source: str) -> SourceFacts:
        """Facts about ``source`` for ``explain`` (adapters read queue/topic attributes)."""
        return SourceFacts(broker=type(self).__name__)

    def group_name(self, source: str, group: str) -> str:
        """The name the broker gives the queue (or group) that ``group`` reads on ``source``, as
        an operator would look it up (no I/O). The default names the pair."""
        return f"{source} (group {group})"

    async def group_state(self, source: str, group: str) -> GroupState:
        """Messages waiting for ``group`` on ``source`` and the consumers attached now, as far as
        the broker can tell (one cheap admin request; moves no boundary, settles nothing).
        Raises ``BrokerUnavailable`` / ``ConfigurationError`` when the broker cannot be reached
        or refuses the credentials: ``replaysafe run`` calls it at start-up as its broker probe.
        The default knows nothing."""
        return GroupState(source, group, self.group_name(source, group))

    async def stray_groups(self, source: str, prefix: str) -> list[GroupState]:
        """Other groups reading ``source`` whose group name starts with ``prefix`` (an app's
        ``"<app name>."``): a handler renamed or removed leaves its group behind, with the
        messages published since. Empty where the broker cannot list them (the default)."""
        return []

    async def check(self) -> None:
        """Raise ``BrokerUnavailable`` when the broker cannot be reached now (readiness probe;
        cheap, no side effect). The default (an in-process broker) is always reachable."""

    async def prepare_source(
        self,
        source: str,
        groups: Sequence[str] = (),
        *,
        visibility_timeout: float | None = None,
        partitions: int | None = None,
    ) -> None:
        """Create what ``source`` needs so nothing published afterwards is lost: RabbitMQ's
        exchange and a queue per group, an SQS queue (with ``visibility_timeout``), a Kafka topic
        (with ``partitions``). Idempotent. Options a broker has no use for are ignored."""

    async def declared_names(self, source: str, group: str) -> dict[str, str]:
        """What :meth:`prepare_source` and ``subscribe`` declare for consumer ``group`` on
        ``source``, as label -> name, for operators (``replaysafe topology show``). The first
        entry is where a producer publishes (RabbitMQ: the exchange; SQS: the queue; Kafka: the
        topic). Names only the server knows (an SQS queue URL) are read from it; nothing is
        created."""
        return {"destination": source, "group": group}

    async def drop_source(self, source: str, groups: Sequence[str] = ()) -> None:
        """Delete what :meth:`prepare_source` created, messages included (tests, demos)."""

    async def close(self) -> None:
        """Close connections. Idempotent."""
