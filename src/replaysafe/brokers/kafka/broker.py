"""The Kafka broker: publishing, subscribing and the admin calls of one cluster."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

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
from replaysafe.brokers.kafka.admin import _AdminCalls
from replaysafe.brokers.kafka.config import KafkaConfig, _check_name
from replaysafe.brokers.kafka.consumer import _KafkaSubscription
from replaysafe.brokers.kafka.errors import _driver
from replaysafe.brokers.kafka.offsets import TP
from replaysafe.brokers.kafka.producer import _Publisher
from replaysafe.clock import Clock
from replaysafe.envelope import Envelope
from replaysafe.errors import BrokerUnavailable, ConfigurationError
from replaysafe.failpoints import FAILPOINTS, Failpoints

if TYPE_CHECKING:
    from confluent_kafka import KafkaError

log = logging.getLogger("replaysafe.brokers.kafka")

T = TypeVar("T")

KAFKA_CAPABILITIES = Capabilities(
    redelivery=RedeliveryKind.OFFSET_REWIND,
    settle_granularity=SettleGranularity.CUMULATIVE_OFFSET,
    extend_visibility=False,
    # per partition; the key picks the partition (murmur2, as the Java client), so one key's
    # records keep their publish order as long as the partition count does not change
    ordered_within_key=True,
    # Kafka stores no delivery count: attempt is what this process has seen (a lower bound)
    delivery_count=False,
    native_dedup_window=None,
    delayed_nack=True,
    independent_groups=True,
)


class _Default:
    """A keyword argument the caller left out: :class:`KafkaConfig`'s default applies (the
    defaults live there only)."""

    def __repr__(self) -> str:
        return "<KafkaConfig default>"


_DEFAULT: Any = _Default()


class KafkaBroker(Broker):
    """Kafka through confluent-kafka. See the package docstring for what each call means here.

    Built from a :class:`KafkaConfig`: either ``KafkaBroker(config=KafkaConfig(...))`` (then no
    other argument may be given), or the same options as keyword arguments
    (``KafkaBroker("host:9092", session_timeout=6)``), or :meth:`from_url`. The options and
    their meaning are documented on :class:`KafkaConfig`; the one in effect is ``self.config``.
    ``config`` given as a mapping (not a ``KafkaConfig``) is the extra librdkafka configuration
    for every client, as before.
    """

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        clock: Clock = _DEFAULT,
        failpoints: Failpoints | None = _DEFAULT,
        config: KafkaConfig | Mapping[str, Any] | None = None,
        consumer_config: Mapping[str, Any] | None = _DEFAULT,
        producer_config: Mapping[str, Any] | None = _DEFAULT,
        session_timeout: float = _DEFAULT,
        heartbeat_interval: float | None = _DEFAULT,
        poll_interval: float = _DEFAULT,
        drain_timeout: float = _DEFAULT,
        join_timeout: float = _DEFAULT,
        publish_timeout: float = _DEFAULT,
        request_timeout: float = _DEFAULT,
        commit_interval: float = _DEFAULT,
        idempotence: bool = _DEFAULT,
        auto_offset_reset: str = _DEFAULT,
        _display: str | None = _DEFAULT,
    ) -> None:
        given: dict[str, Any] = {
            name: value
            for name, value in (
                ("clock", clock),
                ("failpoints", failpoints),
                ("consumer_config", consumer_config),
                ("producer_config", producer_config),
                ("session_timeout", session_timeout),
                ("heartbeat_interval", heartbeat_interval),
                ("poll_interval", poll_interval),
                ("drain_timeout", drain_timeout),
                ("join_timeout", join_timeout),
                ("publish_timeout", publish_timeout),
                ("request_timeout", request_timeout),
                ("commit_interval", commit_interval),
                ("idempotence", idempotence),
                ("auto_offset_reset", auto_offset_reset),
                ("display", _display),
            )
            if value is not _DEFAULT
        }
        if isinstance(config, KafkaConfig):
            if bootstrap_servers is not None:
                given["bootstrap_servers"] = bootstrap_servers
            self._ck = _driver()
            cfg = config_or_options("KafkaBroker", KafkaConfig, config, given)
        else:
            self._ck = _driver()  # before validating, as ever: a missing extra is said first
            given["bootstrap_servers"] = bootstrap_servers
            if config is not None:
                given["config"] = config
            cfg = KafkaConfig(**given)
        #: the configuration in effect (validated, immutable)
        self.config = cfg
        self.bootstrap = cfg.bootstrap_servers
        self.clock = cfg.clock
        self.failpoints = FAILPOINTS if cfg.failpoints is None else cfg.failpoints
        self.poll_interval = float(cfg.poll_interval)
        self.drain_timeout = float(cfg.drain_timeout)
        self.join_timeout = float(cfg.join_timeout)
        self.publish_timeout = float(cfg.publish_timeout)
        self.request_timeout = float(cfg.request_timeout)
        self.commit_interval = float(cfg.commit_interval)
        self.idempotence = cfg.idempotence
        self._display = cfg.display or cfg.bootstrap_servers
        self._common: dict[str, Any] = {
            "bootstrap.servers": cfg.bootstrap_servers,
            "client.id": "replaysafe",
            "logger": log,
            "error_cb": self._client_error,
            **dict(cfg.config or {}),
        }
        self._consumer_base: dict[str, Any] = {
            **self._common,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "auto.offset.reset": cfg.auto_offset_reset,
            "session.timeout.ms": int(cfg.session_timeout * 1000),
            "heartbeat.interval.ms": max(1, int(cfg.heartbeat * 1000)),
            **dict(cfg.consumer_config or {}),
        }
        self._producer_conf: dict[str, Any] = {
            **self._common,
            "enable.idempotence": cfg.idempotence,
            "acks": "all",
            # murmur2, as the Java client: one key maps to one partition across languages
            "partitioner": "murmur2_random",
            "delivery.timeout.ms": int(cfg.publish_timeout * 1000),
            **dict(cfg.producer_config or {}),
        }
        self._publisher = _Publisher(self)
        self._admin_calls = _AdminCalls(self)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="replaysafe-kafka"
        )
        self._subs: set[_KafkaSubscription] = set()
        # attempts as far as this object knows: (group, topic, partition) -> offset -> copies
        self._attempts: dict[tuple[str, str, int], dict[int, int]] = {}
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **opts: Any) -> KafkaBroker:
        """``kafka://[user:password@]host:port[,host:port][?librdkafka.key=value&...]``, parsed
        by :meth:`KafkaConfig.from_url`; ``opts`` are the constructor's keyword arguments. The
        password never appears in ``repr`` or errors."""
        return cls(config=KafkaConfig.from_url(url, **opts))

    # ---------------------------------------------------------------- configuration

    def _consumer_conf(self, group: str) -> dict[str, Any]:
        return {**self._consumer_base, "group.id": group}

    def _client_error(self, err: KafkaError) -> None:
        # librdkafka's global errors (all brokers down, auth): it keeps retrying by itself
        log.warning("KafkaBroker %s: %s", self._display, err)

    def capabilities(self, source: str) -> Capabilities:
        return KAFKA_CAPABILITIES

    # ---------------------------------------------------------------- attempts

    def _seen(self, group: str, tp: TP, offset: int) -> int:
        seen = self._attempts.setdefault((group, tp[0], tp[1]), {})
        n = seen.get(offset, 0) + 1
        seen[offset] = n
        return n

    def _forget(self, group: str, committed: list[tuple[TP, int]]) -> None:
        """Committed offsets are never read again by the group: drop their counts."""
        for tp, position in committed:
            seen = self._attempts.get((group, tp[0], tp[1]))
            if seen:
                for offset in [o for o in seen if o < position]:
                    del seen[offset]

    # ---------------------------------------------------------------- publish

    async def publish(self, destination: str, envelopes: Sequence[Envelope]) -> None:
        """Produce each envelope (value = payload, key = ordering key, headers = wire headers) and
        wait for every delivery report (boundary PUBLISHED when this returns).

        Raises ``PublishAmbiguous`` when a record may have been written (timeout, lost connection,
        a fatal producer error): retry with the SAME envelopes. Raises ``BrokerError`` when Kafka
        refused a record for good (too large, unknown topic, not authorized): it was not written.
        Records produced before an exception are still sent by librdkafka.
        """
        if self._closed:
            raise BrokerUnavailable("KafkaBroker is closed; create a new one to publish")
        _check_name("destination", destination)
        await self._publisher.publish(destination, envelopes)

    # ---------------------------------------------------------------- subscribe

    async def subscribe(self, source: str, group: str, *, prefetch: int = 16) -> Subscription:
        """Join consumer ``group`` on topic ``source`` and return once the group assigned this
        member its partitions (or after ``join_timeout``, with a warning). At most ``prefetch``
        deliveries are unsettled at a time, and at most ``prefetch`` more wait in the buffer.
        Raises ``ConfigurationError`` when the topic does not exist, ``BrokerUnavailable`` when
        the brokers cannot be reached."""
        if self._closed:
            raise BrokerUnavailable("KafkaBroker is closed; create a new one to subscribe")
        _check_name("topic", source)
        _check_name("group", group)
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be >= 1, got {prefetch}")
        sub = _KafkaSubscription(self, source, group, prefetch)
        self._subs.add(sub)
        try:
            await sub._start()
        except BaseException:
            self._subs.discard(sub)
            with contextlib.suppress(Exception):
                await sub.close(abandon=True)
            raise
        return sub

    # ---------------------------------------------------------------- admin (tests and ops)

    async def _admin(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(admin_client)`` in the pool (see :meth:`_AdminCalls.run`)."""
        return await self._admin_calls.run(fn)

    async def drop_source(self, source: str, groups: Sequence[str] = ()) -> None:
        """Delete the source and what was declared for it, messages included."""
        await self.delete_topic(source)

    async def prepare_source(
        self,
        source: str,
        groups: Sequence[str] = (),
        *,
        visibility_timeout: float | None = None,
        partitions: int | None = None,
    ) -> None:
        """Create the topic (groups start from the earliest offset when they first join).
        Without ``partitions`` an existing topic is kept whatever its partition count (a new one
        gets 1); with it, an existing topic must have that count."""
        await self.create_topic(source, partitions or 1, keep_partitions=partitions is None)

    async def declared_names(self, source: str, group: str) -> dict[str, str]:
        """The topic (publish there) and the consumer group id the subscription joins."""
        return {"topic": source, "group id": self._consumer_conf(group)["group.id"]}

    async def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        replication_factor: int = 1,
        config: Mapping[str, str] | None = None,
        keep_partitions: bool = False,
    ) -> None:
        """Create topic ``name``. Creating an existing topic with the same partition count (or
        any count, with ``keep_partitions``) is a no-op; with a different one it raises
        ``ConfigurationError``."""
        await self._admin_calls.create_topic(
            name,
            partitions,
            replication_factor=replication_factor,
            config=config,
            keep_partitions=keep_partitions,
        )

    async def describe(self, source: str) -> SourceFacts:
        """Retention of topic ``source`` (``retention.ms``; None when unbounded or compacted) and
        the consumer facts ``explain`` checks. Unreadable configuration gives unknowns."""
        return await self._admin_calls.describe(source)

    async def delete_topic(self, name: str) -> None:
        """Delete topic ``name`` (missing topics are ignored)."""
        await self._admin_calls.delete_topic(name)

    async def committed(self, topic: str, group: str) -> dict[int, int | None]:
        """The group's committed offset per partition (None where it committed nothing).

        Read with the admin API (OffsetFetch), not with a consumer that carries the group's id:
        such a consumer is a group member as far as some brokers are concerned (against Tansu it
        stalled the group's assignment), so this probe is safe while the group is consuming."""
        return await self._admin_calls.committed(topic, group)

    async def lag(
        self, topic: str, group: str, *, committed: Mapping[int, int | None] | None = None
    ) -> dict[int, int]:
        """Records per partition the group has not committed yet (end offset - committed);
        ``committed``: the group's offsets when the caller has just read them (:meth:`committed`).

        A read-only probe: offsets through the admin API, the end of each partition read with a
        group-less ``assign`` of every partition at once (it never joins the group). The end is
        found by *reading* from the reported high watermark - 1 to the last record: some brokers
        (Tansu, seen with confluent-kafka 2.16) report the base offset of the last record batch
        + 1 as the high watermark, which undercounts by the size of that batch."""
        if committed is None:
            committed = await self.committed(topic, group)
        return await self._admin_calls.lag(topic, group, committed)

    # ---------------------------------------------------------------- groups (start-up check)

    def group_name(self, source: str, group: str) -> str:
        """Topic and consumer group id: a group reads the whole topic from its own offsets."""
        return f"topic {source!r}, group id {group!r}"

    async def group_state(self, source: str, group: str) -> GroupState:
        """The group's lag on ``source`` (:meth:`lag`, summed over partitions) and its members
        (``DescribeConsumerGroups``). ``exists`` is False while the group has neither committed
        offsets nor members (its first member starts at ``auto_offset_reset``)."""
        members = (await self._members([group])).get(group, 0)
        return await self._group_state(source, group, await self.committed(source, group), members)

    async def stray_groups(self, source: str, prefix: str) -> list[GroupState]:
        """Consumer groups whose id starts with ``prefix`` that committed offsets on ``source``
        (``ListConsumerGroups``, then each one's offsets, members and lag)."""
        offsets = {
            group: await self.committed(source, group)
            for group in await self._admin_calls.groups(prefix)
        }
        # a group that never read this topic is no stray of it
        read = [g for g, c in offsets.items() if any(v is not None for v in c.values())]
        members = await self._members(read) if read else {}
        return [await self._group_state(source, g, offsets[g], members.get(g, 0)) for g in read]

    async def _group_state(
        self, source: str, group: str, committed: Mapping[int, int | None], members: int | None
    ) -> GroupState:
        """The group's state from its offsets and members, read by the caller (one OffsetFetch
        and one DescribeConsumerGroups per group, not one more inside :meth:`lag`)."""
        lag = sum((await self.lag(source, group, committed=committed)).values())
        known = members != 0 or any(v is not None for v in committed.values())
        return GroupState(source, group, self.group_name(source, group), lag, members, known)

    async def _members(self, groups: list[str]) -> dict[str, int | None]:
        """Live members per group (``DescribeConsumerGroups``): 0 for an empty or unknown group,
        None where a group in another state lists no member (some brokers, Tansu among them,
        report a consuming group as STABLE without its members: unknown, not zero)."""
        return await self._admin_calls.members(groups)

    async def check(self) -> None:
        """The cluster answers a metadata request (``BrokerUnavailable`` otherwise)."""
        await self._admin_calls.check()

    # ---------------------------------------------------------------- close

    async def close(self) -> None:
        """Close every subscription (gracefully), flush the producer (up to ``publish_timeout``)
        and refuse further publishes. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            await sub.close()
        await self._publisher.close()
        self._pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"KafkaBroker({self._display!r}, subscriptions={len(self._subs)})"
