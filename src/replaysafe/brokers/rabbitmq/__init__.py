"""The RabbitMQ adapter (aio-pika), as a package: ``broker`` holds it for now."""

from replaysafe.brokers.rabbitmq.broker import (
    AMQP_PORT,
    ATTEMPTS_HEADER,
    KEY_HEADER,
    MAX_DELAY,
    RETRY_BANDS,
    QueueType,
    RabbitMQBroker,
    RabbitMQDelivery,
    Topology,
    redact_url,
    retry_band,
)

__all__ = [
    "AMQP_PORT",
    "ATTEMPTS_HEADER",
    "KEY_HEADER",
    "MAX_DELAY",
    "RETRY_BANDS",
    "QueueType",
    "RabbitMQBroker",
    "RabbitMQDelivery",
    "Topology",
    "redact_url",
    "retry_band",
]
