"""The Redis side of the counter store: one Lua script mirroring `core.limits`, and its wire format.

`core.limits` keeps every window's state as a few plain doubles precisely so that this script can
mirror it line by line: GCRA (debt, since), the slotted sliding window (fresh_at, last_slot, total,
counts...), the concurrency gauge (in flight), the calendar period (end, start, used; the period's bounds
come with the spec, computed in Python for the request's `now`: the script needs no time zone data).
Each function below is the Lua twin of the Python function of the same name and does the same IEEE double
operations in the same order, so the statuses are bit-for-bit those of `MemoryCounterStore`
(tests/stores/test_redis.py checks it with hypothesis). Numbers go in as `repr(float)` (shortest round-
trip text, parsed by strtod) and come back as `%.17g` strings, so no value is rounded on the way.

Storage: one Redis string per counter, the state packed as little-endian doubles followed by a version (a
double counting the writes; 0 when the key is absent): GCRA 24 bytes, gauge 16 bytes, calendar 32 bytes,
sliding 8*(slots + 4) bytes, so the length says which algorithm wrote it; a state of another shape counts
as fresh (as in the memory store). Every write sets a TTL (the time until the window is fresh, plus a
margin for clock skew; gauges: `gauge_ttl`), so idle counters expire and Redis never grows without bound.
A write that leaves a window fresh deletes the key.

Time is the caller's `now` (see the `stores.redis` package for why). The one deliberate difference from the
memory store: a GCRA anchor never moves backwards (`since = max(since, now)`), so that a replica whose
clock is behind cannot make another replica drain the same debt twice; on one monotonic clock this
changes nothing.

Calls (ARGV[1]): M evaluates a list of requests, each all or nothing (A acquire, P peek, J adjust), and
answers one string per request (`wire` encodes and decodes them): the link sends every decision of an
event-loop iteration as one call, so the script's fixed cost (tens of microseconds) is paid once per
batch, not per decision. F is the write-behind flush: per counter, replace the state if its version is
unchanged or apply the deltas, and pull states back. The argument layouts are documented above each
part of the script.
"""

from __future__ import annotations

import hashlib
from typing import Final

from nexus_authz.core.limits import CONCURRENCY_RETRY_AFTER
from nexus_authz.stores.redis.lua_calendar import CALENDAR_LUA

__all__ = ["SCRIPT", "SCRIPT_SHA"]

