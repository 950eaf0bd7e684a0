"""Kafka's admin requests (topics, group offsets, lag, members) for one broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from replaysafe.brokers.base import SourceFacts
from replaysafe.brokers.kafka.config import _check_name
from replaysafe.brokers.kafka.errors import _admin_failure, _kafka_error
from replaysafe.errors import BrokerError, BrokerUnavailable, ConfigurationError

if TYPE_CHECKING:
    from replaysafe.brokers.kafka.broker import KafkaBroker

T = TypeVar("T")


class _AdminCalls:
    """The admin requests of a :class:`KafkaBroker`, each one round trip of a short-lived admin
    client (or, for ``lag``, a group-less consumer) in the broker's thread pool. Read-only
    probes (``committed``, ``lag``, ``members``, ``groups``) never join a group, so they are
    safe while the group consumes. Every call goes through :meth:`KafkaBroker._admin`, which
    maps the driver's errors; the broker keeps the documented contracts."""

    __slots__ = ("_broker",)

    def __init__(self, broker: KafkaBroker) -> None:
        self._broker = broker

    async def run(self, fn: Callable[[Any], T]) -> T:
        """Call ``fn`` with a short-lived admin client, in the broker's thread pool; its errors
        mapped (:func:`_admin_failure`). :meth:`KafkaBroker._admin` is the way in."""
        b = self._broker

        def run() -> T:
            # log_level 4: a short-lived admin client logs its teardown ("purging unserved
            # events") at level 6, once per probe
            conf = {k: v for k, v in b._common.items() if k not in ("logger",)}
            admin = b._ck.admin.AdminClient({**conf, "log_level": 4})
            return fn(admin)

        try:
            return await asyncio.get_running_loop().run_in_executor(b._pool, run)
        except (ConfigurationError, BrokerError):
            raise
        except Exception as exc:
            raise _admin_failure(b._ck, exc, b._display) from exc

    async def create_topic(
        self,
        name: str,
        partitions: int,
        *,
        replication_factor: int,
        config: Mapping[str, str] | None,
        keep_partitions: bool,
    ) -> None:
        """See :meth:`KafkaBroker.create_topic`."""
        b = self._broker
        _check_name("topic", name)
        if partitions < 1:
            raise ConfigurationError(f"partitions must be >= 1, got {partitions}")
        ck = b._ck
        timeout = b.request_timeout

        def create(admin: Any) -> None:
            topic = ck.admin.NewTopic(
                name,
                num_partitions=partitions,
                replication_factor=replication_factor,
                config=dict(config or {}),
            )
            try:
                admin.create_topics([topic], request_timeout=timeout)[name].result(timeout)
            except ck.KafkaException as exc:
                err = _kafka_error(exc)
                if err is None or err.code() != ck.KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
                meta = admin.list_topics(name, timeout=timeout).topics[name]
                if not keep_partitions and len(meta.partitions) != partitions:
                    raise ConfigurationError(
                        f"KafkaBroker: topic {name!r} already exists with "
                        f"{len(meta.partitions)} partitions, not {partitions}; use another name "
                        "or the existing count"
                    ) from None

        await b._admin(create)

    async def describe(self, source: str) -> SourceFacts:
        """See :meth:`KafkaBroker.describe`."""
        b = self._broker
        ck = b._ck
        timeout = b.request_timeout
        notes = [
            "a nack rewinds the partition: every later record of it is delivered again",
            "attempt counts what this process saw (Kafka keeps no delivery count)",
            "a crash redelivers every record after the lowest unfinished one of each partition",
        ]

        def read(admin: Any) -> dict[str, str | None]:
            res = ck.admin.ConfigResource(ck.admin.ResourceType.TOPIC, source)
            entries = admin.describe_configs([res], request_timeout=timeout)[res].result(timeout)
            return {k: v.value for k, v in entries.items()}

        retention: float | None = None
        try:
            config = await b._admin(read)
        except (BrokerError, ConfigurationError) as exc:
            notes.append(f"topic configuration unreadable: {exc}")
        else:
            ms = config.get("retention.ms")
            if ms is not None and int(ms) >= 0:
                retention = int(ms) / 1000.0
            if "compact" in (config.get("cleanup.policy") or ""):
                retention = None
                notes.append("compacted topic: the latest record per key is kept without limit")
            size = config.get("retention.bytes")
            if size is not None and int(size) >= 0:
                notes.append(f"retention.bytes={size} may delete records before retention.ms")
        return SourceFacts(
            broker="kafka",
            retention=retention,
            auto_commit=False,  # refused at construction: the adapter commits after the effect
            broker_timestamps=True,
            notes=tuple(notes),
        )

    async def delete_topic(self, name: str) -> None:
        """See :meth:`KafkaBroker.delete_topic`."""
        b = self._broker
        ck = b._ck
        timeout = b.request_timeout

        def delete(admin: Any) -> None:
            try:
                admin.delete_topics([name], operation_timeout=timeout)[name].result(timeout)
            except ck.KafkaException as exc:
                err = _kafka_error(exc)
                if err is None or err.code() != ck.KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise

        await b._admin(delete)

    async def committed(self, topic: str, group: str) -> dict[int, int | None]:
        """See :meth:`KafkaBroker.committed`."""
        b = self._broker
        ck = b._ck
        timeout = b.request_timeout

        def fetch(admin: Any) -> dict[int, int | None]:
            meta = admin.list_topics(topic, timeout=timeout).topics[topic]
            if meta.error is not None:
                raise ck.KafkaException(meta.error)
            tps = [ck.TopicPartition(topic, p) for p in sorted(meta.partitions)]
            request = ck.ConsumerGroupTopicPartitions(group, tps)
            [future] = admin.list_consumer_group_offsets([request]).values()
            got = future.result(timeout)
            out: dict[int, int | None] = {p: None for p in sorted(meta.partitions)}
            for tp in got.topic_partitions:
                out[tp.partition] = tp.offset if tp.offset >= 0 else None
            return out

        return await b._admin(fetch)

    async def lag(
        self, topic: str, group: str, committed: Mapping[int, int | None]
    ) -> dict[int, int]:
        """See :meth:`KafkaBroker.lag` (``committed`` read by the caller)."""
        b = self._broker
        ck = b._ck
        timeout = b.request_timeout

        def ends() -> dict[int, int]:
            c = ck.Consumer(
                {
                    **b._consumer_base,
                    "group.id": f"rs-lag-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                }
            )
            try:
                low, end = {}, {}
                for p in committed:
                    low[p], end[p] = c.get_watermark_offsets(
                        ck.TopicPartition(topic, p), timeout=timeout
                    )
                # every partition at once: the last, empty poll is paid once, not per partition
                # (one each made the start-up check of an 8-partition topic take 7 s on Tansu)
                reading = [ck.TopicPartition(topic, p, end[p] - 1) for p in end if end[p] > low[p]]
                if reading:
                    c.assign(reading)
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline:
                        got = [m for m in c.consume(500, 0.3) if m.error() is None]
                        if not got:
                            break
                        for m in got:
                            end[m.partition()] = max(end[m.partition()], m.offset() + 1)
                    c.unassign()
                return {
                    p: max(0, end[p] - (low[p] if start is None else start))
                    for p, start in committed.items()
                }
            finally:
                c.close()

        try:
            return await asyncio.get_running_loop().run_in_executor(b._pool, ends)
        except Exception as exc:
            raise BrokerUnavailable(
                f"KafkaBroker: cannot read the end offsets of {topic!r} from {b._display}: {exc}"
            ) from exc

    async def members(self, groups: list[str]) -> dict[str, int | None]:
        """See :meth:`KafkaBroker._members`."""
        b = self._broker
        ck = b._ck
        timeout = b.request_timeout
        idle = {ck.ConsumerGroupState.EMPTY, ck.ConsumerGroupState.DEAD}

        def describe(admin: Any) -> dict[str, int | None]:
            futures = admin.describe_consumer_groups(groups, request_timeout=timeout)
            out: dict[str, int | None] = {}
            for group, future in futures.items():
                desc = future.result(timeout)
                n = len(desc.members or [])
                out[group] = n if n or desc.state in idle else None
            return out

        return await b._admin(describe)

    async def groups(self, prefix: str) -> list[str]:
        """The consumer group ids that start with ``prefix`` (``ListConsumerGroups``), sorted."""
        b = self._broker
        timeout = b.request_timeout

        def listed(admin: Any) -> list[str]:
            result = admin.list_consumer_groups(request_timeout=timeout).result(timeout)
            return sorted(g.group_id for g in result.valid if g.group_id.startswith(prefix))

        return await b._admin(listed)

    async def check(self) -> None:
        """See :meth:`KafkaBroker.check`."""
        b = self._broker
        timeout = b.request_timeout
        await b._admin(lambda admin: admin.list_topics(timeout=timeout))
