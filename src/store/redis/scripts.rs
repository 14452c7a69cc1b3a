//! The Lua scripts of the claim protocol on the compact layout (`store::layout`), and why each
//! does what it does.
//!
//! Every script that handles keys takes, as `KEYS`, the meta hashes of the tables its keys live
//! in (one on Redis Cluster, where a call must stay in one slot; any number on a single server,
//! where a whole batch is one call), and per key three `ARGV` values: the 1-based index of its
//! table in `KEYS`, its field (the 15 digest bytes), and the field in hex (30 characters, which
//! name the key's claim: the client spells it, as `string.format` of 15 bytes costs Redis more
//! than the rest of a claim). The shard and claim keys a script touches are derived from the
//! meta's name, so they share its hash tag and slot.
//!
//! # Remembered keys: one field each, expiry stored, swept in the background
//!
//! A done key is a field of a shard hash; its value is the tick its window ends (see
//! `layout`): a decimal number (a listpack integer) for a key without a body digest, or 12
//! bytes, the tick big-endian in 4 then the body digest in 8, for a key with one (length tells
//! the two apart: decimal ticks have at most 11 digits). A claim that finds a key done compares
//! the digests (conflict: code 5), and with a sliding window rewrites the value with the later
//! tick, keeping its digest, and extends the TTLs of the shards and metas it touched as a
//! commit does. Redis 7.0 has no per-field TTL, so expiry is read, not enforced: a field whose
//! tick has passed reads as absent (exactly, whatever the sweep is doing), and the sweeper
//! deletes such fields in bounded chunks, each shard once per `window / 8`. Every shard and
//! meta also carries a TTL a little longer than the longest window the table was used with,
//! set again by each commit that touches it, so Redis itself drops the tables of a route nobody
//! runs any more.
//!
//! # Commands per key
//!
//! Redis spends about a microsecond per command a script runs, so the common paths are short:
//! a claim of a new key is `HGET` (remembered?) and `SET NX GET` (claimed, or who holds it);
//! of a duplicate, the `HGET` alone. A commit is `GETDEL` of the claim (what it held decides
//! the outcome), `HSETNX` of the field and a `PEXPIRE` of its shard; only a field already
//! present costs an `HGET` more.
//!
//! # Shards: linear hashing
//!
//! A hash stays a compact listpack only up to `hash-max-listpack-entries` fields (128 by
//! default); beyond that Redis converts it to a hash table costing about four times as much.
//! So a table grows its shard count `n` with the keys it holds: a key is in shard
//! `h mod 2^L`, or `h mod 2^(L+1)` if that is below `p` (`h` = the field's first 4 bytes,
//! `n = 2^L + p`). When a commit brings the table's count `c` over `alpha * n`, shard `p` is
//! split: its fields are rewritten into shards `p` and `p + 2^L` (fresh listpacks, expired
//! fields dropped), and `n` grows by one. With `alpha = 40` no shard gets near 128 fields
//! (simulated: largest shard 106 at 300,000 keys), and a lookup is one `HGET` on a listpack of
//! about 40-80 fields. Tables do not shrink: after a peak, shards stay sparser until the
//! window has passed and traffic refills them.
//!
//! # In-flight claims
//!
//! Claims live a lease at most, so they stay plain strings with the owner token and the lease
//! as TTL (as in 0.1): compare-and-set on the token, takeover of an older epoch of this
//! process, PTTL for how long a held duplicate may have to wait.
//!
//! # Keys of the 0.1 layout
//!
//! `{prefix}:{route}:{id}` strings (`"1"` for done, a token for in flight). While a route may
//! still have some, the claim script also reads the key's 0.1 name (the third value per key;
//! empty when not needed): done there means done, a token there is an in-flight claim of an
//! older dedupd. On Redis Cluster that name is in another slot, so it is read by
//! [`LEGACY_PROBE_LUA`], one call per key, only while such keys may exist.

/// Shared by every script: clock, table handles, shard addressing, keep-alive, split.
const PRELUDE: &str = r"
local EPOCH, TICK = 1767225600000, 125
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The first 4 bytes of `s` as a big-endian number: a field's hash, a binary value's tick.
local function be32(s)
  local a, b, c, d = string.byte(s, 1, 4)
  return ((a * 256 + b) * 256 + c) * 256 + d
end
-- A value is a decimal tick (no digest, or written by 0.3/0.4: at most 11 characters) or 12
-- bytes, the tick in 4 then the body digest in 8.
local function tick_of(v)
  if #v == 12 then return be32(v) end
  return tonumber(v)
end
local function alive(v, now)
  return tick_of(v) * TICK + EPOCH > now
