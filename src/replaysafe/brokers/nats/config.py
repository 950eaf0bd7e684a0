"""The NATS broker's settings: :class:`NATSConfig`, frozen and checked once, and the one parser of
``nats://`` and ``nats+tls://`` URLs (``NATSConfig.from_url``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

from replaysafe._redact import redact
from replaysafe._url import take_options
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.errors import ConfigurationError
from replaysafe.failpoints import Failpoints

DEFAULT_PORT: Final = 4222
SCHEMES: Final = ("nats", "nats+tls")
STORAGE: Final = ("file", "memory")
#: JetStream allows at most 5 replicas of a stream
MAX_REPLICAS: Final = 5

#: query parameters of a NATS URL and their converters (everything else is refused)
_URL_OPTIONS: Final = {
    "ack_wait": float,
    "max_deliver": int,
    "stream_prefix": str,
    "dead_letter_suffix": str,
    "replicas": int,
    "storage": str,
    "duplicate_window": float,
    "max_age": float,
    "fetch_wait": float,
    "publish_timeout": float,
    "connect_timeout": float,
    "name": str,
}


def _positive(what: str, value: object, hint: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"NATSConfig: {what} must be a number of seconds > 0 {hint}")


def _token(what: str, value: object) -> None:
    bad = " \t\r\n*>"
    if not isinstance(value, str) or any(c in bad for c in value):
        raise ConfigurationError(
            f"NATSConfig: {what}={value!r} must be a string without spaces, '*' or '>' "
            "(it becomes part of a NATS subject or stream name)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NATSConfig:
    """What a :class:`~replaysafe.brokers.nats.NATSBroker` is built from, checked once here.

    - ``servers``: ``nats://host:port`` (or ``tls://host:port``) URLs the client tries in turn;
      ``user``/``password`` authenticate (the password never appears in a repr or an error).
    - ``ack_wait``: seconds a delivered message stays invisible to the group (JetStream's
      ``AckWait``, the visibility timeout) for the durable consumers this adapter creates.
    - ``max_deliver``: deliveries a handler may see; a ``nack`` of the last one dead-letters
      the message. The server's ``MaxDeliver`` is one more: that spare delivery (after a crash on
      the last attempt) is never handed to a handler, the adapter dead-letters it.
    - ``stream_prefix``: streams this adapter creates are named ``<prefix><source>`` (characters
      a stream name cannot hold become ``_``). A subject some existing stream already captures is
      used with that stream.
    - ``dead_letter_suffix``: a source's dead-letter subject is ``<source><suffix>``, captured by
      its own stream.
    - ``replicas`` (1-5), ``storage`` (``file`` or ``memory``), ``duplicate_window`` (seconds the
      stream drops a repeated ``Nats-Msg-Id``), ``max_age`` (seconds a message is kept; None:
      until the stream's other limits) apply to streams this adapter creates.
    - ``fetch_wait``: seconds one pull request waits at the server. It also bounds how long a
      closed consumer's last pull request can still take messages, which then wait out
      ``ack_wait``: keep it well below ``ack_wait``.
    - ``publish_timeout``: seconds a publish waits for the stream's PubAck (then
      ``PublishAmbiguous``); also the timeout of admin requests and of ``ack_confirmed``.
    - ``connect_timeout``; ``name`` (the client connection name the server shows).
    - ``clock`` (timers and deadlines), ``failpoints`` (None: the process-wide registry).
    """

    servers: tuple[str, ...] = (f"nats://127.0.0.1:{DEFAULT_PORT}",)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    ack_wait: float = 30.0
    max_deliver: int = 10
    stream_prefix: str = "rs-"
    dead_letter_suffix: str = ".dlq"
    replicas: int = 1
    storage: str = "file"
    duplicate_window: float = 120.0
    max_age: float | None = None
    fetch_wait: float = 1.0
    publish_timeout: float = 5.0
    connect_timeout: float = 2.0
    name: str | None = None
    clock: Clock = SYSTEM_CLOCK
    failpoints: Failpoints | None = None

    def __post_init__(self) -> None:
        servers = (self.servers,) if isinstance(self.servers, str) else tuple(self.servers)
        if not servers or not all(
            isinstance(s, str) and urlsplit(s).scheme in ("nats", "tls") and urlsplit(s).hostname
            for s in servers
        ):
            raise ConfigurationError(
                f"NATSConfig: servers={self.servers!r} must be one or more nats://host:port or "
                "tls://host:port URLs (use NATSConfig.from_url for credentials)"
            )
        if any(urlsplit(s).password for s in servers):
            raise ConfigurationError(
                "NATSConfig: a server URL carries a password; pass user= and password= (or use "
                "NATSConfig.from_url, which takes them out of the URL)"
            )
        object.__setattr__(self, "servers", servers)
        _positive("ack_wait", self.ack_wait, "(JetStream AckWait: how long a delivery is hidden)")
        _positive("duplicate_window", self.duplicate_window, "(JetStream's Nats-Msg-Id window)")
        _positive("fetch_wait", self.fetch_wait, "(one pull request's wait at the server)")
        _positive("publish_timeout", self.publish_timeout, "(the wait for a PubAck)")
        _positive("connect_timeout", self.connect_timeout, "(the wait for the server)")
        if self.max_age is not None:
            _positive("max_age", self.max_age, "or None (keep until the stream's other limits)")
        if self.fetch_wait >= self.ack_wait:
            raise ConfigurationError(
                f"NATSConfig: fetch_wait={self.fetch_wait} must be shorter than "
                f"ack_wait={self.ack_wait}: a closed consumer's last pull request may take a "
                "message that then waits out ack_wait; lower fetch_wait"
            )
        if isinstance(self.max_deliver, bool) or not isinstance(self.max_deliver, int):
            raise ConfigurationError(
                f"NATSConfig: max_deliver={self.max_deliver!r} must be a whole number >= 1"
            )
        if self.max_deliver < 1:
            raise ConfigurationError(
                f"NATSConfig: max_deliver={self.max_deliver} must be >= 1 (deliveries a handler "
                "may see before the message goes to the dead-letter subject)"
            )
        if isinstance(self.replicas, bool) or self.replicas not in range(1, MAX_REPLICAS + 1):
            raise ConfigurationError(
                f"NATSConfig: replicas={self.replicas!r} must be 1 to {MAX_REPLICAS} (JetStream "
                "stream replicas; more than the cluster's servers is refused by the server)"
            )
        if self.storage not in STORAGE:
            raise ConfigurationError(
                f"NATSConfig: storage={self.storage!r} must be 'file' or 'memory'"
            )
        _token("stream_prefix", self.stream_prefix)
        _token("dead_letter_suffix", self.dead_letter_suffix)
        if not self.dead_letter_suffix:
            raise ConfigurationError(
                "NATSConfig: dead_letter_suffix must not be empty (the dead-letter subject would "
                "be the source itself); use e.g. '.dlq'"
            )
        if self.password is not None and self.user is None:
            raise ConfigurationError("NATSConfig: a password needs a user; pass user= too")
        now, sleep = getattr(self.clock, "now", None), getattr(self.clock, "sleep", None)
        if not (callable(now) and callable(sleep)):
            raise ConfigurationError(
                f"NATSConfig: clock={self.clock!r} is not a Clock (it needs now() and async "
                "sleep()); pass replaysafe.clock.SYSTEM_CLOCK or leave clock out"
            )
        if self.failpoints is not None and not isinstance(self.failpoints, Failpoints):
            raise ConfigurationError(
                f"NATSConfig: failpoints={self.failpoints!r} is not a Failpoints registry; pass "
                "Failpoints() or leave it out (the process-wide FAILPOINTS)"
            )

    @property
    def tls(self) -> bool:
        return any(s.startswith("tls://") for s in self.servers)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> NATSConfig:
        """The config a URL names (the one NATS URL grammar: ``NATSBroker.from_url`` and
        ``broker_from_url`` come here); keyword ``overrides`` win over the URL's query.

        ``nats://[USER:PASS@]host[:port][,host[:port]...][?option=value&...]``, ``nats+tls://``
        for TLS. The port defaults to 4222. Query options: see ``_URL_OPTIONS`` (``ack_wait``,
        ``max_deliver``, ``stream_prefix``, ``dead_letter_suffix``, ``replicas``, ``storage``,
        ``duplicate_window``, ``max_age``, ``fetch_wait``, ``publish_timeout``,
        ``connect_timeout``, ``name``); anything else is refused."""
        shown = redact(url)
        scheme, sep, _ = url.partition("://")
        if not sep or scheme.lower() not in SCHEMES:
            raise ConfigurationError(
                f"NATS URL {shown} must start with nats:// or nats+tls://, e.g. "
                "nats://127.0.0.1:4222"
            )
        stripped, options = take_options(url, _URL_OPTIONS, what="NATS")
        parts = urlsplit(stripped.replace(f"{scheme}://", "nats://", 1))
        unknown = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
        if unknown:
            raise ConfigurationError(
                f"NATS URL {shown}: unknown parameter {unknown[0]!r}; known: "
                f"{', '.join(sorted(_URL_OPTIONS))}"
            )
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigurationError(
                f"NATS URL {shown} has a path; a NATS URL names servers only "
                "(nats://host:port[,host:port]); streams come from the source names"
            )
        userinfo, at, hosts = parts.netloc.rpartition("@")
        if not hosts:
            raise ConfigurationError(f"NATS URL {shown} names no server; e.g. nats://host:4222")
        wire = "tls" if scheme.lower() == "nats+tls" else "nats"
        servers = []
        for host in hosts.split(","):
            name, colon, port = host.rpartition(":") if "]" not in host[-1:] else ("", "", "")
            if not colon:
                name, port = host, str(DEFAULT_PORT)
            if not name or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigurationError(
                    f"NATS URL {shown}: {host!r} is not host:port; separate servers with ','"
                )
            servers.append(f"{wire}://{name}:{int(port)}")
        settings: dict[str, Any] = {"servers": tuple(servers)}
        if at:
            user, _, password = userinfo.partition(":")
            settings["user"] = unquote(user)
            if password:
                settings["password"] = unquote(password)
        settings.update(options)
        settings.update(overrides)
        return cls(**settings)
