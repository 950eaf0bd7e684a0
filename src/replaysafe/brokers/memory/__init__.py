"""The memory broker (see :mod:`replaysafe.brokers.memory.broker`)."""

from replaysafe.brokers.memory.broker import DeadLetter, MemoryBroker, StoredMessage, partition_for

__all__ = ["DeadLetter", "MemoryBroker", "StoredMessage", "partition_for"]
