"""The memory broker itself: destinations and their groups, publish, subscribe, and the
introspection tests use (the redelivery models are described in the package docstring)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
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
from replaysafe.brokers.memory.config import MemoryConfig, _check_name, _Config
from replaysafe.brokers.memory.consumer import _MemorySubscription
from replaysafe.brokers.memory.group import _Group
from replaysafe.brokers.memory.offsets import _OffsetGroup
from replaysafe.brokers.memory.queues import _NackGroup, _VisibilityGroup
from replaysafe.brokers.memory.store import DeadLetter, StoredMessage, _Destination, partition_for
from replaysafe.clock import Clock
from replaysafe.envelope import HEADER_OPERATION_ID, Envelope
from replaysafe.errors import BrokerUnavailable, CapabilityError, ConfigurationError
from replaysafe.failpoints import (
    FAILPOINTS,
    PUBLISH_AFTER_ACCEPT,
    PUBLISH_BEFORE_ACCEPT,
    Failpoints,
)

__all__ = ["MemoryBroker"]

_CAPABILITIES: dict[RedeliveryKind, Capabilities] = {
    RedeliveryKind.NACK: Capabilities(
        redelivery=RedeliveryKind.NACK,
        settle_granularity=SettleGranularity.MESSAGE,
        extend_visibility=False,
        # competing consumers and requeues reorder messages, as on a RabbitMQ queue
        ordered_within_key=False,
        delivery_count=True,
    ),
    RedeliveryKind.VISIBILITY_TIMEOUT: Capabilities(
        redelivery=RedeliveryKind.VISIBILITY_TIMEOUT,
        settle_granularity=SettleGranularity.MESSAGE,
        extend_visibility=True,
        ordered_within_key=False,
        delivery_count=True,
    ),
    RedeliveryKind.OFFSET_REWIND: Capabilities(
        redelivery=RedeliveryKind.OFFSET_REWIND,
        settle_granularity=SettleGranularity.CUMULATIVE_OFFSET,
        extend_visibility=False,
        ordered_within_key=True,
        delivery_count=True,
    ),
}

_GROUP_TYPES: dict[RedeliveryKind, type[_Group]] = {
    RedeliveryKind.NACK: _NackGroup,
    RedeliveryKind.VISIBILITY_TIMEOUT: _VisibilityGroup,
    RedeliveryKind.OFFSET_REWIND: _OffsetGroup,
}


class MemoryBroker(Broker):
    """The reference broker (see the package docstring for the three redelivery models).

    ``clock`` drives every timer (delayed nack, visibility expiry, broker timestamps): with
    ``replaysafe.testing.FakeClock`` nothing is redelivered until the test advances time.
    ``failpoints`` (default: the process-wide registry) is hit around each envelope's publish:
    ``PUBLISH_BEFORE_ACCEPT`` (raising there stores nothing) and ``PUBLISH_AFTER_ACCEPT`` (raising
    there leaves the message stored: an ambiguous publish), with ctx ``operation_id``,
    ``destination`` and ``sleep`` (the broker clock's sleep).

    The settings are a :class:`MemoryConfig` (defaults and checks there): pass ``config=`` or the
    same settings as keywords, not both. ``self.config`` is the config the broker runs with.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        failpoints: Failpoints | None = None,
        default_mode: RedeliveryKind | None = None,
        config: MemoryConfig | None = None,
    ) -> None:
        # None means "not given": the defaults live in MemoryConfig, one place
        given: dict[str, Any] = {
            name: value
            for name, value in (
                ("clock", clock),
                ("failpoints", failpoints),
                ("default_mode", default_mode),
            )
            if value is not None
        }
        self.config = config = config_or_options("MemoryBroker", MemoryConfig, config, given)
        self._clock = config.clock
        self._failpoints = FAILPOINTS if config.failpoints is None else config.failpoints
        self._default = _Config(config.default_mode, 30.0, 1)
        self._dests: dict[str, _Destination] = {}
        self._subs: set[_MemorySubscription] = set()
        self._tags = itertools.count(1)
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **opts: Any) -> MemoryBroker:
        """The broker the URL ``memory`` names, ``opts`` being its settings (``clock``,
        ``failpoints``, ``default_mode``): :meth:`MemoryConfig.from_url` parses it."""
        return cls(config=MemoryConfig.from_url(url, **opts))

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def failpoints(self) -> Failpoints:
        return self._failpoints

    # ---------------------------------------------------------------- configuration

    def declare(
        self,
        name: str,
        *,
        mode: RedeliveryKind,
        visibility_timeout: float = 30.0,
        partitions: int = 1,
    ) -> None:
        """Choose ``name``'s redelivery model. Undeclared destinations get ``default_mode``
        (30 s visibility, 1 partition). Declaring again with the same settings is a no-op; with
        different ones it raises ``ConfigurationError`` (as a RabbitMQ redeclare does)."""
        _check_name("destination", name)
        if visibility_timeout <= 0:
            raise ConfigurationError(
                f"visibility_timeout must be > 0 seconds, got {visibility_timeout}"
            )
        if partitions < 1:
            raise ConfigurationError(f"partitions must be >= 1, got {partitions}")
        config = _Config(RedeliveryKind(mode), float(visibility_timeout), partitions)
        existing = self._dests.get(name)
        if existing is None:
            self._dests[name] = _Destination(name, config)
        elif existing.config != config:
            raise ConfigurationError(
                f"MemoryBroker: destination {name!r} already exists with {existing.config}; "
                f"cannot redeclare it with {config}. Use a new name or declare it before first use"
            )

    def _dest(self, name: str) -> _Destination:
        dest = self._dests.get(name)
        if dest is None:
            _check_name("destination", name)
            dest = self._dests[name] = _Destination(name, self._default)
        return dest

    def _group(self, name: str, group: str) -> _Group:
        dest = self._dest(name)
        grp = dest.groups.get(group)
        if grp is None:
            _check_name("group", group)
            grp = dest.groups[group] = _GROUP_TYPES[dest.config.mode](
                dest, group, clock=self._clock, tags=self._tags
            )
            # a late group reads the whole history, as if its queue had existed all along
            for msg in dest.log:
                grp.add(msg)
        return grp

    def capabilities(self, source: str) -> Capabilities:
        dest = self._dests.get(source)
        return _CAPABILITIES[(dest.config if dest is not None else self._default).mode]

    async def prepare_source(
        self,
        source: str,
        groups: Sequence[str] = (),
        *,
        visibility_timeout: float | None = None,
        partitions: int | None = None,
    ) -> None:
        """Declare ``source`` with the broker's default mode (groups see the whole history)."""
        if source in self._dests:
            return
        self.declare(source, mode=self._default.mode,
                     visibility_timeout=visibility_timeout or self._default.visibility_timeout,
                     partitions=partitions or 1)  # fmt: skip

    async def describe(self, source: str) -> SourceFacts:
        dest = self._dests.get(source)
        config = dest.config if dest is not None else self._default
        vis = config.visibility_timeout
        return SourceFacts(
            broker="memory",
            visibility_timeout=vis if config.mode is RedeliveryKind.VISIBILITY_TIMEOUT else None,
            notes=("messages live only as long as the process",),
        )

    def group_name(self, source: str, group: str) -> str:
        return f"{source}/{group}"

    async def group_state(self, source: str, group: str) -> GroupState:
        """Messages the group has neither completed nor out with a consumer, and its live
        subscriptions. A group that does not exist yet would read the whole history."""
        name = self.group_name(source, group)
        dest = self._dests.get(source)
        grp = dest.groups.get(group) if dest is not None else None
        if grp is None:
            waiting = len(dest.log) if dest is not None else 0
            return GroupState(source, group, name, messages=waiting, consumers=0, exists=False)
        now = self._clock.now()
        waiting = grp.depth(now) - grp.in_flight(now)
        return GroupState(source, group, name, waiting, len(grp.subs), exists=True)

    async def stray_groups(self, source: str, prefix: str) -> list[GroupState]:
        dest = self._dests.get(source)
        names = sorted(g for g in (dest.groups if dest is not None else {}) if g.startswith(prefix))
        return [await self.group_state(source, g) for g in names]

    # ---------------------------------------------------------------- publish / subscribe

    async def publish(self, destination: str, envelopes: Sequence[Envelope]) -> None:
        """Store each envelope in wire form (boundary PUBLISHED when this returns).

        Envelopes are accepted one by one: if a failpoint raises, the earlier ones are stored, and
        with ``PUBLISH_AFTER_ACCEPT`` the failing one is stored too -- the caller sees the error
        (e.g. ``PublishAmbiguous``) and must retry with the SAME envelopes, which stores copies.
        Nothing is stamped here: ``rs-published-at`` is the producer's business.
        """
        if self._closed:
            raise BrokerUnavailable("MemoryBroker is closed; create a new one to publish")
        dest = self._dest(destination)
        for env in envelopes:
            ctx: dict[str, Any] = {
                "operation_id": env.operation_id,
                "destination": destination,
                "sleep": self._clock.sleep,
            }
            await self._failpoints.hit(PUBLISH_BEFORE_ACCEPT, ctx)
            self._store(dest, env)
            await self._failpoints.hit(PUBLISH_AFTER_ACCEPT, ctx)

    async def publish_raw(
        self,
        destination: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        key: str | None = None,
        content_type: str | None = None,
    ) -> None:
        """Store a message as a plain client would send it: exactly these bytes and headers, no
        envelope, no validation (bad input is the consumer's decision). The same failpoints run,
        with ``operation_id`` taken from the ``rs-operation-id`` header when present."""
        if self._closed:
            raise BrokerUnavailable("MemoryBroker is closed; create a new one to publish")
        dest = self._dest(destination)
        hdrs = dict(headers)
        ctype = content_type or hdrs.get("content-type")
        if ctype is not None:
            hdrs["content-type"] = ctype
        ctx: dict[str, Any] = {
            "operation_id": hdrs.get(HEADER_OPERATION_ID),
            "destination": destination,
            "sleep": self._clock.sleep,
        }
        await self._failpoints.hit(PUBLISH_BEFORE_ACCEPT, ctx)
        self._append(dest, bytes(body), hdrs, ctype, key)
        await self._failpoints.hit(PUBLISH_AFTER_ACCEPT, ctx)

    def _store(self, dest: _Destination, env: Envelope) -> None:
        headers = env.wire_headers()
        headers["content-type"] = env.content_type
        self._append(dest, env.payload, headers, env.content_type, env.key)

    def _append(
        self,
        dest: _Destination,
        body: bytes,
        headers: dict[str, str],
        content_type: str | None,
        key: str | None,
    ) -> None:
        part = partition_for(key, dest.config.partitions)
        msg = StoredMessage(
            seq=len(dest.log),
            operation_id=headers.get(HEADER_OPERATION_ID),
            body=body,
            headers=headers,
            content_type=content_type,
            key=key,
            timestamp=self._clock.now(),
            partition=part,
            offset=len(dest.partition_logs[part]),
        )
        dest.log.append(msg)
        dest.partition_logs[part].append(msg)
        for grp in dest.groups.values():
            grp.add(msg)
            grp.notify()

    async def subscribe(self, source: str, group: str, *, prefetch: int = 16) -> Subscription:
        """Join ``group`` on ``source``; at most ``prefetch`` deliveries are unsettled at a time.
        On OFFSET_REWIND destinations joining rebalances the group's partitions."""
        if self._closed:
            raise BrokerUnavailable("MemoryBroker is closed; create a new one to subscribe")
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be >= 1, got {prefetch}")
        grp = self._group(source, group)
        sub = _MemorySubscription(grp, prefetch, self._subs)
        grp.attach(sub)
        self._subs.add(sub)
        grp.notify()
        return sub

    async def close(self) -> None:
        """Close every open subscription (cleanly) and refuse further publishes. Idempotent.
        The stored state stays inspectable."""
        self._closed = True
        for sub in list(self._subs):
            await sub.close()

    # ---------------------------------------------------------------- introspection (tests)

    def depth(self, name: str, group: str) -> int:
        """Messages the group has not completed: NACK/VISIBILITY not yet acked or rejected;
        OFFSET_REWIND the lag, records at or after the committed offset."""
        return self._group(name, group).depth(self._clock.now())

    def in_flight(self, name: str, group: str) -> int:
        """Messages out with a consumer: NACK unacked; VISIBILITY invisible (received or delayed,
        timer not expired); OFFSET_REWIND delivered and not yet settled."""
        return self._group(name, group).in_flight(self._clock.now())

    def delivery_count(self, name: str, group: str, operation_id: str | None) -> int:
        """How many copies of ``operation_id`` the group has received (all published copies)."""
        return self._group(name, group).delivery_count(operation_id)

    def dead_letters(self, name: str, group: str) -> list[DeadLetter]:
        """What the group rejected, in rejection order."""
        return list(self._group(name, group).dead)

    def published(self, name: str) -> list[str | None]:
        """Operation ids of every accepted publish, in order (retries appear once per copy; None
        for a raw message without ``rs-operation-id``)."""
        dest = self._dests.get(name)
        return [] if dest is None else [m.operation_id for m in dest.log]

    def messages(self, name: str) -> list[StoredMessage]:
        """Every accepted publish in wire form, in order."""
        dest = self._dests.get(name)
        return [] if dest is None else list(dest.log)

    def committed(self, name: str, group: str) -> dict[int, int]:
        """OFFSET_REWIND: the committed offset per partition (next offset a new owner reads)."""
        grp = self._group(name, group)
        if not isinstance(grp, _OffsetGroup):
            raise CapabilityError(
                f"MemoryBroker: destination {name!r} is not OFFSET_REWIND; it has no offsets"
            )
        return {p: ps.committed for p, ps in enumerate(grp.parts)}

    def assignment(self, name: str, group: str) -> dict[int, Subscription | None]:
        """OFFSET_REWIND: which live subscription owns each partition."""
        grp = self._group(name, group)
        if not isinstance(grp, _OffsetGroup):
            raise CapabilityError(
                f"MemoryBroker: destination {name!r} is not OFFSET_REWIND; it has no partitions"
            )
        return dict(grp.assignment())

    def __repr__(self) -> str:
        return f"MemoryBroker(clock={self._clock!r}, destinations={sorted(self._dests)})"
