"""The SQS broker: :class:`SQSBroker` wires its collaborators together -- the connection
(``client``), the queue admin (``admin``), the publisher (``publish``), the settler
(``delivery``) and its subscriptions (``consumer``) -- and implements the ``Broker`` contract
on them. SQS's semantics are described in the package docstring."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import Any, Final, Unpack

from replaysafe._config import config_or_options
from replaysafe.brokers.base import (
    Broker,
    Capabilities,
    GroupState,
    RedeliveryKind,
    SettleGranularity,
    SourceFacts,
    Subscription,
)
from replaysafe.brokers.sqs.admin import _Queue, _QueueAdmin
from replaysafe.brokers.sqs.client import _Connection
from replaysafe.brokers.sqs.config import SQSConfig, SQSOptions
from replaysafe.brokers.sqs.consumer import _SQSSubscription
from replaysafe.brokers.sqs.delivery import _Settler
from replaysafe.brokers.sqs.publish import _Publisher
from replaysafe.brokers.sqs.wire import FIFO_DEDUP_WINDOW
from replaysafe.clock import Clock
from replaysafe.envelope import Envelope
from replaysafe.errors import BrokerUnavailable, ConfigurationError
from replaysafe.failpoints import FAILPOINTS, Failpoints

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


class SQSBroker(Broker):
    """Amazon SQS (or an SQS-compatible server such as moto or LocalStack) through aiobotocore.

    Sources and destinations are queue names in the broker's region and account; their URLs and
    attributes are looked up once and cached. The client is created on first use.

    Options: the fields of :class:`SQSConfig` (``region``, ``endpoint_url``, credentials,
    ``wait_time``, ``visibility_timeout``, ``delete_window``, ``default_group``, ``max_retries``,
    timeouts, pool and message-size limits, ``clock``, ``failpoints``), as keywords or as one
    ``config=``; ``self.config`` holds them. Publishes are never retried by the driver, so an
    unknown outcome is reported as ``PublishAmbiguous`` instead of hidden.

    ``failpoints`` (default: the process-wide registry) is hit for each envelope before its batch
    is sent (``PUBLISH_BEFORE_ACCEPT``) and after SQS accepted it (``PUBLISH_AFTER_ACCEPT``), with
    ctx ``operation_id``, ``destination`` and ``sleep``.

    ``api_calls`` counts the SQS requests made, by kind (``receive``, ``delete``,
    ``change_visibility``, ``send``, ``metadata``), including the driver's own retries.
    """

    def __init__(self, *, config: SQSConfig | None = None, **options: Unpack[SQSOptions]) -> None:
        """Either keyword ``options`` (:class:`SQSConfig`'s fields, same names and defaults) or
        one ``config``, not both (``ConfigurationError``). Invalid options raise
        ``ConfigurationError``; a missing aiobotocore raises ``MissingExtra`` here, not on first
        use. Nothing is connected yet."""
        #: the broker's settings (frozen)
        self.config = config = config_or_options("SQSBroker", SQSConfig, config, options)
        self._clock = config.clock
        self._failpoints = FAILPOINTS if config.failpoints is None else config.failpoints
        self._subs: set[_SQSSubscription] = set()
        #: background requests (polls, delete batches) that close() waits for
        self._background: set[asyncio.Task[Any]] = set()
        # the driver is imported now (a missing extra fails at construction), used on first call
        self._conn = _Connection(config, lambda: repr(self))
        self._admin = _QueueAdmin(self._conn)
        self._publisher = _Publisher(
            self._conn,
            failpoints=self._failpoints,
            clock=config.clock,
            default_group=config.default_group,
            max_message_bytes=config.max_message_bytes,
        )
        self._settler = _Settler(
            self._conn,
            clock=config.clock,
            default_group=config.default_group,
            delete_window=config.delete_window,
            spawn=self._spawn,
        )
        #: no new publishes or subscriptions (close() started)
        self._closing = False

    @classmethod
    def from_url(cls, url: str, **opts: Any) -> SQSBroker:
        """A broker from a URL; keyword options override the URL's query parameters. The
        grammar is :meth:`SQSConfig.from_url`'s (``broker_from_url`` comes here)."""
        return cls(config=SQSConfig.from_url(url, **opts))

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
        out.update(self._conn.calls)
        return out

    @property
    def delete_failures(self) -> int:
        """Deletes SQS refused per message (the message comes back; not an error)."""
        return self._settler.delete_failures

    # the settings read under their former attribute names
    @property
    def _region(self) -> str | None:
        return self.config.region

    @property
    def _endpoint(self) -> str | None:
        return self.config.endpoint_url

    @property
    def _wait_time(self) -> int:
        return self.config.wait_time

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
        return await self._admin.describe(source, self.config.visibility_timeout)

    def group_name(self, source: str, group: str) -> str:
        """The queue's URL once it was looked up, else its name: SQS has no consumer groups, so
        every group (handler) on ``source`` reads this one queue, whatever its name."""
        cached = self._admin.queues.get(source)
        return cached.url if cached is not None else source

    async def group_state(self, source: str, group: str) -> GroupState:
        """``ApproximateNumberOfMessages`` (visible) of the queue, by its URL. SQS cannot say
        how many consumers poll it (``consumers`` is None), and the count is approximate. A
        missing queue raises ``ConfigurationError`` (subscribe would too: nothing creates it)."""
        queue = await self._queue(source)
        attrs = await self._admin.attributes(queue.name, queue.url, "ApproximateNumberOfMessages")
        messages = int(attrs.get("ApproximateNumberOfMessages", 0))
        return GroupState(source, group, queue.url, messages=messages, exists=True)

    async def check(self) -> None:
        """One ``GetQueueAttributes`` on a queue this broker already looked up (a worker's role
        need not be allowed ``ListQueues``): the endpoint answers and the credentials are
        accepted, or ``BrokerUnavailable`` / ``ConfigurationError``. Nothing to ask before the
        first queue was looked up (:meth:`group_state` and ``subscribe`` do that)."""
        for queue in list(self._admin.queues.values())[:1]:
            await self._admin.attributes(queue.name, queue.url, "QueueArn")

    # ---------------------------------------------------------------- plumbing

    def _check_open(self) -> None:
        if self._closing:
            raise BrokerUnavailable(
                f"{self!r} is closed; create a new SQSBroker to publish or consume"
            )

    async def _clients(self) -> tuple[Any, Any]:
        """(client, send_client), connected on first use (tests send as a plain client)."""
        return await self._conn.clients()

    async def _queue(self, name: str) -> _Queue:
        """The queue's URL and attributes (looked up once, then cached)."""
        return await self._admin.queue(name)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ---------------------------------------------------------------- queues

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
        if visibility_timeout is None and await self._admin.existing(source) is not None:
            return
        vis = 30 if visibility_timeout is None else max(1, round(visibility_timeout))
        await self.create_queue(source, visibility_timeout=vis)

    async def declared_names(self, source: str, group: str) -> dict[str, str]:
        """The queue (publish there) and its URL, read from SQS, and its dead-letter queue when
        it has one. ``group`` is only a label: every consumer shares the queue."""
        names = {"queue": source}
        queue = await self._admin.existing(source)
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
        return await self._admin.create_queue(
            name,
            visibility_timeout=visibility_timeout,
            fifo=fifo,
            dlq=dlq,
            max_receive_count=max_receive_count,
            retention=retention,
        )

    async def delete_queue(self, name: str) -> None:
        """Delete ``name`` and its messages (a missing queue is not an error)."""
        if await self._admin.delete_queue(name):
            self._settler.batchers.pop(name, None)

    async def approximate_depth(self, name: str) -> dict[str, int]:
        """SQS's approximate counts for ``name``: ``visible``, ``in_flight`` (received, not
        deleted, visibility not expired) and ``delayed``. Eventually consistent on AWS."""
        return await self._admin.approximate_depth(name)

    # ---------------------------------------------------------------- publish and subscribe

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
        await self._publisher.publish(queue, envelopes)

    async def subscribe(self, source: str, group: str, *, prefetch: int = 16) -> Subscription:
        """Consume ``source``. ``group`` is only a label: every subscription on a queue competes
        for the same messages (SQS has no consumer groups). At most ``prefetch`` messages are
        received and unsettled at a time; receives ask for up to ``min(10, prefetch)``."""
        self._check_open()
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be >= 1, got {prefetch}")
        queue = await self._queue(source)
        visibility = self.config.visibility_timeout or queue.visibility_timeout
        if visibility < 1:
            raise ConfigurationError(
                f"queue {source!r} has VisibilityTimeout 0: every receive would be redelivered at "
                "once; set visibility_timeout on the SQSBroker or the queue"
            )
        sub = _SQSSubscription(
            queue,
            group,
            prefetch,
            visibility,
            settler=self._settler,
            wait_time=self.config.wait_time,
            spawn=self._spawn,
            forget=self._subs.discard,
        )
        self._subs.add(sub)
        return sub

    # ---------------------------------------------------------------- close

    async def close(self) -> None:
        """Close every subscription gracefully, send pending deletes, wait (bounded) for
        background calls, then close the clients. Idempotent."""
        if self._closing:
            return
        self._closing = True
        for sub in list(self._subs):
            await sub.close()
        self._settler.flush()
        if self._background:
            # a long poll in flight finishes within wait_time; everything else is quick
            _, pending = await asyncio.wait(
                set(self._background), timeout=self.config.wait_time + 5.0
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._conn.aclose()

    def __repr__(self) -> str:
        creds = ", credentials=***" if self._conn.has_credentials else ""
        return (
            f"SQSBroker(endpoint={self._endpoint or 'AWS'!r}, region={self._region!r}{creds}, "
            f"queues={sorted(self._admin.queues)})"
        )
