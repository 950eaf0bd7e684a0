"""Redis ledger: claims, leases and fencing in Lua scripts on one Redis server (redis-py asyncio).

How it stays correct:

- **Every transition is one Lua script.** claim, extend, complete, release and quarantine each
  read, decide and write inside one script, which Redis runs atomically: no other command runs
  between the read and the write, so two workers can never both read "free" and both claim. The
  scripts implement exactly the state machine of :mod:`replaysafe.ledger.base` (``decide_claim``
  and ``check_fence``); a fenced call that fails returns the current record and the Python side
  raises through ``check_fence`` itself, so the words of ``LeaseLost`` are the same everywhere.
- **Time is Redis ``TIME``**, read inside the script, in integer microseconds. A lease is judged
  by the server's clock, never by a worker's. :meth:`RedisLedger.now` is an estimate of the
  server clock (the local clock corrected by the offset seen in the last script reply).
- **Fencing tokens come from one ``INCR`` counter** (``<prefix>token``), incremented inside the
  claim script, so they strictly increase across the whole ledger (every scope, every process).
- **Scripts are loaded once and called with ``EVALSHA``**; after ``NOSCRIPT`` (a Redis restart,
  failover or ``SCRIPT FLUSH``) the script is loaded again and the call repeated, which is safe
  because a ``NOSCRIPT`` reply means the script did not run.
- **Batches are one round trip**: ``claim_many`` and ``complete_many`` send one pipeline
  (``transaction=False``) of ``EVALSHA`` calls; each item is still atomic on its own, and results
  come back in request order (only the first call after a ``NOSCRIPT`` costs a second trip).

Keys, all under ``prefix`` (default ``rs:``)::

    <prefix>token                         string  last fencing token issued
    <prefix>op:<n>:<scope>:<operation_id> hash    one operation record; <n> = len(scope) in
                                                  UTF-8 bytes, so ("a:b", "c") and ("a", "b:c")
                                                  can never share a key
    <prefix>completed                     zset    record keys by completed_at (for purge)
    <prefix>q:<entry id>                  hash    one quarantine entry
    <prefix>qidx                          zset    entry ids by created_at (oldest first)
    <prefix>qidx:<reason>                 zset    the same, per reason

Lifetimes: a record gets a TTL of ``retention`` seconds when it completes, so completed records
expire by themselves at the replay horizon (after which the operation is new again). In-flight,
released and quarantined records and quarantine entries have **no TTL**: they are the ledger's
open business (an abandoned in-flight record stays until the operation is claimed again).

What a caller can lose or see twice: when the connection drops after a script was sent, the script
may or may not have run, and the call raises ``LedgerUnavailable`` saying so. That is never unsafe
in itself: an unknown claim expires and is taken over with ``recovered=True``; an unknown
completion is found by the next claim as ``AlreadyDone``. redis-py retries a command after a
connection error a few times; a retried claim whose first run did happen answers ``InFlight`` (its
own lease), a retried completion answers ``LeaseLost``: conservative, never a duplicate. The
caller must only *not* complete at the broker after such an error, exactly as after ``LeaseLost``.

Durability is the server's: see :meth:`RedisLedger.persistence_report`. Only ``appendonly yes``
with ``appendfsync always`` (and ``maxmemory-policy noeviction``) keeps a returned claim or
completion across a crash of the Redis host. Redis Cluster is not supported: the fencing counter
is one key that every claim touches. A failover to an asynchronously replicated replica can lose
the latest writes, including issued tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from replaysafe.errors import (
    ConfigurationError,
    LeaseLost,
    LedgerError,
    LedgerUnavailable,
    MissingExtra,
)
from replaysafe.ledger.base import (
    Acquired,
    AlreadyDone,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    Conflict,
    InFlight,
    Ledger,
    OpKey,
    Quarantined,
    QuarantineEntry,
    QuarantineRequest,
    Record,
    State,
    check_fence,
)
from replaysafe.quarantine import EffectRisk, QuarantineReason

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisLedger", "RedisPersistence", "assess_persistence"]

#: the name the ledger's connections carry in ``CLIENT LIST`` unless the URL sets ``client_name``
CLIENT_NAME: Final = "replaysafe-ledger"
#: most records one purge script deletes before yielding the server to other clients
PURGE_CHUNK: Final = 1_000

_US: Final = 1_000_000  # microseconds per second: times are integer microseconds in Redis

# --------------------------------------------------------------------------- Lua scripts
# Numbers are always formatted with %.0f before they reach redis.call or the reply: Lua's default
# number-to-string conversion keeps only 14 digits, which would round microsecond timestamps.

_PRELUDE = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function num(n) return string.format('%.0f', n) end
local function with_hash(head, key)
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat do head[#head + 1] = flat[i] end
  return head
end
local function current(key, token)
  local cur = redis.call('HMGET', key, 'state', 'token')
  return cur[1] == 'in_flight' and cur[2] == token
end
"""

