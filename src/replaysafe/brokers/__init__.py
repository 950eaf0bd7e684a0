"""Broker adapters. Each imports its driver lazily and names the extra to install.

``broker_from_url`` is the one place a URL becomes a broker (CLI, demo, chaos, benchmarks):

=================================== ==============================================================
``memory``                          the in-process reference broker
``amqp://user:pass@host:5672/vhost`` RabbitMQ (``amqps://`` for TLS); extra ``rabbitmq``
``sqs://[REGION]``                  Amazon SQS with the usual AWS credential chain; extra ``sqs``
``sqs+http://[KEY:SECRET@]host:port[/REGION]`` an SQS-compatible endpoint (moto, LocalStack)
``kafka://[USER:PASS@]host:port[,host:port]`` Kafka bootstrap servers (``kafka+ssl://`` TLS);
                                    extra ``kafka``
=================================== ==============================================================

Each adapter parses its own URLs (``RabbitMQBroker.from_url``, ``SQSBroker.from_url``,
``KafkaBroker.from_url``: query parameters there); this function only picks the adapter, so a URL
means the same whichever of the two you call. docs/urls.md has the whole grammar.
"""

from typing import Any

from replaysafe.brokers.base import (
    Broker,
    Capabilities,
    Delivery,
    Publisher,
    RedeliveryKind,
    SettleGranularity,
    Subscriber,
    Subscription,
)
from replaysafe.brokers.memory import MemoryBroker
from replaysafe.errors import ConfigurationError

BROKER_SCHEMES = (
    "memory, amqp://…, amqps://…, sqs://[region], sqs+http(s)://host:port[/region], kafka://…, "
    "kafka+ssl://…"
)


def broker_from_url(spec: str, **opts: Any) -> Broker:
    """The broker named by ``spec`` (see the module docstring); ``opts`` go to its constructor
    (``clock``, ``failpoints`` and adapter settings). Raises ``ConfigurationError`` for
    an unknown scheme and ``MissingExtra`` when the adapter's driver is not installed."""
    if spec == "memory":
        from replaysafe.brokers.memory import MemoryBroker

        return MemoryBroker(**opts)
    scheme = spec.partition("://")[0].lower() if "://" in spec else ""
    # each adapter owns its URL grammar (``from_url``): this only picks the adapter
    if scheme in ("amqp", "amqps"):
        from replaysafe.brokers.rabbitmq import RabbitMQBroker

        return RabbitMQBroker.from_url(spec, **opts)
    if scheme in ("sqs", "sqs+http", "sqs+https"):
        from replaysafe.brokers.sqs import SQSBroker

        return SQSBroker.from_url(spec, **opts)
    if scheme in ("kafka", "kafka+ssl"):
        from replaysafe.brokers.kafka import KafkaBroker

        return KafkaBroker.from_url(spec, **opts)
    shown = spec.split("@")[-1] if "@" in spec else spec  # never echo credentials
    raise ConfigurationError(f"unknown broker {shown!r}; use one of: {BROKER_SCHEMES}")


__all__ = [
    "BROKER_SCHEMES",
    "Broker",
    "Capabilities",
    "Delivery",
    "MemoryBroker",
    "Publisher",
    "RedeliveryKind",
    "SettleGranularity",
    "Subscriber",
    "Subscription",
    "broker_from_url",
]
