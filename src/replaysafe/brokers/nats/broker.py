"""``NATSBroker``: JetStream publishing and pull consumers (see the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

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
from replaysafe.brokers.nats.admin import Admin, check_subject, limits_of
from replaysafe.brokers.nats.config import NATSConfig
from replaysafe.brokers.nats.consumer import NATSSubscription
from replaysafe.brokers.nats.delivery import CONTENT_TYPE, HEADER_KEY, NATS_PREFIX
from replaysafe.brokers.nats.errors import Driver, driver, map_error, map_publish_error
from replaysafe.clock import Clock
from replaysafe.envelope import Envelope
from replaysafe.errors import BrokerUnavailable, ConfigurationError, ReplaysafeError
from replaysafe.failpoints import (
    FAILPOINTS,
    PUBLISH_AFTER_ACCEPT,
    PUBLISH_BEFORE_ACCEPT,
    Failpoints,
)

log = logging.getLogger("replaysafe.brokers.nats")

#: the header JetStream deduplicates publishes by (within the stream's duplicate window)
MSG_ID = "Nats-Msg-Id"


class NATSBroker(Broker):
    """NATS JetStream through nats-py. Built from a :class:`NATSConfig` (``config=``) or from
    the same settings as keywords, not both; ``NATSBroker.from_url`` parses a URL. The
    connection is opened on first use (constructing one does no I/O)."""

    def __init__(self, *, config: NATSConfig | None = None, **settings: Any) -> None:
        self.config = config = config_or_options("NATSBroker", NATSConfig, config, settings)
        self.drv: Driver = driver()  # a missing extra fails at construction
        self._clock = config.clock
        self._failpoints = FAILPOINTS if config.failpoints is None else config.failpoints
        self._where = ",".join(s.split("://", 1)[-1] for s in config.servers)
        self.admin = Admin(self.drv, config, self._where)
        self._nc: Any = None
        self._js: Any = None
        self._lock = asyncio.Lock()
        self._subs: set[NATSSubscription] = set()
        self._closed = False
        #: envelope publishes the stream dropped as duplicates (same Nats-Msg-Id in its window)
        self.duplicates_dropped = 0

    @classmethod
    def from_url(cls, url: str, **opts: Any) -> NATSBroker:
        """A broker from ``nats://[user:pass@]host:port[,host:port][?options]`` (or
        ``nats+tls://``); keyword ``opts`` win over the query (see ``NATSConfig.from_url``)."""
        return cls(config=NATSConfig.from_url(url, **opts))

    # ------------------------------------------------------------------ properties

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def failpoints(self) -> Failpoints:
        return self._failpoints

    def capabilities(self, source: str) -> Capabilities:
        """Visibility-timeout redelivery (``ack_wait``), per-message settling, ``extend`` by
        ``in_progress``, an exact delivery count (``num_delivered``), delayed ``nak``, a copy
        per group (each group its own durable consumer), publishes deduplicated by
        ``Nats-Msg-Id`` within ``duplicate_window`` (of the streams this adapter creates). No
        order within a key: competing consumers and redeliveries reorder."""
        return Capabilities(
            redelivery=RedeliveryKind.VISIBILITY_TIMEOUT,
            settle_granularity=SettleGranularity.MESSAGE,
            extend_visibility=True,
            ordered_within_key=False,
            delivery_count=True,
            native_dedup_window=self.config.duplicate_window,
            delayed_nack=True,
            independent_groups=True,
        )

    def map(self, exc: BaseException, doing: str) -> ReplaysafeError:
        return map_error(self.drv, exc, doing, self._where)

    # ------------------------------------------------------------------ connection

    async def _connection(self) -> Any:
        """The JetStream context, connecting on first use."""
        if self._closed:
            raise BrokerUnavailable("NATSBroker is closed; create a new broker")
        if self._js is not None:
            return self._js
        async with self._lock:
            if self._js is None:
                cfg = self.config

                async def quiet(exc: Exception) -> None:
                    log.debug("NATS connection: %s", exc)

                options: dict[str, Any] = {
                    "servers": list(cfg.servers),
                    "connect_timeout": cfg.connect_timeout,
                    "allow_reconnect": True,
                    "max_reconnect_attempts": -1,
                    "error_cb": quiet,
                }
                if cfg.user is not None:
                    options["user"] = cfg.user
                    options["password"] = cfg.password or ""
                if cfg.name is not None:
                    options["name"] = cfg.name
                # the driver retries a first connect forever (max_reconnect_attempts=-1 also
                # governs it): bound it, so an absent server is BrokerUnavailable, not a hang
                nc = self.drv.client()
                budget = cfg.connect_timeout * (len(cfg.servers) + 1)
                try:
                    async with asyncio.timeout(budget):
                        await nc.connect(**options)
                except Exception as exc:
                    with contextlib.suppress(Exception):
                        await nc.close()
                    if isinstance(exc, TimeoutError):
                        raise BrokerUnavailable(
                            f"NATS at {self._where} is unreachable: no connection within "
                            f"{budget:g} s; start the server or fix the URL, then retry"
                        ) from None
                    raise self.map(exc, "connecting") from None
                self._nc = nc
                self._js = nc.jetstream(timeout=cfg.publish_timeout)
        return self._js

    async def check(self) -> None:
        """Raise ``BrokerUnavailable`` unless the server answers a JetStream request now."""
        js = await self._connection()
        try:
            await js.account_info()
        except Exception as exc:
            raise self.map(exc, "reading the JetStream account") from None

    # ------------------------------------------------------------------ publish

    async def publish(self, destination: str, envelopes: Sequence[Envelope]) -> None:
        """Publish each envelope to subject ``destination`` in order, awaiting its PubAck
        (boundary PUBLISHED when this returns); stops at the first failure (the earlier ones
        are stored). ``Nats-Msg-Id`` is the operation id and the payload's fingerprint, so the
        stream drops a retry of the same envelope within its duplicate window -- a transport
        dedup, not the business guarantee (the ledger is): a different payload under the same
        id still goes through (the ledger quarantines the key reuse), and an identical
        re-publish inside the window -- a redrive right after the original -- is dropped too
        (logged, counted in ``duplicates_dropped``). Headers: the envelope's wire headers,
        ``content-type`` and ``rs-key`` (the ordering key). Raises ``PublishAmbiguous`` when a
        PubAck did not come back after the send, ``ConfigurationError`` when no stream captures
        the subject or the server refused the message, ``BrokerUnavailable`` when nothing could
        be sent."""
        check_subject("destination", destination)
        outgoing = [(env, self._headers(env)) for env in envelopes]
        for env, headers in outgoing:
            ctx = {
                "operation_id": env.operation_id,
                "destination": destination,
                "sleep": self._clock.sleep,
            }
            await self._failpoints.hit(PUBLISH_BEFORE_ACCEPT, ctx)
            # the fingerprint too: a different payload reusing the operation id (a key-reuse
            # bug) must reach the ledger, which quarantines it, not vanish in the stream
            msg_id = f"{env.operation_id}:{env.fingerprint}"
            duplicate = await self.publish_raw(
                destination, env.payload, headers, msg_id=msg_id, what=env.operation_id
            )
            if duplicate:
                self.duplicates_dropped += 1
                log.warning(
                    "NATS: stream of %r dropped a re-publish of operation %r (same Nats-Msg-Id "
                    "within duplicate_window=%gs). A producer retry needs nothing more; a "
                    "redrive this soon after the original is NOT delivered: redrive it again "
                    "after the window",
                    destination,
                    env.operation_id,
                    self.config.duplicate_window,
                )
            await self._failpoints.hit(PUBLISH_AFTER_ACCEPT, ctx)

    def _headers(self, env: Envelope) -> dict[str, str]:
        headers = env.wire_headers()
        clash = [
            k
            for k in headers
            if k in (HEADER_KEY, CONTENT_TYPE) or k.lower().startswith(NATS_PREFIX)
        ]
        if clash:
            raise ConfigurationError(
                f"operation {env.operation_id!r}: headers {sorted(clash)} are reserved by the "
                "NATS adapter (rs-key, content-type, Nats-*); rename them"
            )
        headers[CONTENT_TYPE] = env.content_type
        if env.key is not None:
            headers[HEADER_KEY] = env.key
        return headers

    async def publish_raw(
        self, subject: str, body: bytes, headers: dict[str, str], *, msg_id: str, what: str
    ) -> bool:
        """One JetStream publish with ``Nats-Msg-Id`` = ``msg_id``, awaiting the PubAck. True
        when the stream answered "duplicate": it already held that id within its window and
        stored nothing new."""
        js = await self._connection()
        try:
            ack = await js.publish(
                subject,
                body,
                timeout=self.config.publish_timeout,
                headers={**headers, MSG_ID: msg_id},
            )
        except Exception as exc:
            raise map_publish_error(self.drv, exc, subject, what, self._where) from None
        return bool(getattr(ack, "duplicate", False))

    # ------------------------------------------------------------------ subscribe

    async def subscribe(self, source: str, group: str, *, prefetch: int = 16) -> Subscription:
        """Bind a pull subscription to ``group``'s durable consumer on ``source``, declaring
        the stream, the dead-letter stream and the consumer when they do not exist."""
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ConfigurationError(f"prefetch must be a whole number >= 1, got {prefetch!r}")
        js = await self._connection()
        stream, durable, limits = await self.admin.ensure_consumer(js, source, group)
        dead_letter = await self.admin.ensure_dead_letter(js, source)
        try:
            psub = await js.pull_subscribe_bind(durable=durable, stream=stream)
        except Exception as exc:
            raise self.map(exc, f"binding to consumer {durable!r} of {stream!r}") from None
        sub = NATSSubscription(
            self,
            source,
            group,
            psub,
            stream=stream,
            durable=durable,
            dead_letter=dead_letter,
            limits=limits,
            prefetch=prefetch,
        )
        self._subs.add(sub)
        return sub

    def forget(self, sub: NATSSubscription) -> None:
        self._subs.discard(sub)

    # ------------------------------------------------------------------ admin

    async def prepare_source(
        self,
        source: str,
        groups: Sequence[str] = (),
        *,
        visibility_timeout: float | None = None,
        partitions: int | None = None,
    ) -> None:
        """Declare ``source``'s stream, its dead-letter stream and a durable consumer per group
        (``visibility_timeout`` becomes their ``AckWait`` when given). Idempotent; existing
        streams and consumers are kept as they are. ``partitions`` has no NATS meaning."""
        js = await self._connection()
        await self.admin.ensure_stream(js, source)
        await self.admin.ensure_dead_letter(js, source)
        for group in groups:
            await self.admin.ensure_consumer(js, source, group, ack_wait=visibility_timeout)

    async def drop_source(self, source: str, groups: Sequence[str] = ()) -> None:
        """Delete ``source``'s stream and its dead-letter stream, messages and consumers
        included (tests, demos)."""
        js = await self._connection()
        await self.admin.delete_stream(js, source)
        await self.admin.delete_stream(js, self.admin.dead_letter_subject(source))

    async def purge(self, source: str) -> None:
        """Remove every message of ``source`` from its stream."""
        await self.admin.purge(await self._connection(), source)

    def group_name(self, source: str, group: str) -> str:
        return f"{self.admin.consumer_name(group)} on {self.admin.stream_name(source)}"

    async def declared_names(self, source: str, group: str) -> dict[str, str]:
        js = await self._connection()
        stream = await self.admin.find_stream(js, source) or self.admin.stream_name(source)
        dead = self.admin.dead_letter_subject(source)
        dead_stream = await self.admin.find_stream(js, dead) or self.admin.stream_name(dead)
        return {
            "subject": source,
            "stream": stream,
            "consumer": self.admin.consumer_name(group),
            "dead-letter subject": dead,
            "dead-letter stream": dead_stream,
        }

    async def group_state(self, source: str, group: str) -> GroupState:
        """Messages the group has not yet been delivered plus those delivered and unacked
        (``num_pending`` + ``num_ack_pending``), and whether its consumer exists. Consumers
        attached cannot be told on pull consumers (None)."""
        js = await self._connection()
        name = self.group_name(source, group)
        stream = await self.admin.find_stream(js, source)
        if stream is None:
            return GroupState(source, group, name, exists=False)
        info = await self.admin.consumer_info(js, stream, self.admin.consumer_name(group))
        if info is None:
            return GroupState(source, group, name, exists=False)
        waiting = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        return GroupState(source, group, name, messages=waiting, exists=True)

    async def describe(self, source: str) -> SourceFacts:
        """The stream's age limit as retention, the dead-letter subject, the ack wait and
        delivery limit of the adapter's defaults (each consumer may differ)."""
        js = await self._connection()
        info = await self.admin.stream_info(js, source)
        dead = self.admin.dead_letter_subject(source)
        dead_info = await self.admin.stream_info(js, dead)
        retention = info.config.max_age if info is not None and info.config.max_age else None
        dead_retention = (
            dead_info.config.max_age if dead_info is not None and dead_info.config.max_age else None
        )
        limits = limits_of(
            self.drv.api.ConsumerConfig(
                ack_wait=self.config.ack_wait, max_deliver=self.config.max_deliver + 1
            )
        )
        notes = (
            "extend() repeats in_progress: JetStream restarts the timer at ack_wait, it cannot "
            "name another duration",
            "Nats-Msg-Id dedups producer retries within the stream's duplicate window only",
        )
        return SourceFacts(
            broker="NATSBroker",
            retention=retention,
            dead_letter=dead,
            dead_letter_retention=dead_retention,
            redrive_window=dead_retention,
            delivery_limit=limits.limit,
            visibility_timeout=limits.ack_wait,
            auto_commit=False,
            notes=notes,
        )

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Close every subscription (gracefully) and the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            await sub.close()
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            try:
                await nc.close()
            except Exception as exc:
                log.debug("NATS: close failed: %s", exc)

    def __repr__(self) -> str:
        user = f"{self.config.user}@" if self.config.user else ""
        return f"<NATSBroker {user}{self._where}>"


__all__ = ["NATSBroker"]