# KEYS: record, token counter. ARGV: scope, operation_id, fingerprint, owner, lease (us).
# Reply: {outcome, now, recovered, record...}. Mirrors ledger.base.decide_claim line by line.
_CLAIM = """
local now = now_us()
local key = KEYS[1]
local cur = redis.call('HMGET', key, 'state', 'fingerprint', 'lease_until', 'attempts')
local state = cur[1]
local lease_until = num(now + tonumber(ARGV[5]))
if not state then
  local token = num(redis.call('INCR', KEYS[2]))
  redis.call('HSET', key, 'scope', ARGV[1], 'operation_id', ARGV[2], 'fingerprint', ARGV[3],
    'state', 'in_flight', 'token', token, 'owner', ARGV[4], 'lease_until', lease_until,
    'attempts', '1', 'created_at', num(now), 'updated_at', num(now))
  return with_hash({'acquired', num(now), '0'}, key)
end
if cur[2] ~= ARGV[3] then return with_hash({'conflict', num(now), '0'}, key) end
if state == 'completed' then return with_hash({'already_done', num(now), '0'}, key) end
if state == 'quarantined' then return with_hash({'quarantined', num(now), '0'}, key) end
if state == 'in_flight' and (tonumber(cur[3]) or 0) > now then
  return with_hash({'in_flight', num(now), '0'}, key)
end
-- released, or in flight with an expired lease (the previous attempt's outcome is unknown)
local recovered = '0'
if state == 'in_flight' then recovered = '1' end
local token = num(redis.call('INCR', KEYS[2]))
redis.call('HSET', key, 'state', 'in_flight', 'token', token, 'owner', ARGV[4],
  'lease_until', lease_until, 'attempts', num((tonumber(cur[4]) or 0) + 1),
  'updated_at', num(now))
redis.call('HDEL', key, 'result', 'completed_at')
redis.call('PERSIST', key)
return with_hash({'acquired', num(now), recovered}, key)
"""

# KEYS: record. ARGV: token, lease (us). Reply: {'ok', now, lease_until} or {'lease_lost', ...}.
_EXTEND = """
local now = now_us()
if not current(KEYS[1], ARGV[1]) then return with_hash({'lease_lost', num(now)}, KEYS[1]) end
local lease_until = num(now + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'lease_until', lease_until, 'updated_at', num(now))
return {'ok', num(now), lease_until}
"""

# KEYS: record, completed index. ARGV: token, has_result, result, retention (ms).
_COMPLETE = """
local now = now_us()
local key = KEYS[1]
if not current(key, ARGV[1]) then return with_hash({'lease_lost', num(now)}, key) end
redis.call('HSET', key, 'state', 'completed', 'updated_at', num(now), 'completed_at', num(now))
redis.call('HDEL', key, 'lease_until')
if ARGV[2] == '1' then
  redis.call('HSET', key, 'result', ARGV[3])
else
  redis.call('HDEL', key, 'result')
end
local retention_ms = tonumber(ARGV[4])
redis.call('PEXPIRE', key, ARGV[4])
redis.call('ZADD', KEYS[2], num(now), key)
-- index entries older than the retention point at records their TTL already removed
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. num(now - retention_ms * 1000))
return with_hash({'ok', num(now)}, key)
"""

# KEYS: record. ARGV: token, has_error, error.
_RELEASE = """
local now = now_us()
local key = KEYS[1]
if not current(key, ARGV[1]) then return with_hash({'lease_lost', num(now)}, key) end
redis.call('HSET', key, 'state', 'released', 'updated_at', num(now))
redis.call('HDEL', key, 'lease_until')
if ARGV[2] == '1' then
  redis.call('HSET', key, 'last_error', ARGV[3])
else
  redis.call('HDEL', key, 'last_error')
end
return {'ok', num(now)}
"""

