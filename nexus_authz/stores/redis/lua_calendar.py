"""The calendar period's functions of the Lua script (`lua`), the twins of `core/calendar.py`.

The script has no time zone database: each calendar spec arrives with the bounds [ps, pe) of the period
holding the request's `now` (or, in a flush, the batch's newest change), computed in Python (`wire`).
"""

from __future__ import annotations

from typing import Final

__all__ = ["CALENDAR_LUA"]

CALENDAR_LUA: Final = r"""
-- -- calendar period ----------------------------------------------------------------------------------
-- state: {end, start, used}; counted when start >= the period's start and the state's end is after t
-- (core/calendar.py)
local function calendar_take(st, t, sp, cost)
  local start, e, limit = sp.ps, sp.pe, sp.limit
  local used = 0.0
  if st ~= nil and st[2] >= start and st[3] > 0 and t < st[1] then
    used = st[3]
    e = st[1]
  end
  if used + cost <= limit then
    local ra = 0.0
    if used + cost > 0 then ra = e - t end
    return true, floor(limit - used - cost), ra, 0.0
  end
  local remaining = 0
  if used < limit then remaining = floor(limit - used) end
  local ra = 0.0
  if used > 0 then ra = e - t end
  local retry = INF
  if cost <= limit then retry = e - t end
  return false, remaining, ra, retry
end

local function calendar_charge(st, t, sp, amount)
  if st == nil then return {sp.pe, sp.ps, amount} end
  if st[2] >= sp.ps and st[3] > 0 and t < st[1] then
    st[3] = st[3] + amount
  else
    st[1], st[2], st[3] = sp.pe, sp.ps, amount
  end
  return st
end

local function calendar_refund(st, t, sp, amount, at)
  local used = st[3]
  if used <= 0 or st[2] < sp.ps or t >= st[1] then return end
  if at ~= nil and at < st[2] then return end
  if amount < used then st[3] = used - amount else st[3] = 0.0 end
end
"""
