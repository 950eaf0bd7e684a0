"""An app's broker topology: what each handler consumes, and what the broker declares for it.

A worker declares what its handlers consume when it subscribes. A producer that runs first, and
above all a *plain* producer (another language, no replaysafe), needs that topology to exist
before it publishes: on RabbitMQ a publish to an exchange with no queue bound is returned as
unroutable (``NO_ROUTE``) and nothing is stored; a Kafka topic and an SQS queue must exist.
:func:`declare_topology` creates it as ``subscribe`` would (``Broker.prepare_source``, for every
handler's group at once); :func:`show_topology` names it per handler
(``Broker.declared_names``). ``replaysafe topology declare|show MODULE:APP`` runs them.

A handler's group is ``f"{app.name}.{handler name}"`` unless it was registered with ``group=``;
the handler name is the function's name unless ``name=`` is given, so renaming the function
changes the group (a new RabbitMQ queue, a new Kafka consumer group starting from the earliest
offset) unless ``name=`` or ``group=`` pins it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from replaysafe.app import App

__all__ = ["HandlerTopology", "declare_topology", "show_topology"]


@dataclass(frozen=True, slots=True)
class HandlerTopology:
    """One handler's place on the broker."""

    handler: str
    source: str
    group: str
    #: what the broker declares for (source, group), label -> name; the first entry is where a
    #: producer publishes (RabbitMQ: the exchange; SQS: the queue; Kafka: the topic)
    names: Mapping[str, str]

    @property
    def publish_to(self) -> tuple[str, str]:
        """(label, name) of where a producer publishes."""
        return next(iter(self.names.items()))

    def as_json(self) -> dict[str, Any]:
        return {
            "handler": self.handler,
            "source": self.source,
            "group": self.group,
            "names": dict(self.names),
        }


async def declare_topology(
    app: App, *, visibility_timeout: float | None = None, partitions: int | None = None
) -> list[HandlerTopology]:
    """Create, for every source of ``app``, what its handlers' groups consume (idempotent): the
    RabbitMQ exchange and a queue (with its dead-letter queue) per group, the SQS queue, the
    Kafka topic. A message published afterwards is kept for every group, whether or not a worker
    ever ran. ``visibility_timeout`` (SQS) and ``partitions`` (Kafka) apply to what is created;
    left out, an existing queue or topic is kept as it is. Returns :func:`show_topology`."""
    groups: dict[str, list[str]] = {}
    for spec in app.handlers.values():
        groups.setdefault(spec.source, []).append(spec.group)
    for source, names in groups.items():
        await app.broker.prepare_source(
            source, names, visibility_timeout=visibility_timeout, partitions=partitions
        )
    return await show_topology(app)


async def show_topology(app: App) -> list[HandlerTopology]:
    """Per handler: its source, its group and the names the broker declares for them (nothing is
    created; an SQS queue URL is read from SQS)."""
    return [
        HandlerTopology(
            spec.name, spec.source, spec.group,
            await app.broker.declared_names(spec.source, spec.group),
        )
        for spec in app.handlers.values()
    ]  # fmt: skip