# KEYS: record, entry, index, index by reason.
# ARGV: has_claim, token, detail, entry id, attempts, risk, then field/value pairs of a new entry.
_QUARANTINE = """
local now = now_us()
if ARGV[1] == '1' then
  -- fence first: a stale claim writes nothing, not even the entry
  if not current(KEYS[1], ARGV[2]) then return with_hash({'lease_lost', num(now)}, KEYS[1]) end
  redis.call('HSET', KEYS[1], 'state', 'quarantined', 'last_error', ARGV[3],
    'updated_at', num(now))
  redis.call('HDEL', KEYS[1], 'lease_until')
end
local entry = KEYS[2]
if redis.call('EXISTS', entry) == 1 then
  local attempts = math.max(tonumber(redis.call('HGET', entry, 'attempts')) or 0,
    tonumber(ARGV[5]))
  redis.call('HSET', entry, 'attempts', num(attempts), 'risk', ARGV[6], 'last_detail', ARGV[3],
    'updated_at', num(now))
  redis.call('HINCRBY', entry, 'seen', 1)
else
  redis.call('HSET', entry, 'id', ARGV[4], 'attempts', ARGV[5], 'risk', ARGV[6],
    'first_detail', ARGV[3], 'last_detail', ARGV[3], 'created_at', num(now),
    'updated_at', num(now), 'seen', '1')
  for i = 7, #ARGV, 2 do redis.call('HSET', entry, ARGV[i], ARGV[i + 1]) end
  redis.call('ZADD', KEYS[3], num(now), ARGV[4])
  redis.call('ZADD', KEYS[4], num(now), ARGV[4])
end
return with_hash({'ok', num(now)}, entry)
"""

# KEYS: completed index. ARGV: cutoff (us, exclusive), most to delete, most entries to examine.
# Reply: {deleted, exhausted (no older entries left), now}. Every examined entry leaves the index;
# only records still COMPLETED before the cutoff are deleted (an entry can be stale: its record
# expired, was deleted by hand, or was claimed again after expiring).
_PURGE = """
local now = now_us()
local cutoff = tonumber(ARGV[1])
local want, budget = tonumber(ARGV[2]), tonumber(ARGV[3])
local deleted, examined = 0, 0
while deleted < want and examined < budget do
  local batch = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', '0',
    num(math.min(want - deleted, budget - examined)))
  if #batch == 0 then return {num(deleted), '1', num(now)} end
  for _, key in ipairs(batch) do
    examined = examined + 1
    local rec = redis.call('HMGET', key, 'state', 'completed_at')
    if rec[1] == 'completed' and (tonumber(rec[2]) or cutoff) < cutoff then
      redis.call('DEL', key)
      deleted = deleted + 1
    end
    redis.call('ZREM', KEYS[1], key)
  end
end
return {num(deleted), '0', num(now)}
"""


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    text: bytes
    sha: str


def _script(name: str, body: str) -> _Script:
    text = (_PRELUDE + body).encode()
    return _Script(name, text, hashlib.sha1(text).hexdigest())


_SCRIPTS: Final = {
    s.name: s
    for s in (
        _script("claim", _CLAIM),
        _script("extend", _EXTEND),
        _script("complete", _COMPLETE),
        _script("release", _RELEASE),
        _script("quarantine", _QUARANTINE),
        _script("purge", _PURGE),
    )
}


# --------------------------------------------------------------------------- persistence


@dataclass(frozen=True, slots=True)
class RedisPersistence:
    """What the Redis server's persistence settings mean for the ledger (read by ``explain``).

    ``None`` fields are unknown (``CONFIG GET`` disabled or not permitted). ``can_back_claims`` is
    True only when a returned claim or completion is known to survive a crash of the Redis host.
    """

    appendonly: str | None
    appendfsync: str | None
    save: str | None
    maxmemory_policy: str | None
    can_back_claims: bool
    sentence: str

    @property
    def known(self) -> bool:
        return self.appendonly is not None


