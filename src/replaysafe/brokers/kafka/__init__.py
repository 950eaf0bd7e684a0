"""The Kafka adapter (confluent-kafka): consumer groups, offset commits, partition rewinds.

Kafka's semantics are kept visible rather than dressed up as a queue's (DESIGN §3):

Completion (``ack``) marks one *offset* done. Kafka only stores one committed offset per partition
and group, so the adapter commits, per partition, the highest **contiguous** completed offset + 1
(:class:`OffsetTracker`): a record acked out of order stays uncommitted until every earlier record
of its partition is done, and concurrent handlers never commit past unfinished work. Commits are
coalesced: at most one commit request is in flight per consumer and every ack that arrives
meanwhile rides on the next one (``commit_interval`` adds a minimum spacing). A crash loses the
acks not yet committed: those records -- and every later record of the partition -- are delivered
again from the committed offset (the ledger deduplicates them).

Redelivery is an **offset rewind** (``RedeliveryKind.OFFSET_REWIND``): ``nack(delay)`` pauses the
partition, and after ``delay`` seeks it back to the nacked offset and resumes it. Everything after
the nacked record in that partition is delivered again, including records that were already
acked (their acks are dropped); other partitions keep flowing. ``reject`` skips the record (it
counts as done for the commit); Kafka has no dead-letter queue -- the runtime's quarantine is one.
``extend`` raises :class:`~replaysafe.errors.CapabilityError`: Kafka has no per-record timer, the
runtime relies on the ledger lease.

Kafka keeps no delivery count, so ``Delivery.attempt`` is ``1 +`` how many times this
``KafkaBroker`` object handed the same (group, partition, offset) out before
(``Capabilities.delivery_count=False``): a lower bound, and 1 in a fresh process.

Rebalance: on revoke the consumer stops handing out records of the revoked partitions, waits (up
to ``drain_timeout`` seconds) for the ones in flight to settle, commits what is done and only then
lets the revoke complete; settles that come later are ignored (the new owner re-reads from the
committed offset). On assign it starts from the committed offset (``auto_offset_reset`` when the
group has none). ``close()`` commits what is done and leaves the group; ``close(abandon=True)``
leaves without any commit, as a crash would (except that commit requests issued before it still
complete).

Wire format (see :mod:`replaysafe.envelope`): the record value is the payload, the record key the
envelope's ordering key (UTF-8), the metadata travels in record headers (``rs-*`` and
``content-type``). Deliveries carry the raw value, headers (bytes decoded as UTF-8 with
``surrogateescape``, so a bad byte becomes an invalid operation id instead of an exception, null
values as ``""``, a repeated header name keeps its last value), key and the record timestamp.

Threading: librdkafka's consumer is driven from ONE dedicated thread per subscription (every call
is serialized on it, so rebalance callbacks can commit synchronously from inside ``consume``);
records are fetched by a background task into a buffer, so a cancelled ``__anext__`` never loses
one. Work is per batch where Kafka allows it: one ``consume(num_messages=...)`` fills the buffer,
a fetched batch is tracked and handed out under one lock, and the acks of a batch ride on one
commit (at most one commit request is queued at a time). ``confluent_kafka.aio`` is not used:
its ``AIOConsumer`` drops the records of a cancelled ``consume`` await and its ``AIOProducer``
refuses headers in batch mode.

Layout: ``config`` (:class:`KafkaConfig`, the one URL parser), ``broker`` (:class:`KafkaBroker`;
its publishing in ``producer``, its admin requests in ``admin``), ``consumer`` (one group member;
``fetch`` fills its buffer, ``commits`` commits its done offsets, ``rebalance`` answers the
group's moves), ``offsets`` (:class:`OffsetTracker`), ``delivery``, ``errors`` (the driver and
what its errors mean).
"""

from replaysafe.brokers.kafka.broker import KAFKA_CAPABILITIES, KafkaBroker
from replaysafe.brokers.kafka.config import KafkaConfig
from replaysafe.brokers.kafka.offsets import OffsetTracker

__all__ = ["KAFKA_CAPABILITIES", "KafkaBroker", "KafkaConfig", "OffsetTracker"]
