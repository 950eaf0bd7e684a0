"""The SQS broker's settings: one frozen, validated :class:`SQSConfig`, and its one URL parser
(:meth:`SQSConfig.from_url`, which ``SQSBroker.from_url`` and ``broker_from_url`` go through)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict
from urllib.parse import parse_qsl, unquote, urlsplit

from replaysafe._redact import redact as redact_url
from replaysafe._url import take_options
from replaysafe.brokers.sqs.wire import (
    _GROUP_OR_DEDUP_ID,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_VISIBILITY,
    MAX_WAIT_TIME,
)
from replaysafe.clock import SYSTEM_CLOCK, Clock
from replaysafe.errors import ConfigurationError
from replaysafe.failpoints import Failpoints

#: SQSConfig.from_url's query parameters (any other is refused)
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "region": str, "wait_time": int, "visibility_timeout": int, "delete_window": float,
    "default_group": str, "max_retries": int,
}  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class SQSConfig:
    """Everything an :class:`~replaysafe.brokers.sqs.SQSBroker` is configured with, checked once
    on construction (``ConfigurationError`` saying what is wrong and what to do).

    ``region``; ``endpoint_url`` (for a compatible server such as moto or LocalStack; default:
    AWS; never with credentials in it); explicit credentials (default: the AWS credential chain;
    the secret and the session token are left out of ``repr``); ``wait_time`` (long-poll seconds,
    0-20); ``visibility_timeout`` (seconds each receive hides a message; default: the queue's own
    attribute); ``delete_window`` (seconds an ack waits for others to share its
    ``DeleteMessageBatch``); ``default_group`` (the FIFO ``MessageGroupId`` of ``key=None``);
    ``max_retries`` (botocore attempts for receive/delete/visibility/metadata calls; publishes
    are never retried by the driver); ``connect_timeout``/``read_timeout`` (the read timeout is
    raised to ``wait_time + 10`` so a long poll never looks like one); ``max_pool_connections``
    (each subscription's long poll holds one); ``max_message_bytes`` (body plus attributes, per
    message and per batch); ``clock``; ``failpoints`` (None: the process-wide registry).
    """

    region: str | None = None
    endpoint_url: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)
    wait_time: int = 20
    visibility_timeout: int | None = None
    delete_window: float = 0.01
    default_group: str = "rs-no-key"
    max_retries: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_pool_connections: int = 50
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    clock: Clock = SYSTEM_CLOCK
    failpoints: Failpoints | None = None

    def __post_init__(self) -> None:
        wait_time = self.wait_time
        if not isinstance(wait_time, int) or not 0 <= wait_time <= MAX_WAIT_TIME:
            raise ConfigurationError(
                f"wait_time must be whole seconds from 0 to {MAX_WAIT_TIME} (SQS long polling), "
                f"got {wait_time!r}; pass an int in that range (20 for the longest poll)"
            )
        visibility = self.visibility_timeout
        if visibility is not None and (
            not isinstance(visibility, int) or not 0 < visibility <= MAX_VISIBILITY
        ):
            raise ConfigurationError(
                f"visibility_timeout must be whole seconds from 1 to {MAX_VISIBILITY}, "
                f"got {visibility!r}; pass an int in that range, or None for the queue's own"
            )
        if self.delete_window < 0:
            raise ConfigurationError(
                f"delete_window must be >= 0 seconds, got {self.delete_window}; pass 0 to send "
                "each delete at once"
            )
        if not _GROUP_OR_DEDUP_ID.match(self.default_group):
            raise ConfigurationError(
                f"default_group {self.default_group!r} is not a valid SQS MessageGroupId "
                "(1-128 letters, digits or punctuation); pick such a name"
            )
        if self.max_retries < 1 or self.max_pool_connections < 1 or self.max_message_bytes < 1024:
            raise ConfigurationError(
                "max_retries and max_pool_connections must be >= 1 and max_message_bytes >= 1024 "
                f"(got {self.max_retries}, {self.max_pool_connections}, "
                f"{self.max_message_bytes}); raise them"
            )
        if self.endpoint_url is not None and urlsplit(self.endpoint_url).password is not None:
            raise ConfigurationError(
                f"endpoint_url {redact_url(self.endpoint_url)} carries credentials; pass them as "
                "aws_access_key_id/aws_secret_access_key or use SQSBroker.from_url"
            )

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> SQSConfig:
        """The configuration a URL names (the one SQS URL grammar: ``SQSBroker.from_url`` and
        ``broker_from_url`` come here); keyword ``overrides`` win over the URL's query parameters.

        - ``sqs://``, ``sqs://REGION`` or ``sqs://?region=REGION``: AWS, default credential chain
          (a host with a dot or a port, ``sqs://host:port``, is an HTTPS endpoint instead).
        - ``sqs+http://[KEY:SECRET@]host:port[/REGION]`` (or ``sqs+https://…``, or a plain
          ``http(s)://`` URL): an SQS-compatible endpoint (moto, LocalStack); user and password
          are the access key id and secret (redacted in repr and errors); the region is the path
          or ``?region=``, ``us-east-1`` when neither is given.

        Query parameters: ``region``, ``wait_time``, ``visibility_timeout``, ``delete_window``,
        ``default_group``, ``max_retries``.
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(
                f"cannot parse SQS URL {redact_url(url)}: {exc}; use sqs://REGION or "
                "sqs+http://host:port/REGION"
            ) from None
        scheme = parts.scheme.lower()
        endpoint: str | None
        path_region = parts.path.strip("/") or None
        if path_region is not None and "/" in path_region:
            raise ConfigurationError(
                f"SQS URL {redact_url(url)}: the path is the region (one name, e.g. /eu-west-1), "
                f"not {parts.path!r}"
            )
        if scheme == "sqs":
            host = parts.hostname
            if host and "." not in host and not port:
                # sqs://eu-west-1: a region name, never a host
                if path_region is not None:
                    raise ConfigurationError(
                        f"SQS URL {redact_url(url)} names a region twice; use sqs://REGION"
                    )
                path_region, endpoint = host, None
            else:
                endpoint = f"https://{host}{f':{port}' if port else ''}" if host else None
        elif scheme in ("sqs+http", "sqs+https", "http", "https"):
            if not parts.hostname:
                raise ConfigurationError(f"SQS URL {redact_url(url)} names no host")
            real = scheme.removeprefix("sqs+")
            endpoint = f"{real}://{parts.hostname}{f':{port}' if port else ''}"
        else:
            raise ConfigurationError(
                f"SQS URL {redact_url(url)} has scheme {parts.scheme!r}; use sqs://, "
                "sqs+http:// or sqs+https://"
            )
        rest, kwargs = take_options(url, _URL_OPTIONS, what="SQS")
        unknown = [name for name, _ in parse_qsl(urlsplit(rest).query, keep_blank_values=True)]
        if unknown:
            raise ConfigurationError(
                f"SQS URL {redact_url(url)}: unknown parameter {unknown[0]!r}; known: "
                f"{', '.join(sorted(_URL_OPTIONS))}"
            )
        if path_region is not None:
            if kwargs.get("region", path_region) != path_region:
                raise ConfigurationError(
                    f"SQS URL {redact_url(url)} names two regions ({path_region!r} and "
                    f"{kwargs['region']!r}); keep one"
                )
            kwargs["region"] = path_region
        if scheme != "sqs":
            kwargs.setdefault("region", "us-east-1")  # an SQS-compatible server needs one
        if parts.username is not None:
            kwargs["aws_access_key_id"] = unquote(parts.username)
            kwargs["aws_secret_access_key"] = unquote(parts.password or "")
        kwargs["endpoint_url"] = endpoint
        kwargs.update(overrides)
        return cls(**kwargs)


class SQSOptions(TypedDict, total=False):
    """:class:`SQSConfig`'s fields as ``SQSBroker`` keyword arguments (the constructor's typing;
    ``tests/test_sqs_config.py`` checks the two name the same options)."""

    region: str | None
    endpoint_url: str | None
    aws_access_key_id: str | None
    aws_secret_access_key: str | None
    aws_session_token: str | None
    wait_time: int
    visibility_timeout: int | None
    delete_window: float
    default_group: str
    max_retries: int
    connect_timeout: float
    read_timeout: float
    max_pool_connections: int
    max_message_bytes: int
    clock: Clock
    failpoints: Failpoints | None