end
local function ticks_to(now, window)
  return math.ceil((now + window - EPOCH) / TICK)
end
-- The tick as the 4 bytes of a binary value: once per call, not per key.
local function be4(n)
  return string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
    math.floor(n / 256) % 256, n % 256)
end
local tables = {}
local function open(index)
  local t = tables[index]
  if t then return t end
  local meta = KEYS[tonumber(index)]
  local got = redis.call('HMGET', meta, 'n', 'w')
  local n = tonumber(got[1]) or 1
  local lo = 1
  while lo * 2 <= n do lo = lo * 2 end
  t = {meta = meta, base = string.sub(meta, 1, -3), n = n, lo = lo, w = tonumber(got[2]) or 0,
       added = 0, shards = {}, names = {}}
  tables[index] = t
  return t
end
-- Shard names are cached per call: turning a number into a string costs Redis a printf.
local function shard(t, field)
  local h = be32(field)
  local s = h % t.lo
  if s < t.n - t.lo then s = h % (2 * t.lo) end
  local name = t.names[s]
  if not name then
    name = t.base .. ':' .. s
    t.names[s] = name
  end
  return name
end
-- Claim names spell the field in hex (given by the client): key names stay printable for
-- operators' tools.
local function claim_key(t, hex)
  return t.base .. ':c:' .. hex
end
-- The claim key of a field of table `index`, without reading the table's meta (renew and
-- release touch only claims).
local function claim_key_in(index, hex)
  return string.sub(KEYS[tonumber(index)], 1, -3) .. ':c:' .. hex
end
-- Ends a call that wrote fields of `t` (its `shards`) with `window`: every shard and the meta
-- outlive the longest window any commit or slide used, counted from now, so a window shortened
-- by a reload never cuts short a key remembered under the longer one. Returns the TTL, for the
-- meta.
local function keep_alive(t, window)
  if window > t.w then
    t.w = window
    redis.call('HSET', t.meta, 'w', window)
  end
  -- A string, formatted once: Redis would printf a Lua number for every call.
  local ttl = string.format('%d', t.w + 2 * TICK)
  for sk in pairs(t.shards) do redis.call('PEXPIRE', sk, ttl) end
  return ttl
end
";

