"""Broker adapters. Each imports its driver lazily and names the extra to install."""

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

__all__ = [
    "Broker",
    "Capabilities",
    "Delivery",
    "MemoryBroker",
    "Publisher",
    "RedeliveryKind",
    "SettleGranularity",
    "Subscriber",
    "Subscription",
]
