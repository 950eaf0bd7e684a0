"""The Redis ledger's Lua scripts: every state transition of a record, read-decide-write in one
script that Redis runs atomically (see :mod:`replaysafe.stores.redis` for the design).

Each script exists once, here; :mod:`.codec` packs what they take and :mod:`.decode` reads what
they answer, for the async ledger and its sync twin alike.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from replaysafe.errors import LedgerError

#: most records (or quarantine entries) one purge script deletes before yielding the server to
#: other clients
PURGE_CHUNK: Final = 1_000

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
# the purge script (the ledger is single-node by design, see the package docstring).
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


def check_loaded(script: _Script, sha: bytes | str) -> None:
    """Raise ``LedgerError`` unless ``sha`` (what ``SCRIPT LOAD`` answered) names ``script``."""
    if (sha if isinstance(sha, str) else sha.decode()) != script.sha:  # pragma: no cover
        raise LedgerError(f"Redis returned SHA {sha!r} for the {script.name} script")
