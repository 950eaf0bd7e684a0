"""Queue administration: looking queues up (URL and attributes, cached), creating, deleting and
counting them, and what ``explain`` needs to know about one."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

from replaysafe.brokers.base import SourceFacts
from replaysafe.brokers.sqs.client import _Connection
from replaysafe.brokers.sqs.errors import _is_missing_queue
from replaysafe.brokers.sqs.wire import MAX_VISIBILITY, _check_queue_name
from replaysafe.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class _Queue:
    name: str
    url: str
    fifo: bool
    #: the queue's own VisibilityTimeout attribute (seconds)
    visibility_timeout: int
    dead_letter_url: str | None
    dead_letter_name: str | None


class _QueueAdmin:
    """Owns the cache of looked-up queues (name -> URL, FIFO-ness, visibility timeout, dead-letter
    queue): each queue is looked up once, and forgotten when this admin creates or deletes it.
    All requests are ``metadata`` calls on the connection."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.queues: dict[str, _Queue] = {}

    async def attributes(self, name: str, url: str, *attributes: str) -> dict[str, str]:
        response = await self._conn.call(
            "metadata",
            "get_queue_attributes",
            "GetQueueAttributes",
            name,
            QueueUrl=url,
            AttributeNames=list(attributes),
        )
        return dict(response.get("Attributes") or {})

    async def queue(self, name: str) -> _Queue:
        """The queue's URL and attributes (looked up once, then cached)."""
        cached = self.queues.get(name)
        if cached is not None:
            return cached
        _check_queue_name(name)
        url = (
            await self._conn.call("metadata", "get_queue_url", "GetQueueUrl", name, QueueName=name)
        )["QueueUrl"]
        attrs = await self.attributes(name, url, "VisibilityTimeout", "RedrivePolicy", "FifoQueue")
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
                await self._conn.call(
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
        self.queues[name] = queue
        return queue

    async def existing(self, name: str) -> _Queue | None:
        """The queue ``name``, or None when it does not exist (other errors raise)."""
        try:
            return await self.queue(name)
        except ConfigurationError as exc:
            if _is_missing_queue(self._conn.drv, exc.__cause__):
                return None
            raise

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
        """See ``SQSBroker.create_queue``."""
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
            arn = (await self.attributes(dlq, dlq_url, "QueueArn"))["QueueArn"]
            attributes["RedrivePolicy"] = json.dumps(
                {"deadLetterTargetArn": arn, "maxReceiveCount": str(max_receive_count)}
            )
        response = await self._conn.call(
            "metadata", "create_queue", "CreateQueue", name, QueueName=name, Attributes=attributes
        )
        self.queues.pop(name, None)
        return str(response["QueueUrl"])

    async def delete_queue(self, name: str) -> bool:
        """Delete ``name`` and its messages; False when it did not exist (not an error)."""
        try:
            queue = await self.queue(name)
        except ConfigurationError:
            return False
        await self._conn.call("metadata", "delete_queue", "DeleteQueue", name, QueueUrl=queue.url)
        self.queues.pop(name, None)
        return True

    async def approximate_depth(self, name: str) -> dict[str, int]:
        """See ``SQSBroker.approximate_depth``."""
        queue = await self.queue(name)
        attrs = await self.attributes(
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

    async def describe(self, source: str, visibility_override: int | None) -> SourceFacts:
        """See ``SQSBroker.describe``."""
        queue = await self.queue(source)
        attrs = await self.attributes(queue.name, queue.url, "MessageRetentionPeriod")
        retention = float(attrs.get("MessageRetentionPeriod", 345_600))
        dlq_retention = limit = None
        if queue.dead_letter_url is not None and queue.dead_letter_name is not None:
            dlq = await self.attributes(
                queue.dead_letter_name, queue.dead_letter_url, "MessageRetentionPeriod"
            )
            dlq_retention = float(dlq.get("MessageRetentionPeriod", 345_600))
            redrive = await self.attributes(queue.name, queue.url, "RedrivePolicy")
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
            visibility_timeout=float(visibility_override or queue.visibility_timeout),
            broker_timestamps=True,
            notes=tuple(notes),
        )
