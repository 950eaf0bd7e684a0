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

Layout: :mod:`.config` (``RabbitMQConfig``, the one URL parser), :mod:`.topology` (names),
:mod:`.wire` (headers and AMQP values), :mod:`.delivery` (settling one delivery), :mod:`.acks`
(coalesced and confirmed acks), :mod:`.consumer` (the subscription), :mod:`.publisher`
(confirmed publishes, retry copies), :mod:`.admin` (declare, delete, inspect), :mod:`.errors`
(driver exceptions -> ``ReplaysafeError``), :mod:`.broker` (``RabbitMQBroker``).
"""

from replaysafe._redact import redact as redact_url
from replaysafe.brokers.rabbitmq.broker import RabbitMQBroker
from replaysafe.brokers.rabbitmq.config import AMQP_PORT, QueueType, RabbitMQConfig
from replaysafe.brokers.rabbitmq.delivery import RabbitMQDelivery
from replaysafe.brokers.rabbitmq.topology import MAX_DELAY, RETRY_BANDS, Topology, retry_band
from replaysafe.brokers.rabbitmq.wire import ATTEMPTS_HEADER, KEY_HEADER

__all__ = [
    "AMQP_PORT",
    "ATTEMPTS_HEADER",
    "KEY_HEADER",
    "MAX_DELAY",
    "RETRY_BANDS",
    "QueueType",
    "RabbitMQBroker",
    "RabbitMQConfig",
    "RabbitMQDelivery",
    "Topology",
    "redact_url",
    "retry_band",
]