def assess_persistence(config: Mapping[str, str] | None) -> RedisPersistence:
    """Judge Redis persistence settings (``CONFIG GET`` values by name; ``None`` when unknown).

    Only ``appendonly yes`` with ``appendfsync always`` writes every claim to disk before Redis
    replies; ``everysec`` may lose about the last second on power loss; without AOF everything
    since the last RDB snapshot (or everything, with no snapshots) is lost on restart. Any
    ``maxmemory-policy`` other than ``noeviction`` may evict records under memory pressure.
    """
    if config is None or "appendonly" not in config:
        return RedisPersistence(
            None,
            None,
            None,
            None,
            False,
            "Redis persistence is unknown: CONFIG GET is disabled or not permitted on this "
            "server, so replaysafe cannot tell whether a claim survives a Redis restart; ask the "
            "server's operator (only appendonly yes with appendfsync always can back a claim).",
        )
    aof = config.get("appendonly", "").lower()
    fsync = config.get("appendfsync", "").lower()
    save = config.get("save")
    policy = config.get("maxmemory-policy")
    durable = False
    if aof == "yes" and fsync == "always":
        durable = True
        sentence = (
            "Redis appends every write to its AOF and fsyncs it before replying (appendonly yes, "
            "appendfsync always): a claim or completion that returned survives a crash or power "
            "loss of the Redis host (a failover to an asynchronous replica can still lose the "
            "latest writes)."
        )
    elif aof == "yes":
        how, window = {
            "everysec": ("once a second", "about the last second"),
            "no": ("when the OS flushes it", "the last ~30 seconds"),
        }.get(fsync, ("on an unknown schedule", "an unknown amount"))
        sentence = (
            f"Redis fsyncs its AOF {how} (appendonly yes, appendfsync {fsync or 'unknown'}): a "
            "crash of the Redis process loses nothing, but power loss or a kernel crash can lose "
            f"{window} of claims and completions (a lost completion makes its operation new "
            "again, a lost claim lets a second worker run it); set appendfsync always to back "
            "claims."
        )
    elif save:
        sentence = (
            f"Redis has no AOF (appendonly {aof or 'unknown'}) and only RDB snapshots (save "
            f"{save!r}): a restart loses every claim and completion since the last snapshot, and "
            "those operations become new again; set appendonly yes and appendfsync always."
        )
    else:
        sentence = (
            f"Redis keeps the ledger in memory only (appendonly {aof or 'unknown'}, no RDB "
            "snapshots): a restart forgets every claim and completion and every operation becomes "
            "new again; set appendonly yes and appendfsync always."
        )
    if policy is not None and policy.lower() != "noeviction":
        durable = False
        sentence += (
            f" maxmemory-policy {policy} may evict ledger records under memory pressure (an "
            "evicted completion makes its operation new again); set it to noeviction."
        )
    return RedisPersistence(
        config.get("appendonly"), config.get("appendfsync"), save, policy, durable, sentence
    )


# --------------------------------------------------------------------------- helpers


def _redis() -> ModuleType:
    """The redis package, imported on first use (the ``redis`` extra)."""
    try:
        import redis
        import redis.asyncio
        import redis.exceptions
    except ImportError as exc:
        raise MissingExtra("redis", "redis") from exc
    return redis