/// Splits shard `p` of table `t` (see the module docs); returns how many expired fields it
/// dropped. Part of [`COMMIT_LUA`].
const SPLIT: &str = r"
local function split(t, now)
  local p = t.n - t.lo
  local old, new = t.base .. ':' .. p, t.base .. ':' .. (p + t.lo)
  local all = redis.call('HGETALL', old)
  local keep, move, dropped = {}, {}, 0
  for i = 1, #all, 2 do
    local f, v = all[i], all[i + 1]
    if not alive(v, now) then
      dropped = dropped + 1
    elseif be32(f) % (2 * t.lo) == p then
      keep[#keep + 1] = f; keep[#keep + 1] = v
    else
      move[#move + 1] = f; move[#move + 1] = v
    end
  end
  local ttl = redis.call('PTTL', old)
  redis.call('DEL', old)
  for _, part in ipairs({{old, keep}, {new, move}}) do
    if #part[2] > 0 then
      redis.call('HSET', part[1], unpack(part[2]))
      if ttl > 0 then redis.call('PEXPIRE', part[1], ttl) end
    end
  end
  t.n = t.n + 1
  if t.n == 2 * t.lo then t.lo = 2 * t.lo end
  return dropped
end
";

/// ARGV: token, lease ms, instance prefix, our epoch, slide ms ('0': fixed windows), then per
/// key: table, field, hex, 0.1 name (or ''), body digest (8 bytes, or ''). Two values per key:
/// {0, 0} claimed, {1, 0} done, {2, 0} ours, {3, 0} taken over, {4, pttl} in flight elsewhere,
/// {5, 0} conflict (done with another body digest). Keys are handled in order, so a key
/// repeated in the batch sees its earlier claim, and its earlier slide.
pub const CLAIM_LUA: &str = r"
local token, lease, prefix, ours = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local slide = tonumber(ARGV[5])
local now = now_ms()
-- The slid expiry in both value formats, built by the first duplicate that needs it.
local slid, slid4, slid10
local out = {}
for a = 6, #ARGV, 5 do
  local t, field, legacy = open(ARGV[a]), ARGV[a + 1], ARGV[a + 3]
  local code, pttl = nil, 0
  if legacy ~= '' then
    local v = redis.call('GET', legacy)
    if v == '1' then
      code = 1
    elseif v then
      code, pttl = 4, redis.call('PTTL', legacy)
    end
  end
  if not code then
    local sk = shard(t, field)
    local v = redis.call('HGET', sk, field)
    local tick = v and tick_of(v)
    if tick and tick * TICK + EPOCH > now then
      local body = ARGV[a + 4]
      -- Only two known digests can differ: a key remembered without one, or a copy without
      -- one, reads as a duplicate.
      if #v == 12 and body ~= '' and string.sub(v, 5) ~= body then
        code = 5
      else
        code = 1
        if slide > 0 then
          if not slid then slid = ticks_to(now, slide) end
          if slid > tick then
            -- The value keeps its format, and so its digest.
            if #v == 12 then
              if not slid4 then slid4 = be4(slid) end
              redis.call('HSET', sk, field, slid4 .. string.sub(v, 5))
            else
              if not slid10 then slid10 = string.format('%d', slid) end
              redis.call('HSET', sk, field, slid10)
            end
            t.shards[sk] = true
          end
        end
      end
    end
  end
  if not code then
    local key = claim_key(t, ARGV[a + 2])
    -- One command for the common case (absent: claimed); NX with GET needs Redis 7.0.
    local v = redis.call('SET', key, token, 'NX', 'PX', lease, 'GET')
    code = 4
    if not v then
      code = 0
    elseif v == token then
      redis.call('PEXPIRE', key, lease)
      code = 2
    else
      if string.sub(v, 1, #prefix) == prefix then
        -- Epochs are decimal u64: compare by length, then by digits (exact, unlike Lua numbers).
        local theirs = string.sub(v, #prefix + 1)
        if string.match(theirs, '^%d+$') then
          theirs = (string.gsub(theirs, '^0+(%d)', '%1'))
          if #theirs < #ours or (#theirs == #ours and theirs < ours) then
            redis.call('SET', key, token, 'PX', lease)
            code = 3
          end
        end
      end
      if code == 4 then pttl = redis.call('PTTL', key) end
    end
  end
  out[#out + 1] = code
  out[#out + 1] = pttl
end
-- A slid key may now outlive its shard's and meta's TTLs: extend them as a commit would.
for _, t in pairs(tables) do
  if next(t.shards) then redis.call('PEXPIRE', t.meta, keep_alive(t, slide)) end
end
return out
";

/// ARGV: token, window ms, alpha, then per key: table, field, hex, body digest (8 bytes, or
/// ''). Per key: 0 committed (ours), 1 restored (absent), 2 done already (left alone: keeps
/// its window and its digest), 3 overrode another owner's claim. See `CommitOutcome`.
pub const COMMIT_LUA: &str = r"
local token, window, alpha = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local ticks = ticks_to(now, window)
-- Both value formats, built once: a key with a digest is stored as tick4 .. digest.
local tick, tick4 = string.format('%d', ticks), be4(ticks)
local out = {}
for a = 4, #ARGV, 4 do
  local t, field, body = open(ARGV[a]), ARGV[a + 1], ARGV[a + 3]
  local sk = shard(t, field)
  local value = tick
  if body ~= '' then value = tick4 .. body end
  -- The claim ends here whatever it held; what it held says which outcome this is.
  local v = redis.call('GETDEL', claim_key(t, ARGV[a + 2]))
  local code
  if redis.call('HSETNX', sk, field, value) == 1 then
    t.added = t.added + 1
  else
    local old = redis.call('HGET', sk, field)
    if alive(old, now) then code = 2 else redis.call('HSET', sk, field, value) end
  end
  if not code then
    t.shards[sk] = true
    if v == token then code = 0 elseif not v then code = 1 else code = 3 end
  end
  out[#out + 1] = code
end
for _, t in pairs(tables) do
  if next(t.shards) then
    local ttl = keep_alive(t, window)
    -- After HINCRBY, which creates the meta of a new table: a TTL on a missing key is lost.
    local c = redis.call('HINCRBY', t.meta, 'c', t.added)
    redis.call('PEXPIRE', t.meta, ttl)
    local n, dropped = t.n, 0
    -- At most 4 splits per call bound the script's time; the next commit continues.
    for _ = 1, 4 do
      if c - dropped <= alpha * t.n then break end
      dropped = dropped + split(t, now)
    end
    if t.n ~= n then redis.call('HSET', t.meta, 'n', t.n) end
    if dropped > 0 then redis.call('HINCRBY', t.meta, 'c', -dropped) end
  end
end
return out
";

/// ARGV: token, lease ms, then per key: table, field, hex. Per key: 1 if the lease was extended,
/// 0 if the claim no longer carries the token. PEXPIRE is not refused by a full Redis
/// (noeviction), SET is.
pub const RENEW_LUA: &str = r"
local out = {}
for a = 3, #ARGV, 3 do
  local key = claim_key_in(ARGV[a], ARGV[a + 2])
  if redis.call('GET', key) == ARGV[1] then
    out[#out + 1] = redis.call('PEXPIRE', key, ARGV[2])
  else
    out[#out + 1] = 0
  end
end
return out
";

/// ARGV: token, then per key: table, field, hex. Per key: 1 if the claim was deleted, 0 if it no
/// longer carries the token. Never touches a remembered key.
pub const RELEASE_LUA: &str = r"
local out = {}
for a = 2, #ARGV, 3 do
  local key = claim_key_in(ARGV[a], ARGV[a + 2])
  if redis.call('GET', key) == ARGV[1] then
    out[#out + 1] = redis.call('DEL', key)
  else
    out[#out + 1] = 0
  end
end
return out
";

/// KEYS: one meta; ARGV: table (1), field, hex. Returns {claim token or false, claim PTTL, ms left of
/// the remembered key (0 in its last tick) or -1}.
pub const INSPECT_LUA: &str = r"
local t, field = open(ARGV[1]), ARGV[2]
local now = now_ms()
local key = claim_key(t, ARGV[3])
local owner = redis.call('GET', key)
local pttl = owner and redis.call('PTTL', key) or -2
local v = redis.call('HGET', shard(t, field), field)
local left = -1
if v and alive(v, now) then
  -- Counted from the next tick boundary, as the memory store does: never more than the window
  -- committed (a whole number of ticks), short of the truth by under a tick.
  left = (tick_of(v) - math.ceil((now - EPOCH) / TICK)) * TICK
end
return {owner, pttl, left}
";

/// KEYS: one meta; ARGV: table (1), field, hex. Deletes the remembered field and the claim; returns
/// how many of the two existed (an expired field counts as absent).
pub const FORGET_LUA: &str = r"
local t, field = open(ARGV[1]), ARGV[2]
local now = now_ms()
local sk = shard(t, field)
local v = redis.call('HGET', sk, field)
local found = redis.call('DEL', claim_key(t, ARGV[3]))
if v then
  redis.call('HDEL', sk, field)
  -- Only an existing meta: HINCRBY would create one without a TTL.
  if redis.call('EXISTS', t.meta) == 1 then redis.call('HINCRBY', t.meta, 'c', -1) end
  if alive(v, now) then found = found + 1 end
end
return found
";

/// KEYS: one meta; ARGV: most shards to visit, shortest pass in ms. Deletes expired fields of
/// the next shards from the table's cursor. A table without meta (nothing committed, or gone
/// by TTL) is left alone, so sweeping never creates keys. Returns {shards visited, fields
/// deleted, ms until the next pass may start (0 while a pass runs), shard count}.
pub const SWEEP_LUA: &str = r"
local meta = KEYS[1]
if redis.call('EXISTS', meta) == 0 then return {0, 0, tonumber(ARGV[2]), 0} end
local t = open(1)
local now = now_ms()
local cursor = tonumber(redis.call('HGET', meta, 's')) or 0
if cursor >= t.n then cursor = 0 end
if cursor == 0 then
  local wait = tonumber(ARGV[2]) - (now - (tonumber(redis.call('HGET', meta, 'ps')) or 0))
  if wait > 0 then return {0, 0, wait, t.n} end
  redis.call('HSET', meta, 'ps', now)
end
local last = math.min(cursor + tonumber(ARGV[1]), t.n)
local deleted = 0
for s = cursor, last - 1 do
  local sk = t.base .. ':' .. s
  local all = redis.call('HGETALL', sk)
  local dead = {}
  for i = 1, #all, 2 do
    if not alive(all[i + 1], now) then dead[#dead + 1] = all[i] end
  end
  if #dead > 0 then
    redis.call('HDEL', sk, unpack(dead))
    deleted = deleted + #dead
  end
end
redis.call('HSET', meta, 's', last < t.n and last or 0)
if deleted > 0 then redis.call('HINCRBY', meta, 'c', -deleted) end
return {last - cursor, deleted, 0, t.n}
";

/// KEYS: one 0.1-layout key. Returns {0, 0} absent, {1, 0} done, {4, pttl} in flight (a claim
/// of a dedupd that wrote the old layout).
pub const LEGACY_PROBE_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if v == '1' then return {1, 0} end
if v then return {4, redis.call('PTTL', KEYS[1])} end
return {0, 0}
";

/// A script's full source: the prelude (and the split for commits) before its body.
pub fn source(body: &str) -> String {
    if body == COMMIT_LUA {
        format!("{PRELUDE}{SPLIT}{body}")
    } else if body == LEGACY_PROBE_LUA {
        body.to_owned()
    } else {
        format!("{PRELUDE}{body}")
    }
}
