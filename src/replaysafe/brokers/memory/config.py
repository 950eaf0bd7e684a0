"""The memory broker's settings: the broker's own (:class:`MemoryConfig`, validated once, the one
parser of the ``memory`` URL), a destination's redelivery model (:class:`_Config`, chosen by
``MemoryBroker.declare``) and the name check every destination and group passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from replaysafe._redact import redact
from replaysafe.brokers.base import RedeliveryKind
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.errors import ConfigurationError
from replaysafe.failpoints import Failpoints

#: the memory broker's whole URL: it has no server, so no host, path or query
URL = "memory"


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryConfig:
    """What a :class:`~replaysafe.brokers.memory.MemoryBroker` is built from, checked once here.

    ``clock`` drives every timer (delayed nack, visibility expiry, broker timestamps).
    ``failpoints`` is hit around each publish; None means the process-wide ``FAILPOINTS``.
    ``default_mode`` is the redelivery model of a destination nobody declared (a
    :class:`~replaysafe.brokers.base.RedeliveryKind` or its value, e.g. ``"offset_rewind"``).
    """

    clock: Clock = SYSTEM_CLOCK
    failpoints: Failpoints | None = None
    default_mode: RedeliveryKind = RedeliveryKind.NACK

    def __post_init__(self) -> None:
        now, sleep = getattr(self.clock, "now", None), getattr(self.clock, "sleep", None)
        if not (callable(now) and callable(sleep)):
            raise ConfigurationError(
                f"MemoryBroker: clock={self.clock!r} is not a Clock (it needs now() and async "
                "sleep()); pass replaysafe.clock.SYSTEM_CLOCK, a replaysafe.testing.FakeClock, "
                "or leave clock out"
            )
        if self.failpoints is not None and not isinstance(self.failpoints, Failpoints):
            raise ConfigurationError(
                f"MemoryBroker: failpoints={self.failpoints!r} is not a "
                "replaysafe.failpoints.Failpoints registry; pass Failpoints() or leave it out "
                "(the process-wide FAILPOINTS)"
            )
        try:
            mode = RedeliveryKind(self.default_mode)
        except ValueError:
            raise ConfigurationError(
                f"MemoryBroker: default_mode={self.default_mode!r} is not a redelivery model; use "
                f"one of {', '.join(repr(k.value) for k in RedeliveryKind)} (RedeliveryKind)"
            ) from None
        # frozen: the one normalisation (a value such as "nack" becomes the enum) goes around it
        object.__setattr__(self, "default_mode", mode)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> MemoryConfig:
        """The config the URL ``memory`` names (the one memory broker URL grammar:
        ``MemoryBroker.from_url`` comes here). The URL carries no settings, so every setting is
        a keyword override (``clock``, ``failpoints``, ``default_mode``); an unknown keyword
        raises ``TypeError`` as the constructor does."""
        if url != URL:
            raise ConfigurationError(
                f"{redact(url)!r} is not a memory broker URL; the in-process broker's URL is "
                f"exactly {URL!r} (no host, path or query): pass its settings as keywords"
            )
        return cls(**overrides)


@dataclass(frozen=True, slots=True)
class _Config:
    """A destination's redelivery model and its settings (a redeclare must give equal ones)."""

    mode: RedeliveryKind
    visibility_timeout: float
    partitions: int


def _check_name(what: str, name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{what} name must be a non-empty string, got {name!r}")
