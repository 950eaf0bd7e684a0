"""The memory broker's settings: a destination's redelivery model (:class:`_Config`, chosen by
``MemoryBroker.declare``) and the name check every destination and group passes."""

from __future__ import annotations

from dataclasses import dataclass

from replaysafe.brokers.base import RedeliveryKind
from replaysafe.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class _Config:
    mode: RedeliveryKind
    visibility_timeout: float
    partitions: int


def _check_name(what: str, name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{what} name must be a non-empty string, got {name!r}")
