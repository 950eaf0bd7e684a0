"""The RabbitMQ adapter's configuration: every option of :class:`RabbitMQBroker`, validated once.

:meth:`RabbitMQConfig.from_url` is the one place an ``amqp://`` / ``amqps://`` URL becomes a
configuration; the broker only reads the result. The URL itself goes to aio-pika unchanged (its
query parameters, e.g. ``heartbeat``, are aio-pika's), so nothing is taken out of it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from replaysafe._redact import redact as redact_url
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.errors import ConfigurationError
from replaysafe.failpoints import Failpoints

__all__ = ["AMQP_PORT", "DEFAULT_URL", "QueueType", "RabbitMQConfig"]

#: the AMQP port a URL without one means
AMQP_PORT = 5672
#: the URL of a local RabbitMQ with its default user (what ``RabbitMQBroker()`` connects to)
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
#: the management plugin's default port (``management_url`` defaults to it on the AMQP host)
MANAGEMENT_PORT = 15672

QueueType = Literal["quorum", "classic"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RabbitMQConfig:
    """Everything :class:`RabbitMQBroker` is configured with (see there for what each option
    does). Frozen and validated in ``__post_init__``: an instance is always usable, and a bad
    value is a ``ConfigurationError`` saying what to change, before any connection is made.

    ``url`` is an ``amqp://`` or ``amqps://`` URL (its password never appears in ``repr``);
    ``queue_type`` quorum (default) or classic; ``confirm_timeout``, ``connect_timeout`` and
    ``reconnect_interval`` are seconds (> 0); ``delivery_limit`` the quorum ``x-delivery-limit``
    (None: the server's default); ``management_url`` the management HTTP API (None: port 15672 on
    the AMQP host, ``""``: none); ``failpoints`` None means the process-wide registry.
    """

    url: str = DEFAULT_URL
    clock: Clock = SYSTEM_CLOCK
    failpoints: Failpoints | None = None
    queue_type: QueueType = "quorum"
    confirm_timeout: float = 10.0
    connect_timeout: float = 10.0
    reconnect_interval: float = 1.0
    delivery_limit: int | None = None
    management_url: str | None = None

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme if isinstance(self.url, str) else ""
        if scheme not in ("amqp", "amqps"):
            raise ConfigurationError(
                f"RabbitMQBroker needs an amqp:// or amqps:// URL, got "
                f"{redact_url(str(self.url))!r}; use amqp://user:password@host:5672/vhost "
                "(amqps:// for TLS)"
            )
        if self.queue_type not in ("quorum", "classic"):
            raise ConfigurationError(
                f"queue_type must be 'quorum' or 'classic', got {self.queue_type!r}; use "
                "'quorum' (the default) unless a server or policy needs classic queues"
            )
        for name in ("confirm_timeout", "connect_timeout", "reconnect_interval"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigurationError(
                    f"{name} must be > 0 seconds, got {value!r}; pass a positive number of seconds"
                )
        limit = self.delivery_limit
        if limit is not None and (self.queue_type != "quorum" or limit < 1):
            raise ConfigurationError(
                "delivery_limit needs queue_type='quorum' and a value >= 1 "
                f"(got {limit!r} with {self.queue_type!r}); classic queues have no limit, so "
                "leave it None for them"
            )

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> RabbitMQConfig:
        """The configuration for ``url`` (``amqp://user:password@host:port/vhost``, ``amqps://``
        for TLS), with ``overrides`` for the other options (``queue_type=``, ``clock=`` …). The
        URL is kept whole: its query parameters are aio-pika's connection settings. Raises
        ``ConfigurationError`` as the constructor does."""
        return cls(url=url, **overrides)

    @property
    def scheme(self) -> str:
        """``amqp`` or ``amqps``."""
        return urlsplit(self.url).scheme

    @property
    def password(self) -> str:
        """The URL's password, as written (``""`` for none): what error texts must not show."""
        return urlsplit(self.url).password or ""

    @property
    def redacted_url(self) -> str:
        """The URL with its password replaced by ``***``: for repr, logs and errors."""
        return redact_url(self.url)

    @property
    def management_api(self) -> str:
        """The management HTTP API ``stray_groups`` lists queues through: ``management_url``, or
        by default port 15672 on the AMQP host (https for ``amqps``); ``""`` when disabled."""
        if self.management_url is not None:
            return self.management_url
        host = urlsplit(self.url).hostname or "127.0.0.1"
        web = "https" if self.scheme == "amqps" else "http"
        return f"{web}://{'[' + host + ']' if ':' in host else host}:{MANAGEMENT_PORT}"

    def __repr__(self) -> str:
        management = redact_url(self.management_url) if self.management_url else self.management_url
        return (
            f"RabbitMQConfig(url={self.redacted_url!r}, queue_type={self.queue_type!r}, "
            f"confirm_timeout={self.confirm_timeout!r}, connect_timeout={self.connect_timeout!r}, "
            f"reconnect_interval={self.reconnect_interval!r}, "
            f"delivery_limit={self.delivery_limit!r}, management_url={management!r})"
        )
