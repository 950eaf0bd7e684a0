"""RabbitMQ names: the exchange, queues and retry bands behind one (destination, group).

Names are composed from escaped parts (``%`` -> ``%25``, ``/`` -> ``%2F``), so ``("a/b", "c")``
and ``("a", "b/c")`` never share a queue; each is checked against AMQP's 255-byte short string.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from replaysafe.errors import ConfigurationError

__all__ = ["MAX_DELAY", "RETRY_BANDS", "Topology", "retry_band"]

#: the longest delayed nack (longer ones are clamped, with a warning)
MAX_DELAY = 86_400.0
#: retry bands: 1 s, 2 s, 4 s … up to the first power of two >= MAX_DELAY
RETRY_BANDS: tuple[int, ...] = tuple(2**k for k in range(math.ceil(math.log2(MAX_DELAY)) + 1))
_MAX_NAME_BYTES = 255


def _escape(part: str) -> str:
    # '/' separates the parts of a queue name and '%' escapes: both are escaped inside a part
    return part.replace("%", "%25").replace("/", "%2F")


def _unescape(part: str) -> str:
    return re.sub("%(25|2F)", lambda m: "%" if m.group(1) == "25" else "/", part)


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{what} name must be a non-empty string, got {name!r}")
    if name.startswith("amq."):
        raise ConfigurationError(
            f"{what} name {name!r} starts with 'amq.', which RabbitMQ reserves for itself; "
            "choose another name"
        )
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ConfigurationError(f"{what} name {name!r} contains control characters")
    return name


def _check_length(name: str) -> str:
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        raise ConfigurationError(
            f"RabbitMQ name {name[:60]!r}… is longer than {_MAX_NAME_BYTES} bytes (AMQP short "
            "string); use shorter destination and group names"
        )
    return name


@dataclass(frozen=True, slots=True)
class Topology:
    """The RabbitMQ names behind one (destination, group): for operators and tests."""

    exchange: str
    queue: str
    dead_letter_queue: str

    @classmethod
    def of(cls, source: str, group: str) -> Topology:
        _check_name("destination", source)
        _check_name("group", group)
        queue = f"{_escape(source)}/{_escape(group)}"
        topo = cls(_check_length(source), _check_length(queue), _check_length(f"{queue}/dead"))
        _check_length(topo.retry_queue(RETRY_BANDS[-1]))
        return topo

    def retry_queue(self, band: int) -> str:
        """The retry queue holding delays in ``(band/2, band]`` seconds (``(0, 1]`` for band 1)."""
        return f"{self.queue}/retry/{band}s"

    @property
    def retry_queues(self) -> tuple[str, ...]:
        return tuple(self.retry_queue(b) for b in RETRY_BANDS)


def retry_band(delay: float) -> int:
    """The retry band of ``delay`` seconds: the smallest power of two >= delay (at least 1)."""
    if delay <= 1.0:
        return 1
    return min(b for b in RETRY_BANDS if b >= min(delay, MAX_DELAY))
