"""The Kafka adapter (confluent-kafka): a package from now on; the next commit splits it by
concern. Everything still lives in :mod:`replaysafe.brokers.kafka.consumer`."""

from replaysafe.brokers.kafka.consumer import KAFKA_CAPABILITIES, KafkaBroker, OffsetTracker

__all__ = ["KAFKA_CAPABILITIES", "KafkaBroker", "OffsetTracker"]
