"""The sync twin of the Redis ledger (``RedisLedger.sync()``), for plain threads: the very calls
the async ledger sends (one :class:`~replaysafe.stores.redis.codec._Codec`), sent with redis-py's
sync client in the caller's thread."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from replaysafe.errors import LeaseLost, LedgerUnavailable
from replaysafe.ledger.base import (
    Claim,
    ClaimOutcome,
    ClaimRequest,
    OpKey,
    QuarantineEntry,
    QuarantineRequest,
    Record,
)
from replaysafe.stores.redis.base import _clock_offset
from replaysafe.stores.redis.codec import _Call, _Codec
from replaysafe.stores.redis.decode import _record
from replaysafe.stores.redis.scripts import check_loaded

_T = TypeVar("_T")


class SyncRedisLedger:
    """The sync twin of a :class:`RedisLedger` (``RedisLedger.sync()``), for plain threads.

    It sends the very calls the async ledger sends (the same scripts, keys, packed requests and
    reply decoding: one :class:`_Codec`), with redis-py's sync client, in the caller's thread, so
    every contract, outcome and error (``LeaseLost``, ``LedgerUnavailable``, ``LedgerDataError``,
    ``ConfigurationError``) is the async ledger's, worded the same. ``redis.Redis`` takes a
    connection from its pool per command, so several threads may call at once (a keeper thread
    extends while the caller runs the effect). The connection pool is its own: :meth:`close`
    closes it, and closing the async ledger does not.
    """

    def __init__(self, codec: _Codec, client: Any, offset: float) -> None:
        self._codec = codec
        self._errors: Any = codec.errors
        self._client = client  # redis.Redis, decode_responses=False
        self._offset = offset  # server clock minus local clock, from the last script reply
        self._closed = False

    def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        """:meth:`RedisLedger.claim`, in this thread."""
        request = ClaimRequest(key, fingerprint, owner, lease)
        (outcome,) = self._run(self._codec.claim([request], "claim"))
        return outcome

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        """:meth:`RedisLedger.claim_many`, in this thread."""
        return self._run(self._codec.claim(requests, "claim_many"))

    def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        """:meth:`RedisLedger.mark_started`, in this thread."""
        return self._run(self._codec.mark_started(claims))

    def extend(self, claim: Claim, lease: float) -> Claim:
        """:meth:`RedisLedger.extend`, in this thread."""
        return self._one(self._codec.extend(claim, lease))

    def complete(self, claim: Claim, result: str | None = None) -> Record:
        """:meth:`RedisLedger.complete`, in this thread."""
        (done,) = self._run(self._codec.complete([(claim, result)], "complete"))
        if isinstance(done, LeaseLost):
            raise done
        return done

    def complete_many(self, items: Sequence[tuple[Claim, str | None]]) -> list[Record | LeaseLost]:
        """:meth:`RedisLedger.complete_many`, in this thread."""
        return self._run(self._codec.complete(items, "complete_many"))

    def release(self, claim: Claim, error: str | None = None) -> None:
        """:meth:`RedisLedger.release`, in this thread."""
        self._one(self._codec.release(claim, error))

    def quarantine(self, request: QuarantineRequest, claim: Claim | None = None) -> QuarantineEntry:
        """:meth:`RedisLedger.quarantine`, in this thread."""
        return self._one(self._codec.quarantine(request, claim))

    def get(self, key: OpKey) -> Record | None:
        """:meth:`RedisLedger.get` (one ``HGETALL``), in this thread."""
        self._check_open()
        try:
            h = self._client.hgetall(self._codec.key_for(key))
        except self._errors.RedisError as exc:
            raise self._codec.unavailable(exc, "get", sent=False) from exc
        return _record(key, h)

    def now(self) -> float:
        """:meth:`RedisLedger.now`: the local clock plus the offset seen at this twin's last
        script reply (the async ledger's until then)."""
        return time.time() + self._offset

    def close(self) -> None:
        """Close this twin's connection pool. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # closing the sockets of a dead server: nothing is left to release
        with contextlib.suppress(self._errors.RedisError):
            self._client.close()

    def __repr__(self) -> str:
        closed = ", closed" if self._closed else ""
        return f"SyncRedisLedger({self._codec.display!r}, prefix={self._codec.prefix!r}{closed})"

    # ------------------------------------------------------------------ transport

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerUnavailable(
                f"{self!r} is closed; call RedisLedger.sync() for a new one to use it again"
            )

    def _run(self, calls: Iterable[_Call[list[_T]]]) -> list[_T]:
        out: list[_T] = []
        for call in calls:
            out += call.decode(self._send(call))
        return out

    def _one(self, call: _Call[_T]) -> _T:
        return call.decode(self._send(call))

    def _send(self, call: _Call[Any]) -> list[Any]:
        """Send ``call`` with ``EVALSHA`` (loading the script after ``NOSCRIPT``, which means it
        did not run); its raw reply, redis-py errors mapped as the async ledger maps them."""
        self._check_open()
        script, keys = call.script, call.keys
        sent = time.time()
        try:
            try:
                reply = self._client.evalsha(script.sha, len(keys), *keys, *call.args)
            except self._errors.NoScriptError:
                # NOSCRIPT: the script did not run; load it (restart, failover, SCRIPT FLUSH)
                check_loaded(script, self._client.script_load(script.text))
                reply = self._client.evalsha(script.sha, len(keys), *keys, *call.args)
        except self._errors.RedisError as exc:
            raise self._codec.unavailable(exc, call.what, sent=True, batch=call.batch) from exc
        self._offset = _clock_offset(reply[call.now_at], sent)
        return reply  # type: ignore[no-any-return]
