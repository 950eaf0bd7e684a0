"""The Redis ledger: the four roles of :class:`~replaysafe.ledger.base.LedgerBackend`, each a
mixin of its own module, composed on one shared :class:`~.base.RedisBase` (see
:mod:`replaysafe.stores.redis` for the design)."""

from __future__ import annotations

from typing import Any, ClassVar

from replaysafe._url import take_options
from replaysafe.errors import CapabilityError
from replaysafe.ledger.base import LedgerBackend
from replaysafe.stores.redis.admin import RedisAdmin
from replaysafe.stores.redis.claims import RedisClaims
from replaysafe.stores.redis.connection import connect_sync
from replaysafe.stores.redis.controls import RedisControls
from replaysafe.stores.redis.quarantine import RedisQuarantine
from replaysafe.stores.redis.sync import SyncRedisLedger


class RedisLedger(RedisClaims, RedisQuarantine, RedisControls, RedisAdmin, LedgerBackend):
    """The replay ledger in Redis (not transactional). See :mod:`replaysafe.stores.redis` for the
    design.

    ``url`` is a redis-py URL (``redis://[user:password@]host:port/db``, ``rediss://``,
    ``unix://``); its password never appears in ``repr``, logs or errors. Alternatively pass a
    ready ``client`` (a ``redis.asyncio.Redis`` with ``decode_responses=False``; the caller then
    owns and closes it). ``retention`` is the replay horizon in seconds: completed records expire
    that long after completion. Use one ``retention`` per ``prefix``.
    """

    transactional: ClassVar[bool] = False

    @classmethod
    def from_url(cls, url: str, **opts: Any) -> RedisLedger:
        """The ledger at ``url``: a redis-py URL whose query may also carry the ledger's own
        options ``prefix`` and ``retention`` (seconds), taken out before redis-py sees it;
        ``opts`` (the constructor's keyword arguments) win over the URL."""
        plain, options = take_options(url, {"prefix": str, "retention": float},
                                      what="Redis ledger")  # fmt: skip
        return cls(plain, **{**options, **opts})

    def sync(self) -> SyncRedisLedger:
        """The sync twin (:class:`SyncRedisLedger`): the same server, prefix and retention, with
        its own ``redis.Redis`` connection pool (same timeouts and retries, opened from the same
        URL), for plain threads. Each call opens a new one; close it (closing this ledger does
        not). Raises ``CapabilityError`` for a ledger built from a ``client`` (there is no URL to
        open the sync connections from) and ``LedgerUnavailable`` once this ledger is closed."""
        self._check_open()
        if self._url is None:
            raise CapabilityError(
                f"{self!r} was built from a redis.asyncio client, so it has no URL to open a sync "
                "twin's connections from: build the RedisLedger with url=... to use Ledger.sync()"
            )
        return SyncRedisLedger(self._codec, connect_sync(self._url), self._offset)
