"""The drivers, imported on first use: ``MissingExtra`` names the extra when they are absent."""

from __future__ import annotations

from types import ModuleType

from replaysafe.brokers import _amqp_decode
from replaysafe.errors import MissingExtra


def _driver() -> ModuleType:
    """aio-pika, with the tolerant AMQP property decoder installed."""
    try:
        import aio_pika
    except ImportError as exc:
        raise MissingExtra("rabbitmq", "aio-pika") from exc
    # a property the client cannot decode must not kill the consuming connection (it would
    # wedge the queue): decoded tolerantly, the delivery is marked and quarantined
    _amqp_decode.install()
    return aio_pika


def _driver_aiormq() -> ModuleType:
    """aiormq, the AMQP client underneath aio-pika (its exceptions and frames)."""
    try:
        import aiormq
    except ImportError as exc:
        raise MissingExtra("rabbitmq", "aio-pika") from exc
    return aiormq
