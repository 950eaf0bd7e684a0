"""Connections to Redis: the driver (the ``redis`` extra, imported on first use), the clients
both ledgers open from a URL (same timeouts, retries and client name), hiredis' C packer for the
asyncio client, and how a ready client names its server in messages."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

from replaysafe._redact import redact, scrub, secrets_of
from replaysafe.errors import ConfigurationError, MissingExtra

if TYPE_CHECKING:
    from redis.asyncio import Redis

#: the name the ledger's connections carry in ``CLIENT LIST`` unless the URL sets ``client_name``
CLIENT_NAME: Final = "replaysafe-ledger"


def _redis() -> ModuleType:
    """The redis package, imported on first use (the ``redis`` extra)."""
    try:
        import redis
        import redis.asyncio
        import redis.exceptions
    except ImportError as exc:
        raise MissingExtra("redis", "redis") from exc
    return redis


def _with_c_packer(cls: Any) -> Any:
    """``cls`` (a redis-py asyncio connection class), packing commands with hiredis' C packer
    when hiredis is installed (the ``redis`` extra pulls it in); ``cls`` itself otherwise.

    redis-py's sync connections already pack with hiredis; its asyncio connections pack in Python,
    ~0.6 us per argument, and a claim script call of 100 items has 100+ arguments (its keys). The
    bytes on the wire are the same (redis-py's own serializer is used).
    """
    try:
        import hiredis
        from redis.connection import HiredisRespSerializer
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:  # no hiredis, or an older redis-py: keep redis-py's packer
        return cls
    if not HIREDIS_AVAILABLE:
        return cls
    # redis-py 8 ships this class without annotations
    serializer = HiredisRespSerializer()  # type: ignore[no-untyped-call,unused-ignore]
    pack = hiredis.pack_command

    class CPacking(cls):  # type: ignore[misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            if args[0] == "EVALSHA":  # the ledger's hot path: bytes, str and int arguments only
                return [pack(args)]
            return serializer.pack(*args)  # type: ignore[no-any-return]

    CPacking.__name__ = CPacking.__qualname__ = f"{cls.__name__}WithCPacker"
    return CPacking


def _open_client(cls: Any, retry: Any, url: str) -> Any:
    """A ``cls`` (``redis.asyncio.Redis`` or ``redis.Redis``) for ``url`` with the ledger's
    options, ``retry`` being the matching ``Retry`` class: both ledgers connect alike."""
    from redis.backoff import ExponentialWithJitterBackoff

    try:
        # Query options in the URL (socket_timeout, client_name, ...) override these.
        return cls.from_url(
            url,
            decode_responses=False,
            client_name=CLIENT_NAME,
            socket_timeout=5.0,
            socket_connect_timeout=5.0,
            # a few quick retries after a dropped connection, then LedgerUnavailable: a dead
            # server must not stall a claim for long
            retry=retry(ExponentialWithJitterBackoff(base=0.02, cap=0.5), 3),
        )
    except ValueError as exc:
        raise ConfigurationError(
            f"{redact(url)!r} is not a usable Redis URL "
            f"({scrub(str(exc), secrets_of(url))}); use "
            "redis://[user:password@]host:port/db, rediss://... or unix:///path"
        ) from None


def connect_async(url: str) -> Redis:
    """A ``redis.asyncio.Redis`` for ``url`` with the ledger's options, packing in C."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry

    client: Redis = _open_client(Redis, Retry, url)
    pool = client.connection_pool
    # the URL's scheme chose the class (TCP, TLS, unix socket); keep it, pack in C
    pool.connection_class = _with_c_packer(pool.connection_class)
    return client


def connect_sync(url: str) -> Any:
    """A ``redis.Redis`` for ``url`` with the ledger's options (the sync twin's pool)."""
    from redis import Redis
    from redis.retry import Retry

    return _open_client(Redis, Retry, url)


def display_of(client: Redis, url: str | None) -> str:
    """How a ledger built from a ready ``client`` names its server in reprs and errors: ``url``
    redacted when given, else the client's host, port and db. Raises ``ConfigurationError`` for
    a client that decodes responses (the ledger stores raw bytes)."""
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("decode_responses"):
        raise ConfigurationError(
            "the redis client decodes responses (decode_responses=True); the ledger "
            "stores raw bytes (quarantined message copies): pass a client created with "
            "decode_responses=False"
        )
    if url is not None:
        return redact(url)
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
