"""Broker adapters. Each imports its driver lazily and names the extra to install.

``open_broker`` is the one place a URL becomes a broker (CLI, demo, chaos, benchmarks):

=================================== ==============================================================
``memory``                          the in-process reference broker
``amqp://user:pass@host:5672/vhost`` RabbitMQ (``amqps://`` for TLS); extra ``rabbitmq``
``sqs://[REGION]``                  Amazon SQS with the usual AWS credential chain; extra ``sqs``
``sqs+http://[KEY:SECRET@]host:port[/REGION]`` an SQS-compatible endpoint (moto, LocalStack)
``kafka://[USER:PASS@]host:port[,host:port]`` Kafka bootstrap servers (``kafka+ssl://`` TLS);
                                    extra ``kafka``
``nats://[USER:PASS@]host:port[,host:port]`` NATS JetStream (``nats+tls://`` TLS);
                                    extra ``nats``
=================================== ==============================================================

Each adapter parses its own URLs (``RabbitMQBroker.from_url``, ``SQSBroker.from_url``,
``KafkaBroker.from_url``, ``NATSBroker.from_url``: query parameters there); :func:`open_broker`
(``replaysafe._registry``, also named ``broker_from_url``) only picks the adapter, so a URL means
the same whichever of the two you call. docs/urls.md has the whole grammar.
"""

from replaysafe._registry import open_broker, schemes
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

#: the broker URL shapes, for help texts
BROKER_SCHEMES = schemes("broker")
#: the name this function had before the registry; the same function
broker_from_url = open_broker


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
    "open_broker",
]