def redact_url(url: str) -> str:
    """``url`` with its password (userinfo or ``?password=``) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable redis url>"
    netloc = parts.netloc
    if password is not None:
        host = netloc.rpartition("@")[2]
        netloc = f"{parts.username or ''}:***@{host}"
    query = parts.query
    if "password" in query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _b(text: str) -> bytes:
    # surrogatepass: a str that Python can hold must never turn into a raw UnicodeEncodeError
    return text.encode("utf-8", "surrogatepass")


def _s(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "surrogatepass")


def _us(seconds: float, what: str) -> int:
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(f"{what} must be a finite number of seconds >= 0, got {seconds!r}")
    return round(seconds * _US)


def _pairs(flat: Sequence[Any]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _opt_time(h: Mapping[bytes, bytes], field: bytes) -> float | None:
    raw = h.get(field)
    return None if raw is None else int(raw) / _US


def _opt_str(h: Mapping[bytes, bytes], field: bytes) -> str | None:
    raw = h.get(field)
    return None if raw is None else _s(raw)


def _record(key: OpKey, h: Mapping[bytes, bytes]) -> Record | None:
    if b"state" not in h:
        return None
    return Record(
        key=key,
        fingerprint=_s(h[b"fingerprint"]),
        state=State(_s(h[b"state"])),
        token=int(h[b"token"]),
        owner=_opt_str(h, b"owner"),
        lease_until=_opt_time(h, b"lease_until"),
        attempts=int(h[b"attempts"]),
        result=_opt_str(h, b"result"),
        last_error=_opt_str(h, b"last_error"),
        created_at=int(h[b"created_at"]) / _US,
        updated_at=int(h[b"updated_at"]) / _US,
        completed_at=_opt_time(h, b"completed_at"),
    )


def _entry(h: Mapping[bytes, bytes]) -> QuarantineEntry:
    return QuarantineEntry(
        id=_s(h[b"id"]),
        scope=_s(h[b"scope"]),
        reason=QuarantineReason(_s(h[b"reason"])),
        operation_id=_opt_str(h, b"operation_id"),
        fingerprint=_opt_str(h, b"fingerprint"),
        risk=EffectRisk(_s(h[b"risk"])),
        attempts=int(h[b"attempts"]),
        first_detail=_s(h[b"first_detail"]),
        last_detail=_s(h[b"last_detail"]),
        message=h.get(b"message"),
        content_type=_opt_str(h, b"content_type"),
        created_at=int(h[b"created_at"]) / _US,
        updated_at=int(h[b"updated_at"]) / _US,
        seen=int(h[b"seen"]),
    )


_Call = tuple[Sequence[bytes], Sequence[bytes | str]]


# --------------------------------------------------------------------------- the ledger


class RedisLedger(Ledger):
    """The replay ledger in Redis (not transactional). See the module docstring for the design.

    ``url`` is a redis-py URL (``redis://[user:password@]host:port/db``, ``rediss://``,
    ``unix://``); its password never appears in ``repr``, logs or errors. Alternatively pass a
    ready ``client`` (a ``redis.asyncio.Redis`` with ``decode_responses=False``; the caller then
    owns and closes it). ``retention`` is the replay horizon in seconds: completed records expire
    that long after completion. Use one ``retention`` per ``prefix``.
    """

    transactional: ClassVar[bool] = False

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
        self._retention = float(retention)
        self._retention_ms = max(1, round(retention * 1000))
        self._password = None if url is None else _password_of(url)
        if client is None:
            assert url is not None
            self._display = redact_url(url)
            client = self._connect(url)
            self._owns_client = True
        else:
            kwargs = client.connection_pool.connection_kwargs
            if kwargs.get("decode_responses"):
                raise ConfigurationError(
                    "the redis client decodes responses (decode_responses=True); the ledger "
                    "stores raw bytes (quarantined message copies): pass a client created with "
                    "decode_responses=False"
                )
            self._display = (
                redact_url(url)
                if url is not None
                else f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/"
                f"{kwargs.get('db', 0)}"
            )
            self._owns_client = False
        self._client: Redis = client
        self._offset = 0.0  # server clock minus local clock, from the last script reply
        self._closed = False

    def _connect(self, url: str) -> Redis:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialWithJitterBackoff

        try:
            # Query options in the URL (socket_timeout, client_name, ...) override these.
            return Redis.from_url(
                url,
                decode_responses=False,
                client_name=CLIENT_NAME,
                socket_timeout=5.0,
                socket_connect_timeout=5.0,
                # a few quick retries after a dropped connection, then LedgerUnavailable: a dead
                # server must not stall a claim for long
                retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.5), 3),
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"{redact_url(url)!r} is not a usable Redis URL "
                f"({_scrub(str(exc), _password_of(url))}); use "
                "redis://[user:password@]host:port/db, rediss://... or unix:///path"
            ) from None

    # ------------------------------------------------------------------ properties

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def retention(self) -> float:
        """Seconds a completed record is remembered (the replay horizon this ledger can back)."""
        return self._retention

    def now(self) -> float:
        """An estimate of the Redis server's clock (what leases are judged by): the local clock
        plus the offset measured at the last script reply (error about half a round trip)."""
        return time.time() + self._offset

    def key_for(self, key: OpKey) -> bytes:
        """The Redis key of an operation's record (for operators and tests)."""
        scope = _b(key.scope)
        # the byte length of the scope makes the composite unambiguous whatever it contains
        return (
            self._p + b"op:" + str(len(scope)).encode() + b":" + scope + b":" + _b(key.operation_id)
        )

    def __repr__(self) -> str:
        closed = ", closed" if self._closed else ""
        return f"RedisLedger({self._display!r}, prefix={self._prefix!r}{closed})"

    # ------------------------------------------------------------------ ledger API

    async def claim(self, key: OpKey, fingerprint: str, owner: str, lease: float) -> ClaimOutcome:
        """Try to take the operation for ``lease`` seconds of Redis time (one script, atomic).

        Moves no boundary. If the reply is lost the claim may or may not exist: it then expires
        and the next claim takes over with ``recovered=True``.
        """
        req = ClaimRequest(key, fingerprint, owner, lease)
        reply = await self._eval(_SCRIPTS["claim"], *self._claim_call(req), what="claim")
        return self._claim_outcome(req, reply)

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        """Claim a batch in one round trip (a pipeline of claim scripts). Same outcomes, in request
        order, as calling :meth:`claim` for each request in order; each item is atomic on its own,
        the batch is not (another client's command may run between two items)."""
        if not requests:
            return []
        calls = [self._claim_call(r) for r in requests]
        replies = await self._eval_many(_SCRIPTS["claim"], calls, what="claim_many")
        return [self._claim_outcome(r, rep) for r, rep in zip(requests, replies, strict=True)]

    async def extend(self, claim: Claim, lease: float) -> Claim:
        """Push the lease to Redis ``TIME + lease``. Raises ``LeaseLost`` if the token is stale."""
        lease_us = _us(lease, "lease")
        reply = await self._eval(
            _SCRIPTS["extend"],
            [self.key_for(claim.key)],
            [str(claim.token), str(lease_us)],
            what="extend",
        )
        self._fence(claim, reply)
        return Claim(
            claim.key,
            claim.fingerprint,
            claim.token,
            claim.owner,
            int(reply[2]) / _US,
            claim.attempt,
            claim.recovered,
        )

    async def complete(self, claim: Claim, result: str | None = None) -> Record:
        """Record the effect as done (boundary EFFECTED for keyed/unkeyed effects) and start the
        record's retention TTL. Raises ``LeaseLost`` when the token is stale: then the caller must
        not complete at the broker. A lost reply may hide a completion that happened; the next
        claim then answers ``AlreadyDone``."""
        keys, args = self._complete_call(claim, result)
        reply = await self._eval(_SCRIPTS["complete"], keys, args, what="complete")
        return self._completed(claim, reply)

    async def complete_many(
        self, items: Sequence[tuple[Claim, str | None]]
    ) -> list[Record | LeaseLost]:
        """Complete a batch in one round trip. A stale claim yields its ``LeaseLost`` in place and
        does not stop the others."""
        if not items:
            return []
        calls = [self._complete_call(c, r) for c, r in items]
        replies = await self._eval_many(_SCRIPTS["complete"], calls, what="complete_many")
        out: list[Record | LeaseLost] = []
        for (claim, _), reply in zip(items, replies, strict=True):
            try:
                out.append(self._completed(claim, reply))
            except LeaseLost as exc:
                out.append(exc)
        return out

    async def release(self, claim: Claim, error: str | None = None) -> None:
        """Give the operation back (no effect happened); the next claim gets it at once."""
        reply = await self._eval(
            _SCRIPTS["release"],
            [self.key_for(claim.key)],
            [str(claim.token), "0" if error is None else "1", _b(error or "")],
            what="release",
        )
        self._fence(claim, reply)

    async def quarantine(
        self, request: QuarantineRequest, claim: Claim | None = None
    ) -> QuarantineEntry:
        """Record the entry (idempotent per ``request.entry_id()``) and, with ``claim``, move the
        record to QUARANTINED under fencing, in one script. Durable before the caller completes at
        the broker only as far as the server's persistence is (see :meth:`persistence_report`)."""
        eid = request.entry_id()
        fields: list[bytes | str] = ["scope", _b(request.scope), "reason", request.reason.value]
        for name, value in (
            ("operation_id", request.operation_id),
            ("fingerprint", request.fingerprint),
            ("content_type", request.content_type),
        ):
            if value is not None:
                fields += [name, _b(value)]
        message = request.capped_message()
        if message is not None:
            fields += ["message", message]
        op_key = OpKey(request.scope, request.operation_id or "") if claim is None else claim.key
        reply = await self._eval(
            _SCRIPTS["quarantine"],
            [
                self.key_for(op_key),
                self._p + b"q:" + eid.encode(),
                self._p + b"qidx",
                self._p + b"qidx:" + request.reason.value.encode(),
            ],
            [
                "0" if claim is None else "1",
                "0" if claim is None else str(claim.token),
                _b(request.detail),
                eid,
                str(request.attempts),
                request.risk.value,
                *fields,
            ],
            what="quarantine",
        )
        if claim is not None:
            self._fence(claim, reply)
        return _entry(_pairs(reply[2:]))

    async def get(self, key: OpKey) -> Record | None:
        h = await self._command("get", lambda: self._client.hgetall(self.key_for(key)))
        return _record(key, h)

    async def quarantined(
        self, *, reason: QuarantineReason | None = None, limit: int = 100
    ) -> list[QuarantineEntry]:
        """Quarantine entries, oldest first (two round trips: the index, then the entries)."""
        if limit <= 0:
            return []
        index = self._p + b"qidx" + (b"" if reason is None else b":" + reason.value.encode())
        ids = await self._command("quarantined", lambda: self._client.zrange(index, 0, limit - 1))
        if not ids:
            return []

        async def fetch() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for eid in ids:
                pipe.hgetall(self._p + b"q:" + eid)
            return list(await pipe.execute())

        hashes = await self._command("quarantined", fetch)
        # an entry deleted by hand between the two trips is skipped, not reported half-empty
        return [_entry(h) for h in hashes if h]

    async def purge(self, older_than: float, *, limit: int = 10_000) -> int:
        """Forget up to ``limit`` COMPLETED records completed before ``older_than``, oldest first.

        Completed records already expire by TTL at ``retention``; purge forgets them earlier. It
        walks the completed index in scripts of at most :data:`PURGE_CHUNK` deletions (so Redis is
        never blocked long) and drops stale index entries on the way. A purged operation is new
        again to the ledger: purge only what lies beyond the replay horizon.
        """
        if limit <= 0:
            return 0
        cutoff = str(math.ceil(older_than * _US))
        total = 0
        while total < limit:
            want = min(PURGE_CHUNK, limit - total)
            reply = await self._eval(
                _SCRIPTS["purge"],
                [self._p + b"completed"],
                [cutoff, str(want), str(2 * want)],
                what="purge",
            )
            total += int(reply[0])
            if reply[1] == b"1":
                break
        return total

    async def persistence_report(self) -> RedisPersistence:
        """Read the server's persistence settings (``CONFIG GET``) and say whether they can back a
        claim. A server that disables ``CONFIG`` gives an "unknown" report, not an error."""
        self._check_open()
        config: dict[str, str] = {}
        for name in ("appendonly", "appendfsync", "save", "maxmemory-policy"):
            try:
                reply = await self._client.config_get(name)
            except self._errors.ResponseError:  # CONFIG renamed away, or not allowed by ACL
                return assess_persistence(None)
            except self._errors.RedisError as exc:
                raise self._unavailable(exc, "persistence_report (CONFIG GET)", sent=False) from exc
            for k, v in dict(reply).items():
                if k is not None:
                    config[_s(k)] = "" if v is None else _s(v)
        return assess_persistence(config)

    async def close(self) -> None:
        """Close the connection pool (only when the ledger created it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            # closing the sockets of a dead server: nothing is left to release
            with contextlib.suppress(self._errors.RedisError):
                await self._client.aclose()

    # ------------------------------------------------------------------ calls

    def _claim_call(self, r: ClaimRequest) -> _Call:
        key = r.key
        return (
            [self.key_for(key), self._p + b"token"],
            [
                _b(key.scope),
                _b(key.operation_id),
                _b(r.fingerprint),
                _b(r.owner),
                str(_us(r.lease, "lease")),
            ],
        )

    def _complete_call(self, claim: Claim, result: str | None) -> _Call:
        return (
            [self.key_for(claim.key), self._p + b"completed"],
            [
                str(claim.token),
                "0" if result is None else "1",
                _b(result or ""),
                str(self._retention_ms),
            ],
        )

    def _claim_outcome(self, req: ClaimRequest, reply: list[Any]) -> ClaimOutcome:
        kind = reply[0]
        rec = _record(req.key, _pairs(reply[3:]))
        if rec is None:  # pragma: no cover - every claim reply carries the record
            raise LedgerError(f"claim on {req.key} returned no record; this is a replaysafe bug")
        if kind == b"acquired":
            assert rec.lease_until is not None
            return Acquired(
                Claim(
                    req.key,
                    req.fingerprint,
                    rec.token,
                    req.owner,
                    rec.lease_until,
                    rec.attempts,
                    reply[2] == b"1",
                )
            )
        if kind == b"in_flight":
            return InFlight(rec)
        if kind == b"already_done":
            return AlreadyDone(rec)
        if kind == b"conflict":
            return Conflict(rec)
        return Quarantined(rec)

    def _fence(self, claim: Claim, reply: list[Any]) -> None:
        """Raise ``LeaseLost`` (through ``check_fence``, one wording) for a refused fenced call."""
        if reply[0] == b"lease_lost":
            check_fence(_record(claim.key, _pairs(reply[2:])), claim)
            # check_fence found the claim current, yet the script refused it: never ignore that
            raise LedgerError(
                f"the Redis ledger refused claim token {claim.token} on {claim.key} although the "
                "record names it current; this is a replaysafe bug, please report it"
            )

    def _completed(self, claim: Claim, reply: list[Any]) -> Record:
        self._fence(claim, reply)
        rec = _record(claim.key, _pairs(reply[2:]))
        assert rec is not None
        return rec

    # ------------------------------------------------------------------ transport

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerUnavailable(f"{self!r} is closed; open a new RedisLedger to use it again")

    def _observe(self, server_now: bytes, sent_at: float) -> None:
        # the server read TIME somewhere inside the round trip: assume its middle
        self._offset = int(server_now) / _US - (sent_at + time.time()) / 2

    async def _load(self, script: _Script) -> None:
        sha = await self._client.script_load(script.text)
        if _s(sha) != script.sha:  # pragma: no cover - SHA1 is SHA1
            raise LedgerError(f"Redis returned SHA {sha!r} for the {script.name} script")

    async def _eval(
        self, script: _Script, keys: Sequence[bytes], args: Sequence[bytes | str], *, what: str
    ) -> list[Any]:
        self._check_open()
        sent = time.time()
        try:
            try:
                reply = await self._client.evalsha(script.sha, len(keys), *keys, *args)
            except self._errors.NoScriptError:
                # NOSCRIPT: the script did not run; load it (restart, failover, SCRIPT FLUSH)
                await self._load(script)
                reply = await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except self._errors.RedisError as exc:
            raise self._unavailable(exc, what, sent=True) from exc
        out = list(reply)
        self._observe(out[-1] if script.name == "purge" else out[1], sent)
        return out

    async def _eval_many(
        self, script: _Script, calls: list[_Call], *, what: str
    ) -> list[list[Any]]:
        """Run ``script`` once per call in one pipeline; replies in call order."""
        self._check_open()
        replies: list[list[Any] | None] = [None] * len(calls)
        pending = list(range(len(calls)))
        sent = time.time()
        for _ in range(2):
            pipe = self._client.pipeline(transaction=False)
            for i in pending:
                keys, args = calls[i]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                results = await pipe.execute(raise_on_error=False)
            except self._errors.RedisError as exc:
                raise self._unavailable(exc, what, sent=True, batch=True) from exc
            missing: list[int] = []
            for i, result in zip(pending, results, strict=True):
                if isinstance(result, self._errors.NoScriptError):
                    missing.append(i)  # did not run: run it again after loading the script
                elif isinstance(result, Exception):
                    raise self._unavailable(result, what, sent=True, batch=True) from result
                else:
                    replies[i] = list(result)
            if not missing:
                break
            try:
                await self._load(script)
            except self._errors.RedisError as exc:
                raise self._unavailable(exc, what, sent=True, batch=True) from exc
            pending = missing
        else:
            raise LedgerUnavailable(
                f"Redis at {self._display} lost the {script.name} script again right after it "
                f"was loaded ({what}); items before it in the batch may have been applied; "
                "check for repeated SCRIPT FLUSH or failovers, then retry"
            )
        done = [r for r in replies if r is not None]
        self._observe(done[-1][1], sent)
        return done

    async def _command(self, what: str, call: Any) -> Any:
        """A plain read (no script): errors are mapped, nothing can have been half-applied."""
        self._check_open()
        try:
            return await call()
        except self._errors.RedisError as exc:
            raise self._unavailable(exc, what, sent=False) from exc

    def _unavailable(
        self, exc: BaseException, what: str, *, sent: bool, batch: bool = False
    ) -> LedgerError | ConfigurationError:
        """Map a redis-py error to the replaysafe tree: what happened, what to do next."""
        e = self._errors
        text = _scrub(f"{type(exc).__name__}: {exc}", self._password)
        where = f"Redis ledger at {self._display}: {what} failed ({text})"
        if isinstance(exc, e.ResponseError) and str(exc).startswith("WRONGTYPE"):
            return ConfigurationError(
                f"{where}; a key under prefix {self._prefix!r} holds a value the ledger did not "
                "write: another program uses this prefix; give the ledger a prefix of its own"
            )
        if isinstance(exc, e.AuthenticationError | e.AuthorizationError | e.NoPermissionError):
            hint = (
                "check the URL's username and password and the user's ACL (the ledger needs "
                "EVALSHA, SCRIPT LOAD, HGETALL, ZRANGE and, for explain, CONFIG GET), then retry"
            )
        elif isinstance(exc, e.BusyLoadingError):
            hint = "Redis is loading its dataset after a restart; retry in a moment"
        elif isinstance(exc, e.ReadOnlyError):
            hint = (
                "the server is a read-only replica (after a failover?); point the ledger at the "
                "primary, then retry"
            )
        elif isinstance(exc, e.OutOfMemoryError):
            hint = (
                "Redis reached maxmemory and refuses writes (the ledger wants noeviction rather "
                "than losing records); free memory or raise maxmemory, then retry"
            )
        elif isinstance(exc, e.ResponseError) and str(exc).startswith("MISCONF"):
            hint = "Redis cannot persist to disk and refuses writes; fix its disk, then retry"
        else:
            hint = "check that Redis is running and reachable, then retry"
        lost = isinstance(exc, e.ConnectionError | e.TimeoutError) and not isinstance(
            exc, e.AuthenticationError | e.AuthorizationError | e.BusyLoadingError
        )
        if sent and lost:
            hint += (
                "; the reply was lost, so the script may or may not have run"
                + (" (for any item of the batch)" if batch else "")
                + ": an unknown claim expires with its lease and the next claim reports "
                "recovered=True; an unknown completion shows as AlreadyDone to the next claim; "
                "do not complete at the broker"
            )
        elif batch:
            hint += "; items before the failing one in the batch may have been applied"
        return LedgerUnavailable(f"{where}; {hint}")


def _password_of(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return None
    if password is None:
        password = dict(parse_qsl(parts.query)).get("password")
    return password or None


def _scrub(text: str, secret: str | None) -> str:
    """Remove ``secret`` (a password) from a driver's message, just in case it quotes it."""
    if secret is None or secret not in text:
        return text
    return text.replace(secret, "***")
