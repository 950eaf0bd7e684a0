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
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import math
import re
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, NamedTuple, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from replaysafe._url import take_options
from replaysafe.errors import (
    CapabilityError,
    ConfigurationError,
    LeaseLost,
    LedgerDataError,
    LedgerError,
    LedgerUnavailable,
    MissingExtra,
)
from replaysafe.ledger._fast import new_acquired, new_claim, new_record
from replaysafe.ledger.base import (
    AlreadyDone,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    Conflict,
    InFlight,
    LedgerBackend,
    LedgerSummary,
    OpKey,
    PauseState,
    Quarantined,
    QuarantineEntry,
    QuarantineRequest,
    Record,
    State,
    check_fence,
    check_handler_name,
    pause_text,
    storable_text,
    unknown_entry,
)
from replaysafe.ledger.durability import Durability, RedisPersistence, assess_persistence
from replaysafe.quarantine import EffectRisk, QuarantineReason

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisLedger", "RedisPersistence", "SyncRedisLedger", "assess_persistence"]

_T = TypeVar("_T")

#: how Redis words an error raised inside a Lua script (7.x: "user_script:12: …" or "… on
#: @user_script:12."; 6.x: "Error running script …"), as opposed to a reply about its own state
_LUA_ERROR: Final = re.compile(r"user_script:\d+|Error running script")
#: an error code redis-py keeps in the message (it strips only the codes it maps to a class, ERR
#: among them): MISCONF, NOREPLICAS, BUSY … say the server cannot write now, whatever the data
_STATE_CODE: Final = re.compile(r"[A-Z]{2,} ")

#: the name the ledger's connections carry in ``CLIENT LIST`` unless the URL sets ``client_name``
CLIENT_NAME: Final = "replaysafe-ledger"
#: most records one purge script deletes before yielding the server to other clients
PURGE_CHUNK: Final = 1_000
#: most items one claim or complete script handles (one round trip each): bounds how long one
#: script blocks the server (a few ms) and the size of its request
BATCH_CHUNK: Final = 500
#: a chunk also ends once its keys and packed items pass this many bytes (large results)
BATCH_BYTES: Final = 1 << 20
#: most scopes (and owner/lease tails) whose packed form a ledger keeps between calls
_PACKED_MAX: Final = 4096
#: summary(): keys asked of one SCAN call, and record hashes read per pipelined round trip
SUMMARY_CHUNK: Final = 1_000
#: summary(): record hashes whose MEMORY USAGE is measured to estimate ``approx_bytes``
MEMORY_SAMPLE: Final = 64
#: the record fields summary() reads (HMGET, in this order)
_SUMMARY_FIELDS: Final = (
    "state", "attempts", "lease_until", "updated_at", "completed_at", "scope", "operation_id",
)  # fmt: skip

#: a record's key: prefix, "op:", the scope's byte length, scope, ":", operation id (key_for)
_KEY_HEAD: Final = b"%bop:%d:%b:"
#: packers for the scripts' requests (Lua struct "I4" and "d": little-endian)
_U32: Final = struct.Struct("<I").pack
_F64: Final = struct.Struct("<d").pack

_US: Final = 1_000_000  # microseconds per second: times are integer microseconds in Redis

# --------------------------------------------------------------------------- Lua scripts
# Numbers are always formatted with num() before they reach redis.call or a string: Lua's default
# number-to-string conversion keeps only 14 digits, which would round microsecond timestamps. A
# number returned in a reply becomes an exact integer reply (all of them are integers < 2^53).

