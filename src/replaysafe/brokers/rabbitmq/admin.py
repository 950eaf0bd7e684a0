"""Declaring, deleting and inspecting a broker's RabbitMQ topology (exchanges, group queues,
dead-letter and retry queues), on short-lived channels of the publish connection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

from replaysafe.brokers.base import GroupState
from replaysafe.brokers.rabbitmq._driver import _driver, _driver_aiormq
from replaysafe.brokers.rabbitmq.topology import (
    Topology,
    _check_length,
    _check_name,
    _escape,
    _unescape,
)

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustChannel

    from replaysafe.brokers.rabbitmq.broker import RabbitMQBroker

log = logging.getLogger("replaysafe.brokers.rabbitmq")


def _management_get(url: str, auth: tuple[str, str], timeout: float) -> Any:
    """One GET on the RabbitMQ management HTTP API; the decoded JSON."""
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class _Admin:
    """The topology side of one broker: owns what this broker object declared (so that a publish
    or subscribe declares once, not per call), the queue arguments of each kind of queue, and the
    passive declares and management API calls that inspect them. A declaration RabbitMQ refuses
    closes its channel, so each runs on a short-lived one, never on a long-lived channel."""

    def __init__(self, broker: RabbitMQBroker) -> None:
        self._broker = broker
        self._exchanges: set[str] = set()
        self._queues: set[str] = set()
        self._declared: dict[str, set[str]] = {}

    @property
    def declared(self) -> Mapping[str, frozenset[str]]:
        """Destinations and groups this broker object declared."""
        return {s: frozenset(g) for s, g in self._declared.items()}

    def forget(self, *, exchange: str | None = None, queue: str | None = None) -> None:
        """``exchange`` / ``queue`` is gone (deleted behind our back): declare it again."""
        if exchange is not None:
            self._exchanges.discard(exchange)
        if queue is not None:
            self._queues.discard(queue)

    def queue_args(self, topo: Topology) -> dict[str, Any]:
        """The arguments of a group's queue: dead-lettered into its ``…/dead`` queue."""
        args: dict[str, Any] = {
            "x-queue-type": self._broker.queue_type,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": topo.dead_letter_queue,
        }
        if self._broker.queue_type == "quorum":
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
            if self._broker.delivery_limit is not None:
                args["x-delivery-limit"] = self._broker.delivery_limit
        return args

    def _retry_args(self, topo: Topology) -> dict[str, Any]:
        """The arguments of a retry queue: expired copies dead-letter back into the group's."""
        args: dict[str, Any] = {
            "x-queue-type": self._broker.queue_type,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": topo.queue,
        }
        if self._broker.queue_type == "quorum":
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
        return args

    async def _declare_on(self, what: str, steps: Any) -> None:
        """Run ``steps(channel)`` on a short-lived channel (a refused declaration closes its
        channel; the long-lived ones must not be the casualty)."""
        aiormq = _driver_aiormq()
        conn = await self._broker._connection("publish")
        channel: AbstractRobustChannel | None = None
        try:
            async with asyncio.timeout(self._broker.connect_timeout):
                channel = await conn.channel(publisher_confirms=False)
                await steps(channel)
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            raise self._broker._errors.declare_error(what, exc) from None
        finally:
            if channel is not None:
                with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, OSError):
                    await channel.close()

    async def declare(self, source: str, groups: Iterable[str] = ()) -> None:
        """:meth:`RabbitMQBroker.declare` (see there)."""
        aio_pika = _driver()
        _check_length(_check_name("destination", source))
        names_of_groups = list(groups)
        topos = [Topology.of(source, g) for g in names_of_groups]
        todo = [t for t in topos if t.queue not in self._queues]
        if source in self._exchanges and not todo:
            return

        async def steps(channel: AbstractRobustChannel) -> None:
            exchange = await channel.declare_exchange(
                source, aio_pika.ExchangeType.FANOUT, durable=True, robust=False
            )
            for t in todo:
                await channel.declare_queue(
                    t.dead_letter_queue,
                    durable=True,
                    arguments={"x-queue-type": self._broker.queue_type},
                    robust=False,
                )
                queue = await channel.declare_queue(
                    t.queue, durable=True, arguments=self.queue_args(t), robust=False
                )
                await queue.bind(exchange, routing_key="", robust=False)

        names = ", ".join([f"exchange {source!r}", *(f"queue {t.queue!r}" for t in todo)])
        await self._declare_on(names, steps)
        self._exchanges.add(source)
        self._declared.setdefault(source, set()).update(names_of_groups)
        self._queues.update(t.queue for t in todo)

    async def ensure_retry_queue(self, topo: Topology, band: int) -> str:
        """The retry queue of ``band`` for ``topo``, declared on first use."""
        name = topo.retry_queue(band)
        if name in self._queues:
            return name

        async def steps(channel: AbstractRobustChannel) -> None:
            await channel.declare_queue(
                name, durable=True, arguments=self._retry_args(topo), robust=False
            )

        await self._declare_on(f"retry queue {name!r}", steps)
        self._queues.add(name)
        return name

    async def delete(self, source: str, groups: Iterable[str]) -> None:
        """:meth:`RabbitMQBroker.delete` (see there)."""
        aiormq = _driver_aiormq()
        topos = [Topology.of(source, g) for g in groups]
        conn = await self._broker._connection("publish")
        names = [n for t in topos for n in (t.queue, t.dead_letter_queue, *t.retry_queues)]
        try:
            async with asyncio.timeout(self._broker.connect_timeout * 3):
                channel = await conn.channel(publisher_confirms=False)
                try:
                    for n in names:
                        await channel.queue_delete(n)
                        self._queues.discard(n)
                    await channel.exchange_delete(source)
                finally:
                    with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, OSError):
                        await channel.close()
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            raise self._broker._errors.declare_error(f"the topology of {source!r}", exc) from None
        self._exchanges.discard(source)
        self._declared.pop(source, None)

    async def queue_depths(self, source: str, group: str) -> dict[str, int]:
        """:meth:`RabbitMQBroker.queue_depths` (see there)."""
        topo = Topology.of(source, group)
        found = await self._passive(
            f"the queues of {topo.queue!r}",
            [topo.queue, topo.dead_letter_queue, *topo.retry_queues],
        )
        return {name: messages for name, (messages, _) in found.items()}

    async def _passive(self, what: str, names: Sequence[str]) -> dict[str, tuple[int, int]]:
        """``(ready messages, consumers)`` of each queue of ``names`` that exists (a passive
        declare each; a missing queue is left out)."""
        aiormq = _driver_aiormq()
        conn = await self._broker._connection("publish")
        out: dict[str, tuple[int, int]] = {}
        channel: AbstractRobustChannel | None = None
        try:
            async with asyncio.timeout(self._broker.connect_timeout * 3):
                for name in names:
                    if channel is None:
                        channel = await conn.channel(publisher_confirms=False)
                    try:
                        q = await channel.declare_queue(name, passive=True, robust=False)
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        # the 404 closed the channel; open another for the next name. Close
                        # ours too: a robust channel the server closed reopens itself, and
                        # each probe of a missing queue leaked one (channel_max after ~110 calls)
                        dead, channel = channel, None
                        with contextlib.suppress(
                            aiormq.exceptions.AMQPError, RuntimeError, OSError
                        ):
                            await dead.close()
                        continue
                    result = q.declaration_result
                    out[name] = (int(result.message_count or 0), int(result.consumer_count or 0))
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            raise self._broker._errors.declare_error(what, exc) from None
        finally:
            if channel is not None:
                with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, OSError):
                    await channel.close()
        return out

    async def group_state(self, source: str, group: str) -> GroupState:
        """:meth:`RabbitMQBroker.group_state` (see there)."""
        queue = Topology.of(source, group).queue
        found = (await self._passive(f"queue {queue!r}", [queue])).get(queue)
        if found is None:
            return GroupState(source, group, queue, messages=0, consumers=0, exists=False)
        return GroupState(source, group, queue, messages=found[0], consumers=found[1], exists=True)

    async def stray_groups(self, source: str, prefix: str) -> list[GroupState]:
        """:meth:`RabbitMQBroker.stray_groups` (see there)."""
        url = self._broker.config.management_api
        if not url:
            return []
        parts = urlsplit(self._broker.config.url)
        vhost = quote(unquote(parts.path[1:]) if len(parts.path) > 1 else "/", safe="")
        auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
        bindings_url = (
            f"{url.rstrip('/')}/api/exchanges/{vhost}/{quote(source, safe='')}/bindings/source"
        )
        try:
            # short: an unreachable API must not hold up a start (its thread outlives a cancel)
            bindings = await asyncio.to_thread(
                _management_get, bindings_url, auth, min(self._broker.connect_timeout, 2.0)
            )
            head = f"{_escape(source)}/{_escape(prefix)}"
            names = sorted({str(b["destination"]) for b in bindings
                            if b.get("destination_type") == "queue"
                            and str(b.get("destination", "")).startswith(head)})  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug(
                "RabbitMQ management API at %s: %s", url, self._broker._errors.scrub(str(exc))
            )
            return []
        found = await self._passive(f"the queues bound to {source!r}", names)
        return [
            GroupState(source, _unescape(name[len(_escape(source)) + 1 :]), name, n, c, True)
            for name, (n, c) in sorted(found.items())
        ]
