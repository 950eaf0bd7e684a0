"""NATS JetStream broker adapter (nats-py, extra ``nats``), keeping JetStream's own semantics
visible (see ``docs/broker-nats.md``):

- **A source is a subject bound to a stream**: the stream that already captures the subject, or
  ``<stream_prefix><source>`` which the adapter creates (limits retention). **A consumer group is
  a durable pull consumer** of that stream filtered on the subject (explicit acks): each group
  gets every message; the subscriptions of one group share them.
- **Visibility is ``ack_wait``.** A fetched message is hidden from the group until
  ``settle_deadline`` = receipt + ``ack_wait``, then redelivered to any member -- even while the
  first is still working on it. A crash returns nothing early.
- **``extend(seconds)`` is ``in_progress()``.** JetStream's ``+WPI`` restarts the timer at the
  consumer's ``ack_wait``; it cannot name a duration. ``extend`` sends one at once and repeats it
  from a background task until ``now + seconds``, so it promises: no redelivery before
  ``max(now + seconds, now + ack_wait)`` while the process lives; after a crash, the last timer
  runs out (at most ``ack_wait`` later).
- ``nack(delay)`` is ``nak(delay=)``: the server waits. ``attempt`` is ``num_delivered`` (exact).
- **``reject`` is a dead-letter copy, then ``term()``**: the copy goes to
  ``<source><dead_letter_suffix>`` (its own stream) with ``rs-reject-reason`` and its PubAck is
  awaited before the original is terminated. A crash in between redelivers the original; the
  second copy has the same ``Nats-Msg-Id`` and the dead-letter stream drops it within its window.
- **``max_deliver``**: a nack of attempt ``max_deliver`` dead-letters instead of redelivering.
  The consumer's server-side ``MaxDeliver`` is ``max_deliver + 1``: the spare delivery, which
  only follows a crash (or an expired ack wait) on the last attempt, is dead-lettered by the
  adapter before any handler sees it. So the adapter, not JetStream's ``MAX_DELIVERIES``
  advisory, moves exhausted messages; a consumer created elsewhere keeps its own ``MaxDeliver``.
- ``ack()`` is ``+ACK`` (written, not confirmed); ``ack_confirmed()`` is the double ack,
  ``ack_sync()``: it returns once the server answered (what at-most-once needs).
- **Publish** awaits each PubAck (a timeout after the send is ``PublishAmbiguous``);
  ``Nats-Msg-Id`` is the operation id plus the payload's fingerprint, so the stream drops a
  producer's retry of the same envelope within its duplicate window. That is a transport dedup
  with a time limit, not the business guarantee (the ledger): a different payload under a reused
  id still reaches the ledger, and a redrive inside the window is dropped (logged, counted).
- No key: the envelope key travels in the ``rs-key`` header and order within a key is not
  promised (competing consumers and redeliveries reorder).
"""

from replaysafe.brokers.nats.broker import NATSBroker
from replaysafe.brokers.nats.config import NATSConfig
from replaysafe.brokers.nats.delivery import NATSDelivery

__all__ = ["NATSBroker", "NATSConfig", "NATSDelivery"]
