"""The Redis store: the replay ledger in Lua scripts on one Redis server (redis-py asyncio).

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
- **Fencing tokens come from one counter** (``<prefix>token``), advanced inside the claim script
  (read once, written once per script), so they strictly increase across the whole ledger (every
  scope, every process).
- **Scripts are loaded once and called with ``EVALSHA``**; after ``NOSCRIPT`` (a Redis restart,
  failover or ``SCRIPT FLUSH``) the script is loaded again and the call repeated, which is safe
  because a ``NOSCRIPT`` reply means the script did not run.
- **A batch is one script call per chunk.** ``claim_many`` and ``complete_many`` send all items
  of a chunk (at most :data:`BATCH_CHUNK`) to ONE script call, which loops over them with exactly
  the per-item semantics of a single call, in request order (a key repeated in a batch sees what
  the earlier item wrote). ``claim`` and ``complete`` are batches of one. A chunk is atomic; a
  batch of several chunks is not. Requests and replies are packed compactly (see the scripts),
  because at batch sizes of ~100 the cost per item, not per round trip, is what limits.
- **One codec, two transports.** What each claim-path call sends (keys, packed request) and how
  its reply becomes outcomes lives in ``_Codec``, without I/O. :class:`RedisLedger` sends the
  calls with ``redis.asyncio``; its sync twin :class:`SyncRedisLedger` (``RedisLedger.sync()``,
  for plain threads) sends the very same calls with ``redis.Redis`` in the caller's thread, with
  the same timeouts, retries, ``NOSCRIPT`` reload and error mapping.

- **Admin calls are off the hot path.** ``redrive`` and ``purge_quarantine`` are scripts like
  the transitions (redrive: one atomic script; purge: chunked scripts that keep the quarantine
  indexes consistent); ``summary`` SCANs every record key (O(records), pipelined in bounded
  chunks), so the claim and complete scripts maintain no counters for it.

Keys, all under ``prefix`` (default ``rs:``)::

    <prefix>token                         string  last fencing token issued
    <prefix>op:<n>:<scope>:<operation_id> hash    one operation record; <n> = len(scope) in
                                                  UTF-8 bytes, so ("a:b", "c") and ("a", "b:c")
                                                  can never share a key
    <prefix>completions                   list    "<completed_at>:<record key>" in completion
                                                  order (for purge)
    <prefix>q:<entry id>                  hash    one quarantine entry
    <prefix>qidx                          zset    entry ids by created_at (oldest first)
    <prefix>qidx:<reason>                 zset    the same, per reason
    <prefix>paused                        hash    paused handlers: handler name -> JSON
                                                  {"reason", "by", "since_us"} (Redis TIME)

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

Where each part lives: :mod:`.scripts` (the Lua), :mod:`.codec` (keys and packed requests),
:mod:`.decode` (replies), :mod:`.errors` (redis-py errors mapped), :mod:`.connection` (driver
and clients), :mod:`.base` (shared state and the async transport), one module per ledger role
(:mod:`.claims`, :mod:`.quarantine`, :mod:`.controls`, :mod:`.admin`), the composed
:class:`RedisLedger` in :mod:`.ledger` and its sync twin in :mod:`.sync`. Redis keeps no outbox
here (a Redis ledger is not transactional).
"""

from __future__ import annotations

from replaysafe.ledger.durability import RedisPersistence, assess_persistence
from replaysafe.stores.redis.admin import MEMORY_SAMPLE, SUMMARY_CHUNK
from replaysafe.stores.redis.codec import BATCH_BYTES, BATCH_CHUNK
from replaysafe.stores.redis.connection import CLIENT_NAME
from replaysafe.stores.redis.ledger import RedisLedger
from replaysafe.stores.redis.scripts import PURGE_CHUNK
from replaysafe.stores.redis.sync import SyncRedisLedger

__all__ = [
    "BATCH_BYTES",
    "BATCH_CHUNK",
    "CLIENT_NAME",
    "MEMORY_SAMPLE",
    "PURGE_CHUNK",
    "SUMMARY_CHUNK",
    "RedisLedger",
    "RedisPersistence",
    "SyncRedisLedger",
    "assess_persistence",
]
