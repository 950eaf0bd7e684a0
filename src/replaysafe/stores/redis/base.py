"""The state every role of a Redis ledger shares (client, codec, clock offset, open/closed) and
its async transport: how one script call or plain read goes to Redis and how its errors come
back. The role mixins (:mod:`.claims`, :mod:`.quarantine`, :mod:`.controls`, :mod:`.admin`)
build on :class:`RedisBase`; :class:`~replaysafe.stores.redis.ledger.RedisLedger` composes them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from replaysafe._redact import redact, secrets_of
from replaysafe.errors import ConfigurationError, LedgerUnavailable
from replaysafe.ledger.base import OpKey
from replaysafe.stores.redis.codec import _as_is, _Call, _Codec
from replaysafe.stores.redis.connection import _redis, connect_async, display_of
from replaysafe.stores.redis.decode import _US, _b
from replaysafe.stores.redis.scripts import _Script, check_loaded

if TYPE_CHECKING:
    from redis.asyncio import Redis

_T = TypeVar("_T")


class RedisBase:
    """A Redis ledger's shared state and async transport (see the module docstring). Its
    constructor is :class:`~replaysafe.stores.redis.ledger.RedisLedger`'s, documented there
    (``url`` or ``client``, ``prefix``, ``retention``)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = "rs:",
        retention: float = 7 * 86_400.0,
        client: Redis | None = None,
    ) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError(
                f"prefix must be a non-empty string (the ledger's key namespace), got {prefix!r}"
            )
        if not isinstance(retention, int | float) or not math.isfinite(retention) or retention <= 0:
            raise ConfigurationError(
                f"retention must be a positive number of seconds (the replay horizon), got "
                f"{retention!r}"
            )
        if url is None and client is None:
            raise ConfigurationError(
                "RedisLedger needs a url ('redis://host:6379/0') or a redis.asyncio client"
            )
        self._mod = _redis()
        self._errors: Any = self._mod.exceptions
        self._prefix = prefix
        self._p = _b(prefix)
        self._url = url  # kept for sync(): the twin opens its own connections to it
        if client is None:
            assert url is not None
            display = redact(url)
            client = connect_async(url)
            self._owns_client = True
        else:
            display = display_of(client, url)
            self._owns_client = False
        self._display = display
        secrets = () if url is None else secrets_of(url)
        self._codec = _Codec(prefix, retention, display, secrets, self._errors)
        self._client: Redis = client
        self._offset = 0.0  # server clock minus local clock, from the last script reply
        self._closed = False

    # ------------------------------------------------------------------ properties

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def retention(self) -> float:
        """Seconds a completed record is remembered (the replay horizon this ledger can back)."""
        return self._codec.retention

    def now(self) -> float:
        """An estimate of the Redis server's clock (what leases are judged by): the local clock
        plus the offset measured at the last script reply (error about half a round trip)."""
        return time.time() + self._offset

    def key_for(self, key: OpKey) -> bytes:
        """The Redis key of an operation's record (for operators and tests)."""
        return self._codec.key_for(key)

    def __repr__(self) -> str:
        closed = ", closed" if self._closed else ""
        return f"RedisLedger({self._display!r}, prefix={self._prefix!r}{closed})"

    # ------------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Close the connection pool (only when the ledger created it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            # closing the sockets of a dead server: nothing is left to release
            with contextlib.suppress(self._errors.RedisError):
                await self._client.aclose()

    # ------------------------------------------------------------------ transport

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerUnavailable(f"{self!r} is closed; open a new RedisLedger to use it again")

    async def _run(self, calls: Iterable[_Call[list[_T]]]) -> list[_T]:
        """Send each call of a batch in turn (one round trip each) and join their results."""
        out: list[_T] = []
        for call in calls:
            out += call.decode(await self._send(call))
        return out

    async def _one(self, call: _Call[_T]) -> _T:
        return call.decode(await self._send(call))

    async def _load(self, script: _Script) -> None:
        check_loaded(script, await self._client.script_load(script.text))

    async def _eval(
        self,
        script: _Script,
        keys: Sequence[bytes],
        args: Sequence[bytes | str],
        *,
        what: str,
        now_at: int = 1,
        batch: bool = False,
    ) -> list[Any]:
        """Run ``script`` with ``EVALSHA`` (one round trip); ``reply[now_at]`` is Redis TIME."""
        return await self._send(_Call(script, keys, args, _as_is, what, now_at, batch))

    async def _send(self, call: _Call[Any]) -> list[Any]:
        """Send ``call`` with ``EVALSHA`` (loading the script after ``NOSCRIPT``, which means it
        did not run); its raw reply, redis-py errors mapped by the codec."""
        self._check_open()
        script, keys = call.script, call.keys
        sent = time.time()
        try:
            try:
                reply = await self._client.evalsha(script.sha, len(keys), *keys, *call.args)
            except self._errors.NoScriptError:
                # NOSCRIPT: the script did not run; load it (restart, failover, SCRIPT FLUSH)
                await self._load(script)
                reply = await self._client.evalsha(script.sha, len(keys), *keys, *call.args)
        except self._errors.RedisError as exc:
            raise self._codec.unavailable(exc, call.what, sent=True, batch=call.batch) from exc
        self._offset = _clock_offset(reply[call.now_at], sent)
        return reply  # type: ignore[no-any-return]

    async def _command(self, what: str, call: Any) -> Any:
        """A plain read (no script): errors are mapped, nothing can have been half-applied."""
        self._check_open()
        try:
            return await call()
        except self._errors.RedisError as exc:
            raise self._codec.unavailable(exc, what, sent=False) from exc


def _clock_offset(server_now: bytes | int, sent_at: float) -> float:
    """Server clock minus local clock, from Redis TIME read during a call sent at ``sent_at``."""
    # the server read TIME somewhere inside the round trip: assume its middle
    return int(server_now) / _US - (sent_at + time.time()) / 2
