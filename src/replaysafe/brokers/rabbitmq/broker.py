"""The RabbitMQ broker: configuration, connections, capabilities, and the entry points that hand
publishing to :class:`_Publisher`, topology to :class:`_Admin` and consuming to
:class:`_RabbitSubscription`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

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
from replaysafe.brokers.rabbitmq._driver import _driver, _driver_aiormq
from replaysafe.brokers.rabbitmq.admin import _Admin
from replaysafe.brokers.rabbitmq.config import QueueType, RabbitMQConfig
from replaysafe.brokers.rabbitmq.consumer import _RabbitSubscription
from replaysafe.brokers.rabbitmq.errors import _Errors
from replaysafe.brokers.rabbitmq.publisher import _Publisher
from replaysafe.brokers.rabbitmq.topology import Topology, _escape
from replaysafe.brokers.rabbitmq.wire import _text
from replaysafe.clock import Clock
from replaysafe.envelope import Envelope
from replaysafe.errors import BrokerError, BrokerUnavailable, ConfigurationError
from replaysafe.failpoints import FAILPOINTS, Failpoints

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustConnection

__all__ = ["RabbitMQBroker"]

log = logging.getLogger("replaysafe.brokers.rabbitmq")

#: "no url given" (None is a bad url, not a missing one)
_NO_URL: Any = object()


class RabbitMQBroker(Broker):
    """RabbitMQ through aio-pika (see the package docstring for topology and semantics).

    The options below can be given as keywords or as one ``config=RabbitMQConfig(...)`` (then
    nothing else); either way they are validated by :class:`RabbitMQConfig` and kept in
    ``self.config``.

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

    @overload
    def __init__(
        self,
        url: str = ...,
        *,
        clock: Clock = ...,
        failpoints: Failpoints | None = ...,
        queue_type: QueueType = ...,
        confirm_timeout: float = ...,
        connect_timeout: float = ...,
        reconnect_interval: float = ...,
        delivery_limit: int | None = ...,
        management_url: str | None = ...,
    ) -> None: ...

    @overload
    def __init__(self, *, config: RabbitMQConfig) -> None: ...

    def __init__(
        self, url: object = _NO_URL, *, config: RabbitMQConfig | None = None, **options: Any
    ) -> None:
        _driver()
        if url is not _NO_URL:
            options["url"] = url
        #: the validated options this broker was built with
        self.config = config = config_or_options("RabbitMQBroker", RabbitMQConfig, config, options)
        self.url = config.redacted_url
        self._clock = config.clock
        self._failpoints = FAILPOINTS if config.failpoints is None else config.failpoints
        self.queue_type: QueueType = config.queue_type
        self.confirm_timeout = float(config.confirm_timeout)
        self.connect_timeout = float(config.connect_timeout)
        self.reconnect_interval = float(config.reconnect_interval)
        self.delivery_limit = config.delivery_limit
        self.server_version: tuple[int, ...] | None = None
        self._errors = _Errors(config)
        self._admin = _Admin(self)
        self._publisher = _Publisher(self)
        self._publish_conn: AbstractRobustConnection | None = None
        self._consume_conn: AbstractRobustConnection | None = None
        self._conn_lock = asyncio.Lock()
        self._subs: set[_RabbitSubscription] = set()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **opts: Any) -> RabbitMQBroker:
        """The broker for ``url`` (``amqp://`` / ``amqps://``) with ``opts`` as the other options:
        ``cls(config=RabbitMQConfig.from_url(url, **opts))``, the name the CLI resolves."""
        return cls(config=RabbitMQConfig.from_url(url, **opts))

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def failpoints(self) -> Failpoints:
        return self._failpoints

    @property
    def declared(self) -> Mapping[str, frozenset[str]]:
        """Destinations and groups this broker object declared (for tests and cleanup)."""
        return self._admin.declared

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
                    self.config.url,
                    timeout=self.connect_timeout,
                    reconnect_interval=self.reconnect_interval,
                    # the pid tells an operator (and the chaos nemesis) whose connection it is
                    client_properties={"connection_name": f"replaysafe {role} pid={os.getpid()}"},
                )
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            raise self._errors.connect_error(exc) from None
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

    # ---------------------------------------------------------------- topology (see _Admin)

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
        await self._admin.declare(source, groups)

    async def delete(self, source: str, groups: Iterable[str]) -> None:
        """Delete ``groups``' queues (main, dead-letter, every retry band) and ``source``'s
        exchange. Destructive: the messages in them are gone. For tests and decommissioning."""
        await self._admin.delete(source, groups)

    async def queue_depths(self, source: str, group: str) -> dict[str, int]:
        """Ready (not unacked) messages per queue of ``group``: main, dead-letter and each retry
        band that exists. For tests and operators; one passive declare per queue."""
        return await self._admin.queue_depths(source, group)

    def group_name(self, source: str, group: str) -> str:
        """The group's queue (``<source>/<group>``, escaped: see :class:`Topology`)."""
        return Topology.of(source, group).queue

    async def group_state(self, source: str, group: str) -> GroupState:
        """Ready messages and consumers of the group's queue (a passive ``queue.declare``);
        ``exists=False`` until a subscribe or :meth:`declare` created it."""
        return await self._admin.group_state(source, group)

    async def stray_groups(self, source: str, prefix: str) -> list[GroupState]:
        """Queues bound to ``source``'s exchange whose group starts with ``prefix``. AMQP 0-9-1
        cannot list bindings: they are read from the management HTTP API (``management_url``,
        by default ``http://<host>:15672`` with the AMQP URL's credentials); the counts then
        come from a passive ``queue.declare`` each (the API's own counts lag by its statistics
        interval, 5 s by default). Empty, with a debug log line, when the API cannot be reached
        (the plugin is off, or the port is closed)."""
        return await self._admin.stray_groups(source, prefix)

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
        await self._publisher.publish(destination, envelopes)

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
            raise self._errors.declare_error(f"a consumer on {topo.queue!r}", exc) from None
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
