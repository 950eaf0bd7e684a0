"""The claim role of the Redis ledger (:class:`~replaysafe.ledger.base.Ledger`): claim, extend,
mark_started, complete and release, each one Lua script per chunk, fenced by token; and ``get``.
"""

from __future__ import annotations

from collections.abc import Sequence

from replaysafe.errors import LeaseLost
from replaysafe.ledger.base import (
    Claim,
    ClaimOutcome,
    ClaimRequest,
    Ledger,
    OpKey,
    Record,
)
from replaysafe.stores.redis.base import RedisBase
from replaysafe.stores.redis.decode import _record


class RedisClaims(RedisBase, Ledger):
    """The :class:`~replaysafe.ledger.base.Ledger` role on a :class:`.RedisBase`."""

    async def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        """Try to take the operation for ``lease`` seconds of Redis time (one script, atomic).

        Moves no boundary. If the reply is lost the claim may or may not exist: it then expires
        and the next claim takes over with ``recovered=True``.
        """
        request = ClaimRequest(key, fingerprint, owner, lease)
        (outcome,) = await self._run(self._codec.claim([request], "claim"))
        return outcome

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        """Claim a batch: one claim script per chunk of at most :data:`BATCH_CHUNK` items (one
        round trip each). Same outcomes, in request order, as calling :meth:`claim` for each
        request in order (a key repeated in the batch answers ``InFlight`` to its second request).
        Each chunk is atomic; the batch as a whole is not (another client's command may run
        between two chunks). Moves no boundary; claims of a chunk whose reply is lost expire."""
        return await self._run(self._codec.claim(requests, "claim_many"))

    async def extend(self, claim: Claim, lease: float) -> Claim:
        """Push the lease to Redis ``TIME + lease``. Raises ``LeaseLost`` if the token is stale."""
        return await self._one(self._codec.extend(claim, lease))

    async def complete(self, claim: Claim, result: str | None = None) -> Record:
        """Record the effect as done (boundary EFFECTED for keyed/unkeyed effects) and start the
        record's retention TTL. Raises ``LeaseLost`` when the token is stale: then the caller must
        not complete at the broker. A lost reply may hide a completion that happened; the next
        claim then answers ``AlreadyDone``."""
        (done,) = await self._run(self._codec.complete([(claim, result)], "complete"))
        if isinstance(done, LeaseLost):
            raise done
        return done

    async def complete_many(
        self, items: Sequence[tuple[Claim, str | None]]
    ) -> list[Record | LeaseLost]:
        """Complete a batch: one script per chunk of at most :data:`BATCH_CHUNK` items (one round
        trip each), with the same result per item, in request order, as :meth:`complete` called
        for each in order. A stale claim yields its ``LeaseLost`` in place (nothing written for
        it) and does not stop the others; a claim repeated in the batch completes once and is
        ``LeaseLost`` the second time."""
        return await self._run(self._codec.complete(items, "complete_many"))

    async def mark_started(self, claims: Sequence[Claim]) -> list[Claim | LeaseLost]:
        """Mark a batch started: one script per chunk of at most :data:`BATCH_CHUNK` claims (one
        round trip each, atomic per chunk), fenced per claim: a stale one yields its
        ``LeaseLost`` in place and nothing is written for it."""
        return await self._run(self._codec.mark_started(claims))

    async def release(self, claim: Claim, error: str | None = None) -> None:
        """Give the operation back (no effect happened); the next claim gets it at once."""
        await self._one(self._codec.release(claim, error))

    async def get(self, key: OpKey) -> Record | None:
        h = await self._command("get", lambda: self._client.hgetall(self.key_for(key)))
        return _record(key, h)
