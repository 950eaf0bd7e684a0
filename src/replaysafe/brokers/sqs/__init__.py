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

The package, by concern: ``config`` (:class:`SQSConfig`, the one URL parser), ``wire`` (SQS's
limits and the message encoding), ``errors`` (the driver and its errors mapped to the error tree),
``client`` (the connection and request counting), ``admin`` (queue lookup, creation, deletion),
``publish`` (``SendMessageBatch`` and its outcomes), ``delivery`` (a received copy and the
requests that settle it), ``consumer`` (the long-polling subscription) and ``broker``
(:class:`SQSBroker`, which wires them together).
"""

from replaysafe._redact import redact as redact_url  # noqa: F401  (importable from here before)
from replaysafe.brokers.sqs.broker import SQSBroker
from replaysafe.brokers.sqs.config import SQSConfig, SQSOptions
from replaysafe.brokers.sqs.delivery import CONFIRM_MARGIN as CONFIRM_MARGIN
from replaysafe.brokers.sqs.delivery import SQSDelivery
from replaysafe.brokers.sqs.wire import CONTENT_TYPE as CONTENT_TYPE
from replaysafe.brokers.sqs.wire import DEFAULT_MAX_MESSAGE_BYTES as DEFAULT_MAX_MESSAGE_BYTES
from replaysafe.brokers.sqs.wire import (
    FIFO_DEDUP_WINDOW,
    HEADER_BODY_ENCODING,
    HEADER_KEY,
    HEADER_REJECT_REASON,
    MAX_ATTRIBUTES,
)
from replaysafe.brokers.sqs.wire import MAX_BATCH as MAX_BATCH
from replaysafe.brokers.sqs.wire import MAX_VISIBILITY as MAX_VISIBILITY
from replaysafe.brokers.sqs.wire import MAX_WAIT_TIME as MAX_WAIT_TIME

__all__ = [
    "FIFO_DEDUP_WINDOW",
    "HEADER_BODY_ENCODING",
    "HEADER_KEY",
    "HEADER_REJECT_REASON",
    "MAX_ATTRIBUTES",
    "SQSBroker",
    "SQSConfig",
    "SQSDelivery",
    "SQSOptions",
]
