"""The memory broker: the reference broker, with faithful redelivery on an injectable clock.

Each destination chooses one of three redelivery models (:meth:`MemoryBroker.declare`), so tests
and the demo can run the same pipeline against RabbitMQ-, SQS- and Kafka-shaped semantics without a
server:

``RedeliveryKind.NACK`` (RabbitMQ-like)
    ``ack`` removes. ``nack(delay)`` requeues after ``delay`` seconds on the clock (at once for
    ``None``/0) and the next copy has ``redelivered=True``. ``reject`` drops the message to the
    group's dead-letter list. Closing a subscription -- normally or as a crash -- requeues its
    unsettled deliveries at once, as a closed channel does. No ``extend``.
``RedeliveryKind.VISIBILITY_TIMEOUT`` (SQS-like)
    A receive hides the message until ``now + visibility_timeout`` (``settle_deadline``). When the
    timer expires the message is delivered again to any consumer of the group, *even while the
    first consumer is still working on it*: that overlap is the real SQS leak and it is kept on
    purpose. ``ack`` deletes (also from a stale receipt, as SQS does), ``nack(delay)`` and
    ``extend(seconds)`` move the timer, ``reject`` deletes and dead-letters. Closing a subscription
    never returns its messages early.
``RedeliveryKind.OFFSET_REWIND`` (Kafka-like)
    One log per partition (``zlib.crc32(key) % partitions``, partition 0 for ``key=None``). Each
    group commits, per partition, the highest *contiguous* settled offset + 1, so an out-of-order
    ack never commits past an unfinished record. ``nack(delay)`` rewinds the partition to the nacked
    offset after ``delay`` (that record and every later one is delivered again). Closing a
    subscription, or a rebalance that moves a partition to another consumer, rewinds the partition
    to the committed offset: the new owner re-reads everything uncommitted. ``reject`` skips the
    record (it counts as settled for the commit) and dead-letters it. No ``extend``.

Messages are stored in their wire form (body, ``Envelope.wire_headers()`` plus ``content-type``,
key, broker timestamp), so consumers decode them through :func:`~replaysafe.envelope.decode_wire`
exactly as they would a real broker's messages. Every consumer group sees every message ever
published to the destination (a group created late reads the whole history, as if its queue had
been declared up front); consumers within one group compete for them.

Nothing here is durable beyond the process; what it models faithfully is *when* a message comes
back, to whom, and with which attempt count.

The broker's settings are a :class:`MemoryConfig` (``clock``, ``failpoints``, ``default_mode``);
its URL is just ``memory`` (:meth:`MemoryConfig.from_url`, :meth:`MemoryBroker.from_url`).

Modules: ``broker`` (:class:`MemoryBroker`: destinations, publish, subscribe, introspection),
``config``, ``store`` (messages in wire form), ``delivery`` (one transport copy), ``group`` (a
consumer group's bookkeeping, implemented by ``queues`` for NACK and VISIBILITY_TIMEOUT and by
``offsets`` for OFFSET_REWIND) and ``consumer`` (a subscription).
"""

from replaysafe.brokers.memory.broker import MemoryBroker
from replaysafe.brokers.memory.config import MemoryConfig
from replaysafe.brokers.memory.store import DeadLetter, StoredMessage, partition_for

__all__ = ["DeadLetter", "MemoryBroker", "MemoryConfig", "StoredMessage", "partition_for"]
