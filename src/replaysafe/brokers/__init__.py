"""Broker adapters. Each imports its driver lazily and names the extra to install.

``broker_from_url`` is the one place a URL becomes a broker (CLI, demo, chaos, benchmarks):

=================================== ==============================================================
``memory``                          the in-process reference broker
``amqp://user:pass@host:5672/vhost`` RabbitMQ (``amqps://`` for TLS); extra ``rabbitmq``
``sqs://[REGION]``                  Amazon SQS with the usual AWS credential chain; extra ``sqs``
``sqs+http://[KEY:SECRET@]host:port[/REGION]`` an SQS-compatible endpoint (moto, LocalStack)
``kafka://host:port[,host:port]``   Kafka bootstrap servers; extra ``kafka``
=================================== ==============================================================
"""

from typing import Any
from urllib.parse import urlsplit

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

BROKER_SCHEMES = "memory, amqp://…, amqps://…, sqs://[region], sqs+http(s)://host:port, kafka://…"


def broker_from_url(spec: str, **opts: Any) -> Broker:
    """The broker named by ``spec`` (see the module docstring); ``opts`` go to its constructor
    (``clock``, ``failpoints`` and adapter settings). Raises ``ConfigurationError`` for
    an unknown scheme and ``MissingExtra`` when the adapter's driver is not installed."""
    if spec == "memory":
        from replaysafe.brokers.memory import MemoryBroker

        return MemoryBroker(**opts)
    scheme = spec.partition("://")[0].lower() if "://" in spec else ""
    if scheme in ("amqp", "amqps"):
        from replaysafe.brokers.rabbitmq import RabbitMQBroker

        return RabbitMQBroker(spec, **opts)
    if scheme in ("sqs", "sqs+http", "sqs+https"):
        from replaysafe.brokers.sqs import SQSBroker

        parts = urlsplit(spec)
        if scheme == "sqs":
            return SQSBroker(region=parts.netloc or None, **opts)
        # user info carries the access key and secret (moto/LocalStack accept any pair)
        host = parts.netloc.rpartition("@")[2]
        endpoint = f"{scheme.removeprefix('sqs+')}://{host}"
        region = parts.path.strip("/") or "us-east-1"
        if parts.username is not None:
            opts.setdefault("aws_access_key_id", parts.username)
            opts.setdefault("aws_secret_access_key", parts.password or "")
        return SQSBroker(endpoint_url=endpoint, region=region, **opts)
    if scheme == "kafka":
        from replaysafe.brokers.kafka import KafkaBroker

        servers = spec.partition("://")[2].strip("/")
        if not servers:
            raise ConfigurationError("kafka:// needs bootstrap servers: kafka://host:9092")
        return KafkaBroker(servers, **opts)
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
