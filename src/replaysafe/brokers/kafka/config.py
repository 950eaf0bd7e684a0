"""A Kafka broker's configuration: the one URL parser, and every option validated once."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from replaysafe._redact import redact as _redact_url
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.errors import ConfigurationError
from replaysafe.failpoints import Failpoints

__all__ = ["KafkaConfig"]

#: consumer config that would break the commit rules; refused when passed in
_LOCKED_CONSUMER_KEYS = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
}
_SCHEMES = {"kafka": "PLAINTEXT", "kafka+ssl": "SSL"}


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{what} name must be a non-empty string, got {name!r}")
    return name


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaConfig:
    """Everything a :class:`~replaysafe.brokers.kafka.KafkaBroker` is built from, validated
    once, when it is created (``ConfigurationError`` says which option is wrong and how to fix
    it). Immutable: assigning a field raises, and the librdkafka mappings are read-only copies.

    ``bootstrap_servers`` is librdkafka's ``host:port[,host:port]``. ``config`` is extra
    librdkafka configuration for every client (security settings, ``client.id``);
    ``consumer_config`` / ``producer_config`` for one kind only. Refused: auto-commit and
    auto offset store (the adapter commits itself).

    Timers: ``session_timeout`` (group membership; Tansu also waits about half of it per join),
    ``heartbeat_interval`` (default a tenth of it), ``poll_interval`` (longest a consumer call
    blocks: bounds commit, close and nack-resume latency), ``drain_timeout`` (how long a revoke
    waits for in-flight records), ``join_timeout`` (how long ``subscribe`` waits for the first
    assignment), ``publish_timeout`` (delivery timeout of a produce; past it the outcome is
    ambiguous), ``request_timeout`` (metadata and admin calls), ``commit_interval`` (minimum
    spacing of commits; 0 commits as soon as the previous commit returned).

    ``idempotence`` turns on the idempotent producer (no broker-side duplicates from librdkafka's
    own retries; checked against Tansu 0.6). ``auto_offset_reset`` is where a group without a
    committed offset starts ("earliest": every record is processed).

    ``display`` is how the broker names itself in ``repr``, logs and errors (default: the
    bootstrap servers; :meth:`from_url` sets the URL with its password redacted). It is not
    compared, and the librdkafka mappings (which may hold credentials) are not in ``repr``.
    """

    bootstrap_servers: str
    clock: Clock = SYSTEM_CLOCK
    failpoints: Failpoints | None = None
    config: Mapping[str, Any] | None = field(default=None, repr=False)
    consumer_config: Mapping[str, Any] | None = field(default=None, repr=False)
    producer_config: Mapping[str, Any] | None = field(default=None, repr=False)
    session_timeout: float = 10.0
    heartbeat_interval: float | None = None
    poll_interval: float = 0.1
    drain_timeout: float = 10.0
    join_timeout: float = 60.0
    publish_timeout: float = 30.0
    request_timeout: float = 10.0
    commit_interval: float = 0.0
    idempotence: bool = True
    auto_offset_reset: str = "earliest"
    display: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.bootstrap_servers, str) or not self.bootstrap_servers:
            raise ConfigurationError(
                f"KafkaBroker: bootstrap_servers must be a non-empty string, got "
                f"{self.bootstrap_servers!r}; pass the brokers as host:port[,host:port]"
            )
        for name, value in (
            ("session_timeout", self.session_timeout),
            ("poll_interval", self.poll_interval),
            ("publish_timeout", self.publish_timeout),
            ("request_timeout", self.request_timeout),
        ):
            if value <= 0:
                raise ConfigurationError(
                    f"KafkaBroker: {name} must be > 0 seconds, got {value}; pass a positive "
                    "number of seconds"
                )
        for name, value in (
            ("drain_timeout", self.drain_timeout),
            ("join_timeout", self.join_timeout),
            ("commit_interval", self.commit_interval),
        ):
            if value < 0:
                raise ConfigurationError(
                    f"KafkaBroker: {name} must be >= 0 seconds, got {value}; pass 0 or a "
                    "positive number of seconds"
                )
        heartbeat = self.heartbeat
        if not 0 < heartbeat < self.session_timeout:
            raise ConfigurationError(
                f"KafkaBroker: heartbeat_interval must be > 0 and shorter than session_timeout "
                f"({self.session_timeout}s), got {heartbeat}; lower it (or leave it out: a tenth "
                "of session_timeout)"
            )
        if self.auto_offset_reset not in ("earliest", "latest", "error"):
            raise ConfigurationError(
                f"KafkaBroker: auto_offset_reset must be 'earliest', 'latest' or 'error', got "
                f"{self.auto_offset_reset!r}; pass one of those"
            )
        cons = self.consumer_config or {}
        for key, required in _LOCKED_CONSUMER_KEYS.items():
            if key in cons and str(cons[key]).lower() != str(required).lower():
                raise ConfigurationError(
                    f"KafkaBroker: consumer_config {key}={cons[key]!r} is refused: the adapter "
                    "commits only contiguous completed offsets itself; remove the setting"
                )
        # read-only copies: a caller's later change to its dict cannot reach a built broker
        for name in ("config", "consumer_config", "producer_config"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, MappingProxyType(dict(value)))

    @property
    def heartbeat(self) -> float:
        """The heartbeat interval in effect: ``heartbeat_interval``, or a tenth of
        ``session_timeout``."""
        if self.heartbeat_interval is None:
            return self.session_timeout / 10
        return self.heartbeat_interval

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> KafkaConfig:
        """``kafka://[user:password@]host:port[,host:port][?librdkafka.key=value&...]``.

        ``kafka+ssl://`` selects TLS. Credentials select SASL (mechanism PLAIN unless the query
        sets ``sasl.mechanism``). Query parameters become librdkafka configuration for every
        client (``config``; an explicit ``config`` override is merged over them); the other
        ``overrides`` are this class's fields. The password never appears in ``display``,
        ``repr`` or errors."""
        shown = _redact_url(url)
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in _SCHEMES:
            raise ConfigurationError(
                f"KafkaBroker.from_url: {shown!r} is not a Kafka URL; use "
                "kafka://host:port[,host:port] or kafka+ssl://..."
            )
        netloc, _, query = rest.partition("?")
        netloc = netloc.rstrip("/")
        userinfo, at, hosts = netloc.rpartition("@")
        if not hosts or any(not h.strip() for h in hosts.split(",")):
            raise ConfigurationError(
                f"KafkaBroker.from_url: {shown!r} names no broker; use kafka://host:port"
            )
        config: dict[str, Any] = {"security.protocol": _SCHEMES[scheme.lower()]}
        if at:
            user, _, password = userinfo.partition(":")
            config["security.protocol"] = "SASL_" + _SCHEMES[scheme.lower()]
            config["sasl.mechanism"] = "PLAIN"
            config["sasl.username"] = urllib.parse.unquote(user)
            config["sasl.password"] = urllib.parse.unquote(password)
        for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            config[key] = value
        config.update(overrides.pop("config", None) or {})
        return cls(bootstrap_servers=hosts, config=config, display=shown, **overrides)