_PRELUDE = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- integers (all below 2^53) as decimal strings: '%d' formats through a C long, exact and ~3x
-- faster than '%.0f' where a long has 64 bits (checked here); '%.0f' elsewhere
local INT = string.format('%d', 2^53) == '9007199254740992' and '%d' or '%.0f'
local function num(n) return string.format(INT, n) end
local function with_hash(head, key)
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat do head[#head + 1] = flat[i] end
  return head
end
local function malformed(script)
  -- the Python side packs every request: one it cannot parse is a replaysafe bug
  return redis.error_reply('ERR replaysafe bug: malformed ' .. script .. ' request')
end
local function failed(err)
  -- what pcall caught: a redis.call error (WRONGTYPE ...) as a string, or a table in some versions
  if type(err) == 'table' then err = err.err end
  return redis.error_reply(tostring(err))
end
local function current(key, token)
  local cur = redis.call('HMGET', key, 'state', 'token')
  return cur[1] == 'in_flight' and cur[2] == token
end
"""

# claim and complete take a whole batch per call (a single call is a batch of one). Every item
# mirrors the single-operation transition exactly (claim: ledger.base.decide_claim line by line;
# complete: check_fence), in request order: a key repeated in a batch sees what the earlier item
# wrote, as a second call would. One TIME read serves the batch: the script runs atomically, so
# no other client can observe an instant between two of its items. The request is unpacked in
# full before anything is written, so a malformed request (a replaysafe bug) writes nothing.
# Items are packed with Lua's struct library: "I4c0" is a 4-byte little-endian length followed by
# that many bytes, so values are arbitrary bytes.

# KEYS: token counter, then one record key per item.
# ARGV[1]: per item "<I4c0I4c0I4c0I4c0dB": scope, operation_id, fingerprint, owner, lease (us),
# marks_start (0|1).
# Reply: {now, item...} in request order. A new operation acquired (attempt 1): its token, an
# integer. Acquired after a release or an expired lease: {token, attempts, recovered (0|1),
# previous_started (0|1)}. Any other outcome: {outcome, record field, value, ...}.
# marks_start: the field 'unstarted_attempt' holds the claim's attempt until mark_started
# deletes it; a takeover reads it before writing its own (ledger.base.previous_started).
# Tokens: the counter is read once and written once (INCRBY the number issued), not INCR per
# item; the only call that can fail after a write (WRONGTYPE on a foreign key under the prefix)
# is the read of a record, so the item loop runs under ONE pcall (not redis.pcall per item,
# which costs ~0.5 us more per item) and the counter is written before the error is returned:
# a token is never issued twice.
_CLAIM = """
local now = now_us()
local snow = num(now)
local n = #KEYS - 1
local req, pos = {}, 1
local parsed = pcall(function()
  for i = 0, n - 1 do
    local j = i * 6
    req[j + 1], req[j + 2], req[j + 3], req[j + 4], req[j + 5], req[j + 6], pos =
      struct.unpack('<I4c0I4c0I4c0I4c0dB', ARGV[1], pos)
  end
end)
if not parsed or pos ~= #ARGV[1] + 1 then return malformed('claim') end
-- the counter is checked before anything is written: absent, or what INCRBY accepts (digits)
local raw = redis.call('GET', KEYS[1]) or '0'
if not string.match(raw, '^%-?%d+$') then
  return redis.error_reply('WRONGTYPE the fencing token counter holds something else')
end
local first = tonumber(raw)
local last = first
local function flush()
  if last > first then redis.call('INCRBY', KEYS[1], last - first) end
end
local until_for = {}  -- lease -> lease_until string: a batch usually has one lease
local out = {now}
local ok, err = pcall(function()
  for i = 1, n do
    local key, j = KEYS[i + 1], (i - 1) * 6
    local fp, owner, lease, marks = req[j + 3], req[j + 4], req[j + 5], req[j + 6]
    local cur = redis.call('HMGET', key, 'state', 'fingerprint', 'lease_until', 'attempts',
      'unstarted_attempt')
    local state = cur[1]
    local lease_until = until_for[lease]
    if not lease_until then
      lease_until = num(now + lease)
      until_for[lease] = lease_until
    end
    if not state then
      last = last + 1
      redis.call('HSET', key, 'scope', req[j + 1], 'operation_id', req[j + 2], 'fingerprint', fp,
        'state', 'in_flight', 'token', num(last), 'owner', owner, 'lease_until', lease_until,
        'attempts', '1', 'created_at', snow, 'updated_at', snow)
      if marks == 1 then redis.call('HSET', key, 'unstarted_attempt', '1') end
      out[i + 1] = last
    elseif cur[2] ~= fp then out[i + 1] = with_hash({'conflict'}, key)
    elseif state == 'completed' then out[i + 1] = with_hash({'already_done'}, key)
    elseif state == 'quarantined' then out[i + 1] = with_hash({'quarantined'}, key)
    elseif state == 'in_flight' and (tonumber(cur[3]) or 0) > now then
      out[i + 1] = with_hash({'in_flight'}, key)
    else
      -- released, or in flight with an expired lease (the previous attempt's outcome is unknown)
      local recovered, previous_started = 0, 1
      if state == 'in_flight' then
        recovered = 1
        if cur[5] and tonumber(cur[5]) == tonumber(cur[4]) then previous_started = 0 end
      end
      last = last + 1
      local attempts = (tonumber(cur[4]) or 0) + 1
      redis.call('HSET', key, 'state', 'in_flight', 'token', num(last), 'owner', owner,
        'lease_until', lease_until, 'attempts', num(attempts), 'updated_at', snow)
      -- a takeover of an attempt that may have started stays "may have started" (decide_claim)
      if marks == 1 and (recovered == 0 or previous_started == 0) then
        redis.call('HSET', key, 'unstarted_attempt', num(attempts))
        redis.call('HDEL', key, 'result', 'completed_at')
      else
        redis.call('HDEL', key, 'result', 'completed_at', 'unstarted_attempt')
      end
      redis.call('PERSIST', key)
      out[i + 1] = {last, attempts, recovered, previous_started}
    end
  end
end)
flush()
if not ok then return failed(err) end
return out
"""

# KEYS: one record key per item. ARGV[1]: per item "<I4c0": token (decimal). Reply: {now,
# item...} in request order: 1 when the claim is current (its 'unstarted_attempt' deleted), or
# {'lease_lost', record field, value, ...} (nothing written for it).
_MARK_STARTED = """
local now = now_us()
local n = #KEYS
local req, pos = {}, 1
local parsed = pcall(function()
  for i = 1, n do req[i], pos = struct.unpack('<I4c0', ARGV[1], pos) end
end)
if not parsed or pos ~= #ARGV[1] + 1 then return malformed('mark_started') end
local out = {now}
local ok, err = pcall(function()
  for i = 1, n do
    if current(KEYS[i], req[i]) then
      redis.call('HDEL', KEYS[i], 'unstarted_attempt')
      out[i + 1] = 1
    else
      out[i + 1] = with_hash({'lease_lost'}, KEYS[i])
    end
  end
end)
if not ok then return failed(err) end
return out
"""

# KEYS: record. ARGV: token, lease (us). Reply: {'ok', now, lease_until} or {'lease_lost', ...}.
_EXTEND = """
local now = now_us()
if not current(KEYS[1], ARGV[1]) then return with_hash({'lease_lost', num(now)}, KEYS[1]) end
local lease_until = num(now + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'lease_until', lease_until)
return {'ok', num(now), lease_until}
"""

# KEYS: completion log, then one record key per item.
# ARGV[1]: retention (ms). ARGV[2]: per item "<I4c0BI4c0": token (decimal), has result (0|1),
# result. Reply: {now, item...} in request order; completed: created_at (an integer), or
# {created_at, last_error} when an earlier attempt left an error; a stale token (nothing
# written): {'lease_lost', field, value...}. Owner, fingerprint and attempts are not returned:
# with the token current they are the ones the claim that issued it wrote (only a claim, which
# issues a new token, rewrites them), so the caller takes them from its Claim. A completed record
# keeps no 'unstarted_attempt' (the attempt it marked is over), so the record returned (None
# there) is the one stored.
# The completion log is a list of "<completed_at>:<record key>" in completion order (appending is
# O(1); a sorted set by time cost several microseconds per insert at millions of entries). One
# RPUSH per script appends the whole batch's entries, also when an item fails midway (the loop
# runs under pcall), so every completed record is in the log.
_COMPLETE = """
local now = now_us()
local snow = num(now)
local n = #KEYS - 1
local req, pos = {}, 1
local parsed = pcall(function()
  for i = 0, n - 1 do
    local j = i * 3
    req[j + 1], req[j + 2], req[j + 3], pos = struct.unpack('<I4c0BI4c0', ARGV[2], pos)
  end
end)
if not parsed or pos ~= #ARGV[2] + 1 then return malformed('complete') end
local out, log = {now}, {}
local ok, err = pcall(function()
  for i = 1, n do
    local key, j = KEYS[i + 1], (i - 1) * 3
    local cur = redis.call('HMGET', key, 'state', 'token', 'created_at', 'last_error')
    if cur[1] ~= 'in_flight' or cur[2] ~= req[j + 1] then
      out[i + 1] = with_hash({'lease_lost'}, key)
    else
      if req[j + 2] == 1 then
        redis.call('HSET', key, 'state', 'completed', 'updated_at', snow, 'completed_at', snow,
          'result', req[j + 3])
        redis.call('HDEL', key, 'lease_until', 'unstarted_attempt')
      else
        redis.call('HSET', key, 'state', 'completed', 'updated_at', snow, 'completed_at', snow)
        redis.call('HDEL', key, 'lease_until', 'result', 'unstarted_attempt')
      end
      redis.call('PEXPIRE', key, ARGV[1])
      log[#log + 1] = snow .. ':' .. key
      if cur[4] then
        out[i + 1] = {tonumber(cur[3]), cur[4]}
      else
        out[i + 1] = tonumber(cur[3])
      end
    end
  end
end)
if #log > 0 then
  redis.call('RPUSH', KEYS[1], unpack(log))
  -- log entries older than the retention point at records their TTL already removed: drop them
  -- from the head, at most 2n per call (more than this call added, so a backlog shrinks)
  -- (an entry that does not parse counts as old: it must never fail a completion)
  local function stamp(entry) return tonumber(string.match(entry, '^(%d+):')) or 0 end
  local limit = now - tonumber(ARGV[1]) * 1000
  local head = redis.call('LINDEX', KEYS[1], 0)
  if head and stamp(head) < limit then
    local old = redis.call('LRANGE', KEYS[1], 0, 2 * n - 1)
    local k = 0
    while k < #old and stamp(old[k + 1]) < limit do k = k + 1 end
    redis.call('LTRIM', KEYS[1], k, -1)
  end
end
if not ok then return failed(err) end
return out
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

# KEYS: completion log. ARGV: cutoff (us, exclusive), most to delete, most entries to examine.
# Reply: {deleted, exhausted (no older entries left), now}. Walks the log from its head (oldest
# first) and stops at the first entry at or after the cutoff; every examined entry leaves the log.
# A record is deleted only when the entry is its current completion (same completed_at) and it is
# still COMPLETED: an entry can be stale (its record expired, was deleted by hand, or was claimed
# again after expiring and has a newer entry further on).
_PURGE = """
local now = now_us()
local cutoff = tonumber(ARGV[1])
local want, budget = tonumber(ARGV[2]), tonumber(ARGV[3])
local deleted, examined = 0, 0
while deleted < want and examined < budget do
  local batch = redis.call('LRANGE', KEYS[1], 0, math.min(want - deleted, budget - examined) - 1)
  if #batch == 0 then return {num(deleted), '1', num(now)} end
  local popped, newer = 0, false
  for _, entry in ipairs(batch) do
    local at, key = string.match(entry, '^(%d+):(.*)$')
    if at and tonumber(at) >= cutoff then
      newer = true
      break
    end
    popped = popped + 1
    local rec = at and redis.call('HMGET', key, 'state', 'completed_at') or {}
    if rec[1] == 'completed' and rec[2] == at then
      redis.call('DEL', key)
      deleted = deleted + 1
      if deleted == want then break end
    end
  end
  examined = examined + popped
  redis.call('LTRIM', KEYS[1], popped, -1)
  if newer then return {num(deleted), '1', num(now)} end
end
return {num(deleted), '0', num(now)}
"""


# KEYS: entry, then the operation's record when the entry names an operation. Reply: {'unknown',
# now} for an entry that does not exist (nothing written), else {'ok', now, entry field, value...}.
# The record key comes from the caller, which read the entry's scope and operation id first: an
# entry id is a hash of its scope and operation id, so whatever entry holds that id now names the
# same record. A QUARANTINED record becomes RELEASED with attempts 0 (a full retry budget for the
# republished copy); any other state (completed, in flight, released) is left as it is.
_REDRIVE = """
local now = now_us()
local snow = num(now)
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown', snow} end
if KEYS[2] and redis.call('HGET', KEYS[2], 'state') == 'quarantined' then
  redis.call('HSET', KEYS[2], 'state', 'released', 'attempts', '0', 'updated_at', snow)
  redis.call('HDEL', KEYS[2], 'lease_until', 'unstarted_attempt')
end
redis.call('HSET', KEYS[1], 'redriven_at', snow, 'updated_at', snow)
redis.call('HINCRBY', KEYS[1], 'redrives', 1)
return with_hash({'ok', snow}, KEYS[1])
"""

# KEYS: the index to purge from (qidx, or qidx:<reason> when filtering by reason), then qidx.
# ARGV: prefix, highest score ('+inf' or '(<cutoff us>', exclusive), most to delete, by ids (0|1),
# then the ids (oldest first) when by ids. Without ids the oldest index members up to the cutoff
# are taken. Reply: {deleted, members examined, now}. An entry leaves its hash, qidx and its
# reason's index together, so the indexes never name a purged entry; an index member whose hash
# is already gone (deleted by hand) is dropped from the indexes and not counted. The entry's
# hash, not the key, is read for its reason: keys outside KEYS are built from the prefix, as in
# the purge script (the ledger is single-node by design, see the module docstring).
_PURGE_QUARANTINE = """
local now = now_us()
local idx, all, prefix = KEYS[1], KEYS[2], ARGV[1]
local cutoff = math.huge
if ARGV[2] ~= '+inf' then cutoff = tonumber(string.sub(ARGV[2], 2)) end
local want = tonumber(ARGV[3])
local ids = {}
if ARGV[4] == '1' then
  for i = 5, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGEBYSCORE', idx, '-inf', ARGV[2], 'LIMIT', 0, want)
end
local deleted = 0
for _, id in ipairs(ids) do
  if deleted >= want then break end
  local score = tonumber(redis.call('ZSCORE', idx, id))
  if score and score < cutoff then
    local entry = prefix .. 'q:' .. id
    local reason = redis.call('HGET', entry, 'reason')
    deleted = deleted + redis.call('DEL', entry)
    redis.call('ZREM', all, id)
    if idx ~= all then redis.call('ZREM', idx, id) end
    if reason then redis.call('ZREM', prefix .. 'qidx:' .. reason, id) end
  end
end
return {num(deleted), num(#ids), num(now)}
"""


# Handler control. KEYS: the paused hash. ARGV: handler, '1' to pause / '0' to resume, reason,
# by. The pause time is Redis TIME. Reply: {now}.
_SET_PAUSED = """
local now = now_us()
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1],
             cjson.encode({reason = ARGV[3], by = ARGV[4], since_us = num(now)}))
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return {num(now)}
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
        _script("mark_started", _MARK_STARTED),
        _script("complete", _COMPLETE),
        _script("release", _RELEASE),
        _script("quarantine", _QUARANTINE),
        _script("purge", _PURGE),
        _script("redrive", _REDRIVE),
        _script("purge_quarantine", _PURGE_QUARANTINE),
        _script("set_paused", _SET_PAUSED),
    )
}


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


def _glob_escape(raw: bytes) -> bytes:
    """``raw`` as a literal in a ``SCAN MATCH`` pattern (a prefix may contain glob characters)."""
    out = bytearray()
    for c in raw:
        if c in b"*?[]\\":
            out += b"\\"
        out.append(c)
    return bytes(out)


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
        unstarted_attempt=int(h[b"unstarted_attempt"]) if b"unstarted_attempt" in h else None,
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
        published_at=_opt_time(h, b"published_at"),
        # entries written before message_size was kept: the copy is all that is known
        message_size=int(h.get(b"message_size") or len(h.get(b"message") or b"")),
        redriven_at=_opt_time(h, b"redriven_at"),
        redrives=int(h.get(b"redrives") or 0),
    )


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


def _refused_claim(key: OpKey, kind: bytes, item: Sequence[Any]) -> ClaimOutcome:
    """The outcome of a claim the script did not grant: ``item`` = {kind, field, value, ...}."""
    rec = _record(key, _pairs(item[1:]))
    if rec is None:  # pragma: no cover - every refused claim carries the record
        raise LedgerError(f"claim on {key} returned no record; this is a replaysafe bug")
    if kind == b"in_flight":
        return InFlight(rec)
    if kind == b"already_done":
        return AlreadyDone(rec)
    if kind == b"conflict":
        return Conflict(rec)
    return Quarantined(rec)


# --------------------------------------------------------------------------- requests and replies


class _Call(NamedTuple, Generic[_T]):
    """One script call, as a value: the keys and arguments to send (packed) and how to read its
    reply (``decode``). The codec builds them; a transport (async or sync) sends them."""

    script: _Script
    keys: Sequence[bytes]
    args: Sequence[bytes | str]
    decode: Callable[[list[Any]], _T]
    #: the call's name in errors
    what: str
    #: where Redis TIME is in the reply
    now_at: int = 1
    #: several items (errors then say "any item of the batch") or one
    batch: bool = False


def _as_is(reply: list[Any]) -> list[Any]:
    """The decode of a call whose caller reads the raw reply itself (the admin scripts)."""
    return reply


def _fence(claim: Claim, reply: Sequence[Any], *, fields_at: int = 2) -> None:
    """Raise ``LeaseLost`` (through ``check_fence``, one wording) for a refused fenced call:
    ``reply[0] == b'lease_lost'``, the record's fields and values from ``reply[fields_at]``."""
    if reply[0] == b"lease_lost":
        check_fence(_record(claim.key, _pairs(reply[fields_at:])), claim)
        # check_fence found the claim current, yet the script refused it: never ignore that
        raise LedgerError(
            f"the Redis ledger refused claim token {claim.token} on {claim.key} although the "
            "record names it current; this is a replaysafe bug, please report it"
        )


def _claim_outcomes(
    requests: Sequence[ClaimRequest], lease_us: Mapping[float, int], reply: list[Any]
) -> list[ClaimOutcome]:
    """The outcomes of one claim script reply (``reply[0]`` Redis TIME, then one item per
    request, in order; see ``_CLAIM``)."""
    # lease_until exactly as the script stored it: integer us (now + lease), / 1e6
    until = {lease: (reply[0] + us) / _US for lease, us in lease_us.items()}
    out: list[ClaimOutcome] = []
    for r, item in zip(requests, reply[1:], strict=True):
        if type(item) is int:  # a new operation acquired: its token
            claim = new_claim(r.key, r.fingerprint, item, r.owner, until[r.lease], 1, False, True)
            out.append(new_acquired(claim))
        elif type(item[0]) is int:  # {token, attempts, recovered, previous_started}
            claim = new_claim(
                r.key, r.fingerprint, item[0], r.owner, until[r.lease], item[1],
                item[2] == 1, item[3] == 1,
            )  # fmt: skip
            out.append(new_acquired(claim))
        else:
            out.append(_refused_claim(r.key, item[0], item))
    return out


def _completions(
    items: Sequence[tuple[Claim, str | None]], reply: list[Any]
) -> list[Record | LeaseLost]:
    """The results of one complete script reply (``reply[0]`` Redis TIME, then one item per
    request, in order; see ``_COMPLETE``)."""
    now = reply[0] / _US
    completed = State.COMPLETED
    out: list[Record | LeaseLost] = []
    for (claim, result), item in zip(items, reply[1:], strict=True):
        # completed: created_at, or {created_at, last_error}; the fingerprint, owner and
        # attempts are the claim's (the token was current, see the script); the result is what
        # the script stored, byte for byte
        if type(item) is int:
            error, created = None, item
        elif type(item[0]) is int:
            error, created = item[1].decode("utf-8", "surrogatepass"), item[0]
        else:
            try:
                _fence(claim, item, fields_at=1)
            except LeaseLost as exc:
                out.append(exc)
            continue
        record = new_record(
            claim.key, claim.fingerprint, completed, claim.token, claim.owner, None,
            claim.attempt, result, error, created / _US, now, now, None,
        )  # fmt: skip
        out.append(record)
    return out


def _marked(claims: Sequence[Claim], reply: list[Any]) -> list[Claim | LeaseLost]:
    """The results of one mark_started script reply (see ``_MARK_STARTED``)."""
    out: list[Claim | LeaseLost] = []
    for c, item in zip(claims, reply[1:], strict=True):
        if type(item) is int:
            out.append(c)
            continue
        try:
            _fence(c, item, fields_at=1)
        except LeaseLost as exc:
            out.append(exc)
    return out


def _extended(claim: Claim, reply: list[Any]) -> Claim:
    _fence(claim, reply)
    return Claim(
        claim.key, claim.fingerprint, claim.token, claim.owner, int(reply[2]) / _US,
        claim.attempt, claim.recovered, claim.previous_started,
    )  # fmt: skip


class _Codec:
    """What a Redis ledger sends and how it reads the replies, without any I/O.

    :class:`RedisLedger` (redis.asyncio) and :class:`SyncRedisLedger` (redis.Redis) hold the same
    codec and differ only in how they send a :class:`_Call`: every key, every packed request,
    every reply decoding and the mapping of redis-py errors to replaysafe's exist here once (the
    Lua exists once in the scripts above). Immutable after construction, so both ledgers and any
    number of threads may use one (its packing caches aside, which only ever hold what their
    key determines)."""

    __slots__ = (
        "_scopes", "_tails", "display", "errors", "p", "password", "prefix", "retention",
        "retention_ms",
    )  # fmt: skip

    def __init__(
        self, prefix: str, retention: float, display: str, password: str | None, errors: Any
    ) -> None:
        self.prefix = prefix
        self.p = _b(prefix)
        self.retention = float(retention)
        self.retention_ms = max(1, round(retention * 1000))
        self.display = display  # the URL with its password redacted
        self.password = password  # scrubbed from every error message
        self.errors = errors  # redis.exceptions
        # a worker's scopes, owner and lease repeat across calls: each is encoded and packed once
        # (scope -> (record key head, packed scope); (owner, lease, marks_start) -> packed tail).
        # Each value depends on its key alone, so threads racing on one only compute it twice.
        self._scopes: dict[str, tuple[bytes, bytes]] = {}
        self._tails: dict[tuple[str, float, bool], bytes] = {}

    # ------------------------------------------------------------------ keys

    def key_for(self, key: OpKey) -> bytes:
        scope = _b(key.scope)
        # the byte length of the scope makes the composite unambiguous whatever it contains
        return _KEY_HEAD % (self.p, len(scope), scope) + _b(key.operation_id)

    def entry_key(self, entry_id: str) -> bytes:
        return self.p + b"q:" + _b(entry_id)

    def index(self, reason: QuarantineReason | None) -> bytes:
        """The quarantine index by creation time: all entries, or one reason's."""
        return self.p + b"qidx" + (b"" if reason is None else b":" + reason.value.encode())

    # ------------------------------------------------------------------ calls

    def claim(self, requests: Sequence[ClaimRequest], what: str) -> list[_Call[list[ClaimOutcome]]]:
        """The claim script calls for ``requests``, one per chunk (see :data:`BATCH_CHUNK`).
        Raises ``ConfigurationError`` for a bad lease (then nothing is sent)."""
        lease_us: dict[float, int] = {}
        for r in requests:
            if r.lease not in lease_us:
                lease_us[r.lease] = _us(r.lease, "lease")
        scopes, tails = self._scopes, self._tails
        if len(scopes) > _PACKED_MAX or len(tails) > _PACKED_MAX:
            scopes.clear()
            tails.clear()
        script, token_key, n, p = _SCRIPTS["claim"], self.p + b"token", len(requests), self.p
        calls: list[_Call[list[ClaimOutcome]]] = []
        lo = 0
        while lo < n:
            keys, parts, size, hi = [token_key], [], 0, lo
            while hi < n and hi - lo < BATCH_CHUNK and size < BATCH_BYTES:
                r = requests[hi]
                k = r.key
                sc = scopes.get(k.scope)
                if sc is None:
                    raw = k.scope.encode("utf-8", "surrogatepass")
                    sc = scopes[k.scope] = (_KEY_HEAD % (p, len(raw), raw), _U32(len(raw)) + raw)
                tail = tails.get((r.owner, r.lease, r.marks_start))
                if tail is None:
                    raw = r.owner.encode("utf-8", "surrogatepass")
                    marks = b"\x01" if r.marks_start else b"\x00"
                    tail = _U32(len(raw)) + raw + _F64(lease_us[r.lease]) + marks
                    tails[(r.owner, r.lease, r.marks_start)] = tail
                op = k.operation_id.encode("utf-8", "surrogatepass")
                fp = r.fingerprint.encode("utf-8", "surrogatepass")
                key = sc[0] + op
                part = b"%b%b%b%b%b%b" % (sc[1], _U32(len(op)), op, _U32(len(fp)), fp, tail)
                keys.append(key)
                parts.append(part)
                size += len(key) + len(part)
                hi += 1
            calls.append(
                _Call(script, keys, [b"".join(parts)],
                      partial(_claim_outcomes, requests[lo:hi], lease_us), what, 0, n > 1)
            )  # fmt: skip
            lo = hi
        return calls

    def complete(
        self, items: Sequence[tuple[Claim, str | None]], what: str
    ) -> list[_Call[list[Record | LeaseLost]]]:
        """The complete script calls for ``items``, one per chunk (see :data:`BATCH_CHUNK`)."""
        script, log, n = _SCRIPTS["complete"], self.p + b"completions", len(items)
        retention = str(self.retention_ms)
        scopes = self._scopes
        if len(scopes) > _PACKED_MAX:
            scopes.clear()
        calls: list[_Call[list[Record | LeaseLost]]] = []
        lo = 0
        while lo < n:
            keys, parts, size, hi = [log], [], 0, lo
            while hi < n and hi - lo < BATCH_CHUNK and size < BATCH_BYTES:
                claim, result = items[hi]
                k = claim.key
                sc = scopes.get(k.scope)
                if sc is None:
                    raw = k.scope.encode("utf-8", "surrogatepass")
                    sc = scopes[k.scope] = (
                        _KEY_HEAD % (self.p, len(raw), raw),
                        _U32(len(raw)) + raw,
                    )
                key = sc[0] + k.operation_id.encode("utf-8", "surrogatepass")
                token = b"%d" % claim.token
                if result is None:
                    part = b"%b%b\x00\x00\x00\x00\x00" % (_U32(len(token)), token)
                else:
                    raw = result.encode("utf-8", "surrogatepass")
                    part = b"%b%b\x01%b%b" % (_U32(len(token)), token, _U32(len(raw)), raw)
                keys.append(key)
                parts.append(part)
                size += len(key) + len(part)
                hi += 1
            calls.append(
                _Call(script, keys, [retention, b"".join(parts)],
                      partial(_completions, items[lo:hi]), what, 0, n > 1)
            )  # fmt: skip
            lo = hi
        return calls

    def mark_started(self, claims: Sequence[Claim]) -> list[_Call[list[Claim | LeaseLost]]]:
        """The mark_started script calls, one per chunk of at most :data:`BATCH_CHUNK` claims."""
        calls: list[_Call[list[Claim | LeaseLost]]] = []
        for lo in range(0, len(claims), BATCH_CHUNK):
            chunk = claims[lo : lo + BATCH_CHUNK]
            tokens = [b"%d" % c.token for c in chunk]
            calls.append(
                _Call(
                    _SCRIPTS["mark_started"],
                    [self.key_for(c.key) for c in chunk],
                    [b"".join(_U32(len(t)) + t for t in tokens)],
                    partial(_marked, chunk),
                    what="mark_started",
                    now_at=0,
                    batch=len(claims) > 1,
                )
            )
        return calls

    def extend(self, claim: Claim, lease: float) -> _Call[Claim]:
        lease_us = _us(lease, "lease")
        return _Call(
            _SCRIPTS["extend"],
            [self.key_for(claim.key)],
            [str(claim.token), str(lease_us)],
            lambda reply: _extended(claim, reply),
            what="extend",
        )

    def release(self, claim: Claim, error: str | None) -> _Call[None]:
        return _Call(
            _SCRIPTS["release"],
            [self.key_for(claim.key)],
            [str(claim.token), "0" if error is None else "1", _b(storable_text(error or ""))],
            lambda reply: _fence(claim, reply),
            what="release",
        )

    def quarantine(self, request: QuarantineRequest, claim: Claim | None) -> _Call[QuarantineEntry]:
        request = request.storable()
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
        # written with a new entry only (the script ignores them for a repeat): the first
        # publish time and the original size, before capping, are what a redrive decides on
        fields += ["message_size", str(len(request.message or b""))]
        if request.published_at is not None and math.isfinite(request.published_at):
            fields += ["published_at", str(round(request.published_at * _US))]
        op_key = OpKey(request.scope, request.operation_id or "") if claim is None else claim.key

        def decode(reply: list[Any]) -> QuarantineEntry:
            if claim is not None:
                _fence(claim, reply)
            return _entry(_pairs(reply[2:]))

        return _Call(
            _SCRIPTS["quarantine"],
            [self.key_for(op_key), self.entry_key(eid), self.index(None),
             self.index(request.reason)],
            [
                "0" if claim is None else "1",
                "0" if claim is None else str(claim.token),
                _b(request.detail),
                eid,
                str(request.attempts),
                request.risk.value,
                *fields,
            ],
            decode,
            what="quarantine",
        )  # fmt: skip

    # ------------------------------------------------------------------ errors

    def unavailable(
        self, exc: BaseException, what: str, *, sent: bool, batch: bool = False
    ) -> LedgerError | ConfigurationError:
        """Map a redis-py error to the replaysafe tree: what happened, what to do next."""
        e = self.errors
        text = _scrub(f"{type(exc).__name__}: {exc}", self.password)
        where = f"Redis ledger at {self.display}: {what} failed ({text})"
        if isinstance(exc, e.ResponseError) and str(exc).startswith("WRONGTYPE"):
            return ConfigurationError(
                f"{where}; a key under prefix {self.prefix!r} holds a value the ledger did not "
                "write: another program uses this prefix; give the ledger a prefix of its own"
            )
        if isinstance(exc, e.ResponseError) and "replaysafe bug" in str(exc):
            return LedgerError(f"{where}; nothing was written; please report this replaysafe bug")
        if isinstance(exc, e.DataError) or (
            type(exc) is e.ResponseError  # not OOM, READONLY, NOPERM …: the server's state
            and _LUA_ERROR.search(str(exc)) is not None
            and _STATE_CODE.match(str(exc)) is None
        ):
            # a value redis-py cannot send, or a ledger script that failed on this call's data:
            # the server is up and a retry fails the same way
            done = "nothing was sent" if isinstance(exc, e.DataError) else (
                "Redis does not roll a failed script back: its writes before the failure stay"
            )  # fmt: skip
            return LedgerDataError(
                f"{where}; the ledger refused this call's data ({done}); a retry fails the same "
                "way: set the message aside (quarantine or dead-letter it) and report the value "
                "if it looks ordinary"
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
            f"{redact_url(url)!r} is not a usable Redis URL "
            f"({_scrub(str(exc), _password_of(url))}); use "
            "redis://[user:password@]host:port/db, rediss://... or unix:///path"
        ) from None


# --------------------------------------------------------------------------- the ledger


class RedisLedger(LedgerBackend):
    """The replay ledger in Redis (not transactional). See the module docstring for the design.

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
        password = None if url is None else _password_of(url)
        if client is None:
            assert url is not None
            display = redact_url(url)
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
            display = (
                redact_url(url)
                if url is not None
                else f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/"
                f"{kwargs.get('db', 0)}"
            )
            self._owns_client = False
        self._display = display
        self._codec = _Codec(prefix, retention, display, password, self._errors)
        self._client: Redis = client
        self._offset = 0.0  # server clock minus local clock, from the last script reply
        self._closed = False

    def _connect(self, url: str) -> Redis:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry

        client: Redis = _open_client(Redis, Retry, url)
        pool = client.connection_pool
        # the URL's scheme chose the class (TCP, TLS, unix socket); keep it, pack in C
        pool.connection_class = _with_c_packer(pool.connection_class)
        return client

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
        from redis import Redis
        from redis.retry import Retry

        return SyncRedisLedger(self._codec, _open_client(Redis, Retry, self._url), self._offset)

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

    # ------------------------------------------------------------------ ledger API

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

    async def quarantine(
        self, request: QuarantineRequest, claim: Claim | None = None
    ) -> QuarantineEntry:
        """Record the entry (idempotent per ``request.entry_id()``) and, with ``claim``, move the
        record to QUARANTINED under fencing, in one script. Durable before the caller completes at
        the broker only as far as the server's persistence is (see :meth:`persistence_report`)."""
        return await self._one(self._codec.quarantine(request, claim))

    async def get(self, key: OpKey) -> Record | None:
        h = await self._command("get", lambda: self._client.hgetall(self.key_for(key)))
        return _record(key, h)

    async def quarantined(
        self, *, reason: QuarantineReason | None = None, limit: int = 100
    ) -> list[QuarantineEntry]:
        """Quarantine entries, oldest first (two round trips: the index, then the entries)."""
        if limit <= 0:
            return []
        index = self._codec.index(reason)
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

    async def quarantine_entry(self, entry_id: str) -> QuarantineEntry | None:
        """One quarantine entry by id (one ``HGETALL``), or None when there is none."""
        h = await self._command(
            "quarantine_entry", lambda: self._client.hgetall(self._codec.entry_key(entry_id))
        )
        return _entry(h) if h else None

    async def redrive(self, entry_id: str) -> QuarantineEntry:
        """Record a redrive of the entry (``redriven_at`` = Redis ``TIME``, ``redrives + 1``) and,
        if its operation is QUARANTINED, release it with attempts 0, in one script (atomic).

        A COMPLETED operation stays completed (the republished copy is answered as a duplicate,
        never re-run); in-flight and released operations are left alone. Publishing the copy is
        the caller's job: redrive moves no boundary. Two round trips: the entry's scope and
        operation id are read first to name the record. Raises ``LedgerError`` (changing nothing)
        for an unknown entry; a lost reply raises ``LedgerUnavailable`` and the redrive may or may
        not have been recorded (repeating it only counts one more redrive).
        """
        entry_key = self._codec.entry_key(entry_id)
        scope, op_id = await self._command(
            "redrive", lambda: self._client.hmget(entry_key, ["scope", "operation_id"])
        )
        if scope is None:
            raise unknown_entry(entry_id)
        keys = [entry_key]
        if op_id is not None:
            keys.append(self.key_for(OpKey(_s(scope), _s(op_id))))
        reply = await self._eval(_SCRIPTS["redrive"], keys, [], what="redrive")
        if reply[0] == b"unknown":  # purged between the read and the script
            raise unknown_entry(entry_id)
        return _entry(_pairs(reply[2:]))

    async def purge_quarantine(
        self,
        entry_ids: Sequence[str] | None = None,
        *,
        reason: QuarantineReason | None = None,
        older_than: float | None = None,
        limit: int = 10_000,
    ) -> int:
        """Delete up to ``limit`` quarantine entries matching every given filter (``entry_ids``;
        ``reason``; created before ``older_than``), oldest first. Operation records are left
        alone (a quarantined operation stays quarantined: redrive it to make it claimable).

        Each script deletes at most :data:`PURGE_CHUNK` entries (Redis is never blocked long)
        and removes each entry from the overall and per-reason indexes together with its hash.
        Without ids, the scripts walk the (per-reason) index from its oldest member. With ids,
        their creation times are read first (pipelined ``ZSCORE``) to order them oldest first;
        the script checks every filter again before deleting. ``entry_ids=[]`` deletes nothing.
        The purge as a whole is not atomic; a lost reply leaves a chunk deleted or not.
        """
        if limit <= 0 or (entry_ids is not None and not entry_ids):
            return 0
        index = self._codec.index(reason)
        keys = [index, self._p + b"qidx"]
        # the highest creation time purged, exclusive: created_at (integer us) < older_than
        high = "+inf" if older_than is None else "(" + str(math.ceil(older_than * _US))
        total = 0
        if entry_ids is None:
            while total < limit:
                want = min(PURGE_CHUNK, limit - total)
                reply = await self._eval(
                    _SCRIPTS["purge_quarantine"],
                    keys,
                    [self._p, high, str(want), "0"],
                    what="purge_quarantine",
                    now_at=2,
                )
                total += int(reply[0])
                if int(reply[1]) < want:  # the index has no older members left
                    break
            return total
        ids = list(dict.fromkeys(entry_ids))
        cutoff = math.inf if older_than is None else int(high[1:])
        found: list[tuple[int, str]] = []
        for lo in range(0, len(ids), PURGE_CHUNK):
            chunk = ids[lo : lo + PURGE_CHUNK]

            async def scores(chunk: list[str] = chunk) -> list[Any]:
                pipe = self._client.pipeline(transaction=False)
                for eid in chunk:
                    pipe.zscore(index, _b(eid))
                return list(await pipe.execute())

            for eid, score in zip(
                chunk, await self._command("purge_quarantine", scores), strict=True
            ):
                if score is not None and score < cutoff:
                    found.append((int(score), eid))
        found.sort()  # oldest first, ties by id: the order of the index itself
        for lo in range(0, len(found), PURGE_CHUNK):
            if total >= limit:
                break
            reply = await self._eval(
                _SCRIPTS["purge_quarantine"],
                keys,
                [
                    self._p,
                    high,
                    str(limit - total),
                    "1",
                    *(_b(e) for _, e in found[lo : lo + PURGE_CHUNK]),
                ],
                what="purge_quarantine",
                now_at=2,
            )
            total += int(reply[0])
        return total

    async def summary(self, *, top: int = 10) -> LedgerSummary:
        """Counts for ``replaysafe inspect``. An admin call, **O(records)**: it ``SCAN``s every
        record key under the prefix (at most :data:`SUMMARY_CHUNK` per call) and reads the needed
        fields with pipelined ``HMGET``s, one round trip per chunk, so Redis is never blocked
        long but a large ledger takes a while. Do not call it on a hot path.

        ``now`` and expired leases are judged by Redis ``TIME`` (read once, before the scan).
        ``oldest_in_flight_at`` is the ``updated_at`` of the oldest in-flight record: its claim
        time (an extend moves only ``lease_until``). ``completed_last_hour`` counts
        ``completed_at`` fields in the hour before ``now`` (records purged or expired are not
        counted). Quarantine counts are the per-reason indexes' ``ZCARD``. ``approx_bytes`` is an
        estimate: the mean ``MEMORY USAGE`` of up to :data:`MEMORY_SAMPLE` record hashes times the
        record count, plus the completion log; quarantine entries are not included; None when
        ``MEMORY USAGE`` is not permitted.
        The scan is not a snapshot: records changing during it may be counted in either state.
        """
        reasons = list(QuarantineReason)

        async def head() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.time()
            for r in reasons:
                pipe.zcard(self._codec.index(r))
            return list(await pipe.execute())

        first = await self._command("summary", head)
        sec, usec = first[0]
        now = int(sec) * _US + int(usec)
        by_reason = {r.value: int(n) for r, n in zip(reasons, first[1:], strict=True) if n}
        by_state: dict[str, int] = {}
        expired, oldest, recent = 0, None, 0
        hot: list[tuple[int, str, str]] = []  # (-attempts, scope, operation_id), best `top`
        sample: list[bytes] = []
        seen: set[bytes] = set()  # SCAN may return a key twice (while Redis rehashes)
        pattern = _glob_escape(self._p + b"op:") + b"*"
        cursor: int = 0
        while True:

            async def scan(at: int = cursor) -> tuple[int, list[Any]]:
                return await self._client.scan(at, match=pattern, count=SUMMARY_CHUNK)

            cursor, found = await self._command("summary (SCAN)", scan)
            keys = [k for k in found if k not in seen]
            seen.update(keys)
            if keys:

                async def rows(keys: list[bytes] = keys) -> list[Any]:
                    pipe = self._client.pipeline(transaction=False)
                    for k in keys:
                        pipe.hmget(k, _SUMMARY_FIELDS)
                    return list(await pipe.execute())

                candidates = []
                for key, row in zip(keys, await self._command("summary", rows), strict=True):
                    state, attempts, lease_until, updated, completed, scope, op_id = row
                    if state is None:  # expired or purged since SCAN saw it
                        continue
                    st = _s(state)
                    by_state[st] = by_state.get(st, 0) + 1
                    if len(sample) < MEMORY_SAMPLE:
                        sample.append(key)
                    if st == State.IN_FLIGHT.value:
                        if int(lease_until or 0) <= now:
                            expired += 1
                        at = int(updated)
                        oldest = at if oldest is None else min(oldest, at)
                    if completed is not None and int(completed) >= now - 3600 * _US:
                        recent += 1
                    n = int(attempts or 0)
                    if n > 1 and top > 0:
                        candidates.append((-n, _s(scope), _s(op_id)))
                if candidates:
                    hot = heapq.nsmallest(top, hot + candidates)
            if cursor == 0:
                break
        records = sum(by_state.values())
        return LedgerSummary(
            now=now / _US,
            by_state=by_state,
            expired_leases=expired,
            oldest_in_flight_at=None if oldest is None else oldest / _US,
            hot_operations=[(OpKey(sc, op), -n) for n, sc, op in hot],
            quarantined_by_reason=by_reason,
            completed_last_hour=recent,
            approx_bytes=await self._approx_bytes(sample, records),
        )

    async def _approx_bytes(self, sample: list[bytes], records: int) -> int | None:
        """Estimate the records' memory from ``MEMORY USAGE`` of ``sample`` (see summary)."""

        async def usage() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for k in [self._p + b"completions", *sample]:
                pipe.memory_usage(k)
            return list(await pipe.execute())

        try:
            log, *sizes = await usage()
        except self._errors.ResponseError:  # MEMORY not permitted (ACL) or renamed away
            return None
        except self._errors.RedisError as exc:
            raise self._codec.unavailable(exc, "summary (MEMORY USAGE)", sent=False) from exc
        measured = [int(b) for b in sizes if b is not None]  # None: gone since the scan
        mean = sum(measured) / len(measured) if measured else 0
        return int(log or 0) + round(mean * records)

    async def purge(self, older_than: float, *, limit: int = 10_000) -> int:
        """Forget up to ``limit`` COMPLETED records completed before ``older_than``, oldest first.

        Completed records already expire by TTL at ``retention``; purge forgets them earlier. It
        walks the completion log in scripts of at most :data:`PURGE_CHUNK` deletions (so Redis is
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
                [self._p + b"completions"],
                [cutoff, str(want), str(2 * want)],
                what="purge",
                now_at=2,
            )
            total += int(reply[0])
            if reply[1] == b"1":
                break
        return total

    async def set_paused(
        self, handler: str, paused: bool, *, reason: str = "", by: str = ""
    ) -> None:
        """Pause (``HSET`` into ``<prefix>paused``, ``since`` = Redis ``TIME``) or resume
        (``HDEL``) ``handler`` in one script call. Durable as the server's persistence makes it
        (see :meth:`persistence_report`)."""
        check_handler_name(handler)
        await self._eval(
            _SCRIPTS["set_paused"],
            [self._p + b"paused"],
            [_b(handler), "1" if paused else "0", _b(pause_text(reason)), _b(pause_text(by))],
            what="set_paused",
            now_at=0,
        )

    async def paused(self) -> dict[str, PauseState]:
        """The paused handlers (one ``HGETALL`` of a hash with a field per paused handler)."""
        flat = await self._command("paused", lambda: self._client.hgetall(self._p + b"paused"))
        out: dict[str, PauseState] = {}
        for raw_name, raw_value in dict(flat).items():
            try:
                value = json.loads(raw_value)
                state = PauseState(
                    _s(raw_name), str(value["reason"]), str(value["by"]),
                    int(value["since_us"]) / _US,
                )  # fmt: skip
            except (ValueError, KeyError, TypeError) as exc:
                raise LedgerError(
                    f"{self._prefix}paused holds {raw_value!r} for {_s(raw_name)!r}, which this "
                    f"ledger did not write ({exc!r}); resume the handler to clear it, or give "
                    "the ledger a prefix of its own"
                ) from None
            out[state.handler] = state
        return out

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
                raise self._codec.unavailable(
                    exc, "persistence_report (CONFIG GET)", sent=False
                ) from exc
            for k, v in dict(reply).items():
                if k is not None:
                    config[_s(k)] = "" if v is None else _s(v)
        return assess_persistence(config)

    async def durability(self) -> Durability:
        """The server's persistence settings, read live (:meth:`persistence_report`), as the
        ledger's durability: ``appendfsync always`` durable, ``everysec``/``no`` loses recent
        writes on a machine crash, RDB-only or no persistence (or an evicting
        ``maxmemory-policy``) not durable, ``CONFIG`` not permitted unknown."""
        report = await self.persistence_report()
        return Durability.of(
            report.level, f"redis {self._display} prefix {self._prefix!r}", report.setting,
            report.sentence,
        )  # fmt: skip

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
        sha = await self._client.script_load(script.text)
        if _s(sha) != script.sha:  # pragma: no cover - SHA1 is SHA1
            raise LedgerError(f"Redis returned SHA {sha!r} for the {script.name} script")

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
                sha = self._client.script_load(script.text)
                if _s(sha) != script.sha:  # pragma: no cover - SHA1 is SHA1
                    raise LedgerError(
                        f"Redis returned SHA {sha!r} for the {script.name} script"
                    ) from None
                reply = self._client.evalsha(script.sha, len(keys), *keys, *call.args)
        except self._errors.RedisError as exc:
            raise self._codec.unavailable(exc, call.what, sent=True, batch=call.batch) from exc
        self._offset = _clock_offset(reply[call.now_at], sent)
        return reply  # type: ignore[no-any-return]


def _clock_offset(server_now: bytes | int, sent_at: float) -> float:
    """Server clock minus local clock, from Redis TIME read during a call sent at ``sent_at``."""
    # the server read TIME somewhere inside the round trip: assume its middle
    return int(server_now) / _US - (sent_at + time.time()) / 2


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
