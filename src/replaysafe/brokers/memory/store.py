"""What the memory broker stores: each destination's history of accepted publishes in wire form
(one log in publish order plus one log per partition), and what its groups dead-lettered. Nothing
here decides delivery; the groups (:mod:`.group`) do."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from replaysafe.brokers.memory.config import _Config

if TYPE_CHECKING:
    from replaysafe.brokers.memory.group import _Group


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One accepted publish, in wire form. ``seq`` orders the destination's whole history;
    ``offset`` is the position in ``partition``'s log."""

    seq: int
    #: the ``rs-operation-id`` header; None for a plain client's message without one
    operation_id: str | None
    body: bytes
    headers: Mapping[str, str]
    content_type: str | None
    key: str | None
    timestamp: float
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message a group rejected: it is never redelivered to that group."""

    operation_id: str | None
    reason: str
    #: how many times the group had received the message when it was rejected
    attempt: int
    dead_at: float
    message: StoredMessage


def partition_for(key: str | None, partitions: int) -> int:
    """The partition of ``key``: stable across processes and runs (crc32, never ``hash()``,
    which is salted per process)."""
    if key is None:
        return 0
    return zlib.crc32(key.encode("utf-8")) % partitions


class _Destination:
    """One destination: its history (in publish order and per partition) and its groups."""

    def __init__(self, name: str, config: _Config) -> None:
        self.name = name
        self.config = config
        self.log: list[StoredMessage] = []
        self.partition_logs: list[list[StoredMessage]] = [[] for _ in range(config.partitions)]
        self.groups: dict[str, _Group] = {}
