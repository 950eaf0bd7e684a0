"""Amazon SQS broker adapter (aiobotocore); the adapter lives in :mod:`.broker` for now."""

from replaysafe._redact import redact as redact_url  # noqa: F401  (importable from here before)
from replaysafe.brokers.sqs.broker import (
    FIFO_DEDUP_WINDOW,
    HEADER_BODY_ENCODING,
    HEADER_KEY,
    HEADER_REJECT_REASON,
    MAX_ATTRIBUTES,
    SQSBroker,
    SQSDelivery,
)
from replaysafe.brokers.sqs.broker import _body_text as _body_text

__all__ = [
    "FIFO_DEDUP_WINDOW",
    "HEADER_BODY_ENCODING",
    "HEADER_KEY",
    "HEADER_REJECT_REASON",
    "MAX_ATTRIBUTES",
    "SQSBroker",
    "SQSDelivery",
]