SCRIPT: Final = r"""
local floor = math.floor
local INF = math.huge
local CONC_RETRY = __CONC_RETRY__
local fmt = string.format

local op = ARGV[1]
local margin = tonumber(ARGV[2])
local gauge_ttl = tonumber(ARGV[3])
local now = 0.0  -- set per request

local function g(x) return fmt('%.17g', x) end

local function parse_spec(s)
  local a, limit, interval, maxd, tol, burst, n, w, shadow, rest = string.match(s,
    '^(%a) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%d)(.*)$')
  local sp = {a = a, limit = tonumber(limit), interval = tonumber(interval), max_debt = tonumber(maxd),
              tol = tonumber(tol), burst = tonumber(burst), n = tonumber(n), w = tonumber(w),
              shadow = (shadow == '1')}
  if a == 'k' then
    -- a calendar period: its bounds [ps, pe) for the request's now
    local ps, pe = string.match(rest, '^ (%S+) (%S+)$')
    sp.ps, sp.pe = tonumber(ps), tonumber(pe)
  end
  return sp
end

local formats = {}
local function sfmt(count)
  local f = formats[count]
  if not f then f = '<' .. string.rep('d', count); formats[count] = f end
  return f
end

-- -> state (nil if absent or of another shape), version
local function decode(raw, sp)
  if not raw then return nil, 0 end
  local len = #raw
  if sp.a == 'g' then
    if len == 24 then
      local d, s, v = struct.unpack('<ddd', raw)
      return {d, s}, v
    end
  elseif sp.a == 's' then
    if len == 8 * (sp.n + 4) then
      local t = {struct.unpack(sfmt(sp.n + 4), raw)}
      local v = t[sp.n + 4]
      t[sp.n + 5] = nil
      t[sp.n + 4] = nil
      return t, v
    end
  elseif sp.a == 'k' then
    if len == 32 then
      local e, s, u, v = struct.unpack('<dddd', raw)
      return {e, s, u}, v
    end
  elseif len == 16 then
    local x, v = struct.unpack('<dd', raw)
    return x, v
  end
  if len >= 8 and len % 8 == 0 then
    local v = struct.unpack('<d', string.sub(raw, len - 7))
    return nil, v
  end
  return nil, 0
end

local function load(key, sp)
  return decode(redis.call('GET', key), sp)
end

-- -- GCRA ----------------------------------------------------------------------------------------
local function gcra_take(debt, since, t, sp, cost)
  local interval = sp.interval
  if debt > 0 then
    local elapsed = t - since
    if elapsed > 0 then
      if debt > elapsed then debt = debt - elapsed else debt = 0.0 end
    end
  end
  local new_debt = debt + cost * interval
  local admit = sp.max_debt
  if new_debt <= admit then
    local rem = floor((admit - new_debt) / interval)
    if rem > sp.burst - cost then
      if sp.burst > cost then rem = sp.burst - cost else rem = 0 end
    end
    return true, new_debt, rem, new_debt, 0.0
  end
  local free = admit - debt
  local remaining = 0
  if free > 0 then remaining = floor(free / interval) end
  if remaining > sp.burst then remaining = sp.burst end
  local retry = INF
  if cost <= sp.burst then retry = new_debt - sp.tol end
  return false, debt, remaining, debt, retry
end

local function gcra_adjust(debt, since, t, sp, delta)
  if debt > 0 then
    local elapsed = t - since
    if elapsed > 0 then
      if debt > elapsed then debt = debt - elapsed else debt = 0.0 end
    end
  end
  debt = debt + delta * sp.interval
  if debt > 0 then return debt end
  return 0.0
end

-- -- sliding window ---------------------------------------------------------------------------------
-- state: {fresh_at, last_slot, total, c_0 .. c_{n-1}}; slot s at index 4 + s % n
local function slot_of(t, width)
  local slot = floor(t / width)
  if slot * width > t then return slot - 1 end
  if (slot + 1) * width <= t then return slot + 1 end
  return slot
end

local function s_used(st, top, last, n)
  local gap = top - last
  if gap == 0 then return st[3] end
  if gap >= n then return 0.0 end
  local used = st[3]
  for s = last - n + 1, top - n do
    used = used - st[4 + s % n]
  end
  return used
end

local function s_reset_after(st, top, last, n, width, t)
  for s = last, top - n + 1, -1 do
    if st[4 + s % n] > 0 then return (s + n) * width - t end
  end
  return 0.0
end

local function sliding_take(st, t, sp, cost)
  local n, width, limit = sp.n, sp.w, sp.limit
  local cur = slot_of(t, width)
  if st == nil or st[3] <= 0 then
    if cost <= limit then
      local ra = 0.0
      if cost ~= 0 then ra = (cur + n) * width - t end
      return true, limit - cost, ra, 0.0
    end
    return false, limit, 0.0, INF
  end
  local last = st[2]
  local top, used
  if cur == last then
    top = cur
    used = st[3]
  else
    if cur > last then top = cur else top = last end
    used = s_used(st, top, last, n)
  end
  if used + cost <= limit then
    local ra
    if cost ~= 0 then ra = (top + n) * width - t else ra = s_reset_after(st, top, last, n, width, t) end
    return true, floor(limit - used - cost), ra, 0.0
  end
  local remaining = 0
  if used < limit then remaining = floor(limit - used) end
  local reset_after = s_reset_after(st, top, last, n, width, t)
  if cost > limit then return false, remaining, reset_after, INF end
  local excess = used + cost - limit
  local freed = 0.0
  for s = top - n + 1, last do
    freed = freed + st[4 + s % n]
    if freed >= excess then return false, remaining, reset_after, (s + n) * width - t end
  end
  return false, remaining, reset_after, INF
end

local function s_roll(st, cur, n)
  local last = st[2]
  if cur <= last then return last end
  if cur - last >= n then
    for i = 4, 3 + n do st[i] = 0.0 end
    st[3] = 0.0
  else
    local total = st[3]
    for s = last + 1, cur do
      local i = 4 + s % n
      total = total - st[i]
      st[i] = 0.0
    end
    st[3] = total
  end
  st[2] = cur
  return cur
end

local function sliding_charge(st, t, sp, amount)
  local n, width = sp.n, sp.w
  local cur = slot_of(t, width)
  local top
  if st == nil then
    st = {0.0, cur, 0.0}
    for i = 4, 3 + n do st[i] = 0.0 end
    top = cur
  elseif st[3] <= 0 then
    st[2] = cur
    top = cur
  elseif cur == st[2] then
    top = cur
  else
    top = s_roll(st, cur, n)
  end
  local i = 4 + top % n
  st[i] = st[i] + amount
  st[3] = st[3] + amount
  st[1] = (top + n) * width
  return st
end

local function sliding_refund(st, t, sp, amount, at)
  if st[3] <= 0 then return end
  local n, width = sp.n, sp.w
  local top = s_roll(st, slot_of(t, width), n)
  local left = amount
  if at ~= nil then
    local s = slot_of(at, width)
    if top - n < s and s <= top then
      local i = 4 + s % n
      local take = st[i]
      if left < st[i] then take = left end
      st[i] = st[i] - take
      st[3] = st[3] - take
    end
    return
  end
  for s = top, top - n + 1, -1 do
    local i = 4 + s % n
    local take = st[i]
    if left < st[i] then take = left end
    if take > 0 then
      st[i] = st[i] - take
      st[3] = st[3] - take
      left = left - take
      if left <= 0 then return end
    end
  end
end

local function sliding_is_fresh(st, t)
  return t >= st[1] or st[3] <= 0.0
end

__CALENDAR__

-- -- concurrency ------------------------------------------------------------------------------------
local function gauge_take(x, sp, cost)
  local new = x + cost
  local limit = sp.limit
  if new <= limit then return true, new, limit - new, 0.0, 0.0 end
  local retry = CONC_RETRY
  if cost > limit then retry = INF end
  local rem = 0
  if x < limit then rem = limit - x end
  return false, x, rem, 0.0, retry
end

-- -- writes -----------------------------------------------------------------------------------------
local function ttl_ms(seconds)
  -- TTLs are relative to the request's `now`
  local ms = math.ceil(seconds * 1000) + margin
  if ms < 1 then ms = 1 end
  return ms
end

-- Store a window's state (nil: fresh, delete the key); -> the new version
local function save(key, sp, st, v, t)
  if sp.a == 'g' then
    -- kept while debt is left at t (a state that drained already is fresh: it goes, with its version)
    if st ~= nil and st[1] ~= 0 and st[1] > t - st[2] then
      redis.call('SET', key, struct.pack('<ddd', st[1], st[2], v + 1), 'PX', ttl_ms(st[2] + st[1] - t))
      return v + 1
    end
  elseif sp.a == 's' then
    if st ~= nil and not sliding_is_fresh(st, t) then
      st[sp.n + 4] = v + 1
      redis.call('SET', key, struct.pack(sfmt(sp.n + 4), unpack(st)), 'PX', ttl_ms(st[1] - t))
      st[sp.n + 4] = nil
      return v + 1
    end
  elseif sp.a == 'k' then
    if st ~= nil and not sliding_is_fresh(st, t) then
      redis.call('SET', key, struct.pack('<dddd', st[1], st[2], st[3], v + 1), 'PX', ttl_ms(st[1] - t))
      return v + 1
    end
  else
    if st ~= nil and st ~= 0 then
      redis.call('SET', key, struct.pack('<dd', st, v + 1), 'PX', gauge_ttl)
      return v + 1
    end
  end
  redis.call('DEL', key)
  return 0
end

-- a state packed by the replica (no version), stored by its shape: GCRA 16 bytes, gauge 8, sliding more
local function save_packed(key, packed, v)
  local len = #packed
  local ttl = nil
  if len == 16 then
    local d, s = struct.unpack('<dd', packed)
    if d ~= 0 and d > now - s then ttl = ttl_ms(s + d - now) end
  elseif len == 8 then
    if struct.unpack('<d', packed) ~= 0 then ttl = gauge_ttl end
  elseif len == 24 or len >= 40 then
    -- a calendar period's {end, start, used} or a sliding window's {fresh_at, last_slot, total, ...}
    local fresh_at, last, total = struct.unpack('<ddd', packed)
    if not (now >= fresh_at or total <= 0.0) then ttl = ttl_ms(fresh_at - now) end
  end
  if ttl == nil then
    redis.call('DEL', key)
    return 0
  end
  redis.call('SET', key, packed .. struct.pack('<d', v + 1), 'PX', ttl)
  return v + 1
end

-- one window's take for a state as loaded: -> ok, new state, remaining, reset_after, retry_after
local function take(st, sp, cost, t)
  if sp.a == 'g' then
    local debt, since = 0.0, t
    if st ~= nil then debt, since = st[1], st[2] end
    local ok, nd, rem, ra, retry = gcra_take(debt, since, t, sp, cost)
    if since < t then since = t end
    return ok, {nd, since}, rem, ra, retry
  elseif sp.a == 's' then
    local ok, rem, ra, retry = sliding_take(st, t, sp, cost)
    return ok, st, rem, ra, retry
  elseif sp.a == 'k' then
    local ok, rem, ra, retry = calendar_take(st, t, sp, cost)
    return ok, st, rem, ra, retry
  end
  local ok, x, rem, ra, retry = gauge_take(st or 0, sp, cost)
  return ok, x, rem, ra, retry
end

-- -- A / P / J: one request (all of a key's windows, all or nothing) ------------------------------------
local function adjust_one(sp, st, delta, t, at)
  if sp.a == 'g' then
    local debt, since = 0.0, t
    if st ~= nil then debt, since = st[1], st[2] end
    debt = gcra_adjust(debt, since, t, sp, delta)
    if since < t then since = t end
    return {debt, since}
  elseif sp.a == 's' then
    if delta > 0 then return sliding_charge(st, t, sp, delta) end
    if st ~= nil then sliding_refund(st, t, sp, -delta, at) end
    return st
  elseif sp.a == 'k' then
    -- the spec's period is that of the request (M) or of the batch's newest change (F): a change from an
    -- older period has nothing left to change
    if t < sp.ps then return st end
    if delta > 0 then return calendar_charge(st, t, sp, delta) end
    if st ~= nil then calendar_refund(st, t, sp, -delta, at) end
    return st
  end
  local x = (st or 0) + delta
  if x > 0 then return x end
  return 0
end

local specs = {}
local mspecs = {}  -- an M call's spec table: requests name their windows' specs by index
local function window_spec(pos)
  return mspecs[tonumber(ARGV[pos])]
end
local function spec_of(s)
  local sp = specs[s]
  if not sp then sp = parse_spec(s); specs[s] = sp end
  return sp
end

-- keys KEYS[k0 + 1 ..], arguments ARGV[a0 + 1 ..] (spec, value) per window; -> the reply string
local function request(rop, k0, a0, nw, at)
  if rop == 'J' then
    for i = 1, nw do
      local key = KEYS[k0 + i]
      local sp = window_spec(a0 + 2 * i - 1)
      local delta = tonumber(ARGV[a0 + 2 * i])
      if delta ~= 0 then
        local st, v = load(key, sp)
        -- a refund to a sliding window with nothing in it changes nothing (the key may hold another shape)
        if not ((sp.a == 's' or sp.a == 'k') and delta < 0 and st == nil) then
          save(key, sp, adjust_one(sp, st, delta, now, at), v, now)
        end
      end
    end
    return '1'
  end
  local sps, sts, vers, costs, outs = {}, {}, {}, {}, {}
  local allowed = true
  for i = 1, nw do
    local sp = window_spec(a0 + 2 * i - 1)
    local cost = tonumber(ARGV[a0 + 2 * i])
    local st, v = load(KEYS[k0 + i], sp)
    local ok, ns, rem, ra, retry = take(st, sp, cost, now)
    sps[i], sts[i], vers[i], costs[i] = sp, st, v, cost
    outs[i] = {ok, ns, rem, ra, retry}
    if not ok and not sp.shadow then allowed = false end
  end
  local parts = {'0', '0'}
  local uncharged = 0
  for i = 1, nw do
    local o = outs[i]
    local sp = sps[i]
    if allowed then
      if o[1] then
        if rop == 'A' then
          if sp.a == 's' then
            if costs[i] ~= 0 then
              save(KEYS[k0 + i], sp, sliding_charge(sts[i], now, sp, costs[i]), vers[i], now)
            end
          elseif sp.a == 'k' then
            if costs[i] ~= 0 then
              save(KEYS[k0 + i], sp, calendar_charge(sts[i], now, sp, costs[i]), vers[i], now)
            end
          else
            save(KEYS[k0 + i], sp, o[2], vers[i], now)
          end
        end
      else
        uncharged = uncharged + 2 ^ (i - 1)
      end
    else
      uncharged = uncharged + 2 ^ (i - 1)
      if o[1] then  -- nothing is charged: report the window as it is
        local ok, ns, rem, ra, retry = take(sts[i], sp, 0, now)
        o = {true, ns, rem, ra, retry}
      end
    end
    local n = #parts
    parts[n + 1] = fmt('%d', o[3])
    parts[n + 2] = g(o[4])
    parts[n + 3] = g(o[5])
    if o[1] then parts[n + 4] = '1' else parts[n + 4] = '0' end
  end
  if allowed then parts[1] = '1' end
  parts[2] = fmt('%d', uncharged)
  return table.concat(parts, ' ')
end

-- -- M: many requests in one call (the pipeline of an event-loop iteration) -------------------------------
-- ARGV: 'M', margin, gauge ttl, count, specs, the specs, then per request: op, now, charged_at ('' if
-- none), windows, then windows x (spec index, value); KEYS: every request's keys, in order.
-- Reply: one string per request.
if op == 'M' then
  local count = tonumber(ARGV[4])
  local nspecs = tonumber(ARGV[5])
  for i = 1, nspecs do mspecs[i] = parse_spec(ARGV[5 + i]) end
  local reply = {}
  local a, k = 6 + nspecs, 0
  for r = 1, count do
    local rop = ARGV[a]
    now = tonumber(ARGV[a + 1])
    local at = tonumber(ARGV[a + 2])
    local nw = tonumber(ARGV[a + 3])
    reply[r] = request(rop, k, a + 3, nw, at)
    a = a + 4 + 2 * nw
    k = k + nw
  end
  return reply
end

-- -- F: write-behind flush and pull --------------------------------------------------------------------
-- ARGV: 'F', margin, gauge ttl, now, token TTL (ms; '' = no token), then per key: spec, mode (R replace
-- if the version is still `base`, else apply the deltas; D apply the deltas; G get), base, state
-- (packed, no version; '' = fresh), cap (GCRA: most debt one delta may add, in seconds; '' = no cap),
-- count, then count x (amount, at, charged_at); with a token, KEYS ends with the token's key.
-- Reply per key: status (1 replaced, 0 deltas applied, 2 read), version, state ('' when replaced, or
-- read and unchanged since `base`).
local function strip(raw)
  if not raw then return '' end
  return string.sub(raw, 1, #raw - 8)
end

if op == 'F' then
  now = tonumber(ARGV[4])
  local nkeys = #KEYS
  local done = false
  if ARGV[5] ~= '' then
    -- the batch's token (its key is the last one): a batch resent because its answer was lost is not
    -- applied twice; it is answered like a read
    nkeys = nkeys - 1
    done = not redis.call('SET', KEYS[nkeys + 1], '1', 'NX', 'PX', tonumber(ARGV[5]))
  end
  local reply = {}
  local p = 6
  for i = 1, nkeys do
    local key = KEYS[i]
    local sp = spec_of(ARGV[p])
    local mode = ARGV[p + 1]
    local base = tonumber(ARGV[p + 2])
    local packed = ARGV[p + 3]
    local cap = tonumber(ARGV[p + 4])
    local count = tonumber(ARGV[p + 5])
    local first = p + 6
    p = first + 3 * count
    local raw = redis.call('GET', key)
    local st, v = decode(raw, sp)
    if mode == 'G' or done then
      reply[#reply + 1] = 2
      reply[#reply + 1] = v
      if v == base and not done then reply[#reply + 1] = '' else reply[#reply + 1] = strip(raw) end
    elseif mode == 'R' and v == base then
      -- our state replaces it as it is, whatever its shape (the memory store keeps what was written last)
      reply[#reply + 1] = 1
      reply[#reply + 1] = save_packed(key, packed, v)
      reply[#reply + 1] = ''
    else
      for j = first, p - 1, 3 do
        local amount = tonumber(ARGV[j])
        local t = tonumber(ARGV[j + 1])
        local cat = tonumber(ARGV[j + 2])
        if cap ~= nil and sp.a == 'g' and amount * sp.interval > cap then
          amount = cap / sp.interval
        end
        if not ((sp.a == 's' or sp.a == 'k') and amount < 0 and st == nil) then
          st = adjust_one(sp, st, amount, t, cat)
        end
      end
      local nv = save(key, sp, st, v, now)
      reply[#reply + 1] = 0
      reply[#reply + 1] = nv
      if nv == 0 then reply[#reply + 1] = '' else reply[#reply + 1] = strip(redis.call('GET', key)) end
    end
  end
  return reply
end

return redis.error_reply('nexus: unknown op ' .. tostring(op))
""".replace("__CONC_RETRY__", repr(float(CONCURRENCY_RETRY_AFTER))).replace("__CALENDAR__", CALENDAR_LUA)

SCRIPT_SHA: Final = hashlib.sha1(SCRIPT.encode()).hexdigest()
