"""Key and team counters in Redis: rpm, tpm, max_parallel and budget, shared by every instance.

Reserve, then settle, in one atomic Lua script per batch (``batch``: one round trip, no
read-then-write race): the reservations that queued during the last round trip are checked
in order, each admitted only if every scope of its request (the key, its team) has room, and
counted (one request, its in-flight slot, its reserved tokens and, in a scope with a budget,
its reserved cost); the settles queued meanwhile, merged per scope and budget period, replace
reserved tokens by the usage and reserved cost by the cost, and free the slots. Rates are
one-second buckets of a hash per scope, summed over the last minute, on Redis's clock (one
clock for all).

The budget of a period is the larger of the database's figure (every instance's written
spend) and Redis's (every instance's spend, at once): Redis is ahead until it loses its data.
A scope admits while that plus the cost reserved in flight by every live instance is under
its budget: the same rule, and the same bound, as on one process (``control.limits``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .._aiohttp import request_state
from ..context import CACHE_ANSWERS, Call
from ..control.database import RATE_LIMIT_HEADERS
from ..control.limits import RESERVATION, ReserveHere, task_of, unless_cached
from ..control.meters import A_MINUTE, HEADER_NAMES, KeyLimits, reset_text
from ..control.records import KeyEntry, TeamEntry, period_end
from ..errors import RateLimited
from .batch import LuaScript, script_failed
from .link import RedisLink

if TYPE_CHECKING:
    from ..control.clock import ControlClock

__all__ = ["SharedCounters", "SharedReservation"]

log = logging.getLogger("aioproxy")

_NONE = -1  # a limit not set, as the scripts read it

# One script per batch of the event loop's requests (``SharedCounters.take``): first the
# settles merged since the last batch (one per scope and budget period, not one per request),
# then each reservation in the order they came, checked and counted as if one script ran per
# request; each scope's windows are read once per batch and its counts written once.
# Its two arguments are flat MessagePack arrays (one string each for Redis to read, not a
# word per figure for the client to encode): ARGV[1] the calls whose answer was lost (an
# array of arrays: per call its number, then its settles as here), then the settles, per
# settle: the scope's Redis key, its token change, the slots freed, the cost, its budget
# period, the period's TTL (0: none), the reserved cost it releases (nano-USD); ARGV[2] this
# call's number (one more than this instance's last call's), then the reservations, per
# reservation: its tokens, its reserved cost (nano-USD; -1, ``REQUEST_ONLY``: a request counted
# toward rpm alone, held to no other limit, taking no slot), its number of scopes, per scope: its
# Redis key, rpm, tpm, max_parallel, max_budget (-1: not set), the database's spend and the
# budget period; ARGV[3] this instance, ARGV[4] the prefix of its keys, ARGV[5] a lease's
# length (ms) (``RedisLink.lease``). Requests in flight are a hash per scope (``:flights``, not the
# counter ``:f`` earlier versions kept: a rolling upgrade meets no key of the wrong type), a
# field per instance, and so is the cost they reserve (``:held``, in a scope with a budget):
# an instance's field counts while its lease lives (its own always), and a dead one's is
# dropped. A reservation of no tokens (a cached answer) is not held to the tpm. Returns,
# packed, per reservation: {1, reset, per scope its requests and tokens in the window}, or,
# refused, {0, reset, those counts, the scope's position, the reason, the wait}, or {2}: a key
# of its scopes cannot be counted (``UNCHECKED``, below). A call that met such keys returns
# {those replies, packed; the keys and why, packed}.
# A call's answer can be lost after Redis ran it (a timeout, a dropped connection): its
# requests then went on without Redis. The record (a key per instance) holds the number of
# the last call run and what its reservations took (per scope: key, slots, reserved cost).
# Every call after a lost one carries it (``SharedCounters.take``: none is sent while Redis is
# lost), so the first to run settles it: frees what it took if it ran (its requests are not in
# flight here), or applies its settles if it did not (sent again, counted once); a lost call
# reaching Redis after a later one ran is ignored. Its rate counts stay (they expire within
# the minute). A call numbered below the record's is such a late one: it does nothing.
# How it stays whole (Redis keeps what a script wrote before it failed: a call fails whole or
# not at all): every argument's type and range is checked, and every key the call touches is
# read once, checked (of its type, holding counts, a spend INCRBYFLOAT adds to) and copied;
# the counts are computed on the copies, and written at the end, each count's final value set
# (HSET: no command that can fail on what a key holds). A call that fails (on arguments only
# aioproxy's own code can get wrong) writes nothing; its error is the caller's
# (``_Waiters.set_exception``). Each key read once: a call costs Redis about what it did before
# any check. A key the call cannot count (one under the prefix given another type, or what is
# not a count) fails its scope alone, not the batch: that scope's reservations are answered
# unchecked (counted by their process, as with Redis away), its settles' changes to that key
# dropped, the rest of the batch counted.
_APPLY = """
local clock = redis.call('TIME')
local sec = tonumber(clock[1])
local now = sec + tonumber(clock[2]) / 1000000
local reset = sec + 60 - now
local second = tostring(sec)  -- this second's bucket, as HGETALL names it
local me, prefix = ARGV[3], ARGV[4]
local alive, record = prefix .. 'alive:', prefix .. 'applied:' .. me .. ':counters'
local function fail(what) error('aioproxy counters: ' .. what, 0) end
local BOUND = 1e17  -- integers a command is given as written (not as 1e+17)
local function int(v, low)
  return type(v) == 'number' and v == math.floor(v) and v >= low and v < BOUND
end
-- The tokens and nano-USD a request brings (its max_tokens, its cost's estimate) count as at
-- most MOST either way: no request fails the call, nor grows a count past BOUND.
local MOST = 1e12
local function bounded(list, i, low)
  local v = list[i]
  if type(v) ~= 'number' or v ~= math.floor(v) or v < low then return false end
  list[i] = math.max(-MOST, math.min(MOST, v))
  return true
end
local function figure(v, low) return type(v) == 'number' and v >= low and v < 1e300 end
local function limit(v) return type(v) == 'number' and v >= -1 end  -- compared only
local function name(v) return type(v) == 'string' and v ~= '' end
local function whole(text)  -- an integer as a command's argument (at most 18 digits)
  local digits = text:match('^-?(%d+)$')
  return digits ~= nil and #digits <= 18
end
-- A key this call cannot count (of another type, holding what is not a count): its scope's
-- alone. Reported (key, why) with the answer; the requests of its scope answered UNCHECKED
-- (counted by their process), nothing written to it. Its reader answers false.
local broken, UNCHECKED = {}, {2}
local function unusable(key, why)
  broken[#broken + 1] = key
  broken[#broken + 1] = why
  return false
end
local kinds = {}  -- per key read: the type it is read as (one read as two: unusable)
local function read(key, kind, command)
  local was = kinds[key]
  if was ~= nil and was ~= kind then return nil, key .. ' is used as two types' end
  kinds[key] = kind
  local reply = redis.pcall(command, key)
  if type(reply) == 'table' and reply.err then return nil, reply.err end
  return reply
end
-- A hash's fields and values, read for ``memo`` (which holds false for it until it is parsed);
-- false if it is unusable.
local function hash(memo, key)
  local all, why = read(key, 'hash', 'HGETALL')
  memo[key] = false
  return all or unusable(key, why)
end
-- A count read: any number is summed; one this call writes back (HSET), an integer.
local NOT_COUNT = 'holds a field that is not a count'
local function count(text)
  local v = tonumber(text)
  if v and v % 1 == 0 and v < BOUND and v > -BOUND then return v end
end
-- A window of one-second buckets: this second's count, the others' sum over the last minute
-- and their oldest second with a count, the buckets older than that (dropped), and whether
-- this second's count changed.
local windows = {}
local function window(key)
  local w = windows[key]
  if w ~= nil then return w end
  local all = hash(windows, key)
  if not all then return false end
  local here, sum, oldest, stale, out = 0, 0, nil, {}, sec - 60
  for i = 1, #all, 2 do
    local field = all[i]
    if field == second then
      here = count(all[i + 1])
      if not here then return unusable(key, NOT_COUNT) end
    else
      local s, v = tonumber(field), tonumber(all[i + 1])
      if not (s and v) then return unusable(key, NOT_COUNT) end
      if s <= out then
        stale[#stale + 1] = field
      else
        sum = sum + v
        if v > 0 and (oldest == nil or s < oldest) then oldest = s end
      end
    end
  end
  w = {here, sum, oldest, stale, false}
  windows[key] = w
  return w
end
local function add(w, n)
  w[1], w[5] = w[1] + n, true
end
local function totals(w)  -- the window's count, and its oldest second with one
  local oldest = w[3]
  if w[1] > 0 and (oldest == nil or sec < oldest) then oldest = sec end
  return w[1] + w[2], oldest
end
-- Requests in flight, or the cost they reserve: a field per instance, this one's count (it
-- changed: written), the others' (fields and counts), then what the live ones hold (read once,
-- when needed: a dead one's, whose lease ran out, is dropped), those dead, whether this call
-- took any (the hash's TTL renewed).
local instances = {}
local function per_instance(key)
  local h = instances[key]
  if h ~= nil then return h end
  local all = hash(instances, key)
  if not all then return false end
  local mine, others = 0, {}
  for i = 1, #all, 2 do
    if all[i] == me then
      mine = count(all[i + 1])
      if not mine then return unusable(key, NOT_COUNT) end
    else
      local v = tonumber(all[i + 1])
      if not v then return unusable(key, NOT_COUNT) end
      others[#others + 1] = all[i]
      others[#others + 1] = v
    end
  end
  h = {mine, others, nil, {}, false, false}
  instances[key] = h
  return h
end
local function in_flight(h)
  if h[3] == nil then
    local others, total = h[2], 0
    for i = 1, #others, 2 do
      if redis.call('EXISTS', alive .. others[i]) == 1 then
        total = total + others[i + 1]
      else
        h[4][#h[4] + 1] = others[i]
      end
    end
    h[3] = total
  end
  return h[1] + h[3]
end
local function free(h, n)
  if h and n > 0 then h[1], h[5] = math.max(0, h[1] - n), true end
end
local function take(h, n)
  h[1], h[5], h[6] = h[1] + n, true, true
end
-- A spend: its amount, what this call adds (INCRBYFLOAT), the TTL a settle sets (0: none).
local spends = {}
local function spend(key)
  local s = spends[key]
  if s ~= nil then return s end
  local value, why = read(key, 'string', 'GET')
  spends[key] = false
  if value == nil then return unusable(key, why) end
  local amount = 0
  if value then
    amount = tonumber(value)
    if not (value:match('^[-+]?[%d.]+[eE]?[-+]?%d*$') and figure(amount, -1e300)) then
      return unusable(key, 'does not hold a number')
    end
  end
  s = {amount, 0, 0}
  spends[key] = s
  return s
end
local function checked_settles(list)
  if (#list - 1) % 7 ~= 0 then fail('settles') end
  for a = 2, #list, 7 do
    local cost, ttl = list[a + 3], list[a + 5]
    if not (name(list[a]) and bounded(list, a + 1, -MOST) and int(list[a + 2], 0)
        and figure(cost, 0) and name(list[a + 4]) and int(ttl, 0) and ttl < 2 ^ 31
        and bounded(list, a + 6, 0)) then
      fail('a settle')
    end
  end
end
local function settle(list)
  for a = 2, #list, 7 do
    local base, delta, cost = list[a], list[a + 1], list[a + 3]
    local t = window(base .. ':t')  -- each change to a key unusable dropped, the rest made
    if t and delta ~= 0 then add(t, delta) end
    free(per_instance(base .. ':flights'), list[a + 2])
    free(per_instance(base .. ':held'), list[a + 6])
    local s = cost > 0 and spend(base .. ':s:' .. list[a + 4])
    if s then
      s[1], s[2] = s[1] + cost, s[2] + cost
      if list[a + 5] > 0 then s[3] = list[a + 5] end
    end
  end
end
if not (name(me) and whole(ARGV[5]) and tonumber(ARGV[5]) > 0) then fail('arguments') end
local settles, words = cmsgpack.unpack(ARGV[1]), cmsgpack.unpack(ARGV[2])
if type(settles) ~= 'table' or type(settles[1]) ~= 'table' or type(words) ~= 'table'
    or not int(words[1], 1) then
  fail('arguments')
end
local call = words[1]
-- This instance's record, if it is one: else as if none were kept (as when it expired),
-- reported and replaced.
local function recorded(kept)
  local ok, last = pcall(cmsgpack.unpack, kept)
  if not (ok and type(last) == 'table' and int(last[1], 0) and (#last - 1) % 3 == 0) then
    return nil
  end
  for i = 2, #last, 3 do
    if not (name(last[i]) and int(last[i + 1], 0) and int(last[i + 2], 0)) then return nil end
  end
  return last
end
local kept, why = read(record, 'string', 'GET')  -- false: none kept; nil: unreadable
local last = kept ~= false and (kept and recorded(kept) or unusable(record, why or 'is no record'))
last = last or {0}
if last[1] >= call then return cmsgpack.pack({}) end
for _, lost in ipairs(settles[1]) do
  if type(lost) ~= 'table' or not int(lost[1], 0) then fail('a lost call') end
  if lost[1] > last[1] then
    checked_settles(lost)
  end
end
checked_settles(settles)
local at = 2
while at <= #words do
  local n = words[at + 2]
  if not (bounded(words, at, 0) and bounded(words, at + 1, -1) and int(n, 1)
      and at + 2 + 7 * n <= #words) then
    fail('a reservation')
  end
  for b = at + 3, at + 2 + 7 * n, 7 do
    if not (name(words[b]) and limit(words[b + 1]) and limit(words[b + 2])
        and limit(words[b + 3]) and limit(words[b + 4]) and type(words[b + 5]) == 'number'
        and name(words[b + 6])) then
      fail('a reservation')
    end
  end
  at = at + 3 + 7 * n
end
for _, lost in ipairs(settles[1]) do
  if lost[1] == last[1] then
    for i = 2, #last, 3 do
      free(per_instance(last[i] .. ':flights'), last[i + 1])
      free(per_instance(last[i] .. ':held'), last[i + 2])
    end
  elseif lost[1] > last[1] then
    settle(lost)
  end
end
settle(settles)
-- Per scope: requests, tokens, their oldest seconds and requests in flight, with what this
-- batch adds; then what it adds (requests, tokens, reserved cost), the cost reserved in flight
-- (if budgeted), the slots it takes; then its windows (requests, tokens) and hashes (in
-- flight, the cost reserved: if budgeted). False: a key of the scope is unusable.
local scopes = {}
local function scope(base, budgeted)
  local w = scopes[base]
  if w == nil then
    local r, t, f = window(base .. ':r'), window(base .. ':t'), per_instance(base .. ':flights')
    if not (r and t and f) then
      scopes[base] = false
      return false
    end
    local requests, r_oldest = totals(r)
    local used, t_oldest = totals(t)
    w = {requests, used, r_oldest, t_oldest, in_flight(f), 0, 0, 0, nil, 0, r, t, f, nil}
    scopes[base] = w
  end
  if w and budgeted and w[14] == nil then
    local h = per_instance(base .. ':held')
    if not h then return false end
    w[14], w[9] = h, in_flight(h)
  end
  return w
end
-- Whether every key of the reservation's scopes (from ``first`` to ``after``) is usable:
-- each read, every unusable one reported.
local function usable(first, after)
  local all = true
  for b = first, after - 1, 7 do
    local budgeted = words[b + 4] >= 0
    if not scope(words[b], budgeted) then all = false end
    if budgeted and not spend(words[b] .. ':s:' .. words[b + 6]) then all = false end
  end
  return all
end
local replies, a = {}, 2
while a <= #words do
  local tokens, held, n = words[a], words[a + 1], words[a + 2]
  local slot = held >= 0
  local first = a + 3
  a = first + 7 * n
  local out = {1, reset}
  local refused, wait
  if usable(first, a) then
    for b = first, a - 1, 7 do
      local w = scopes[words[b]]
      out[#out + 1] = w[1]
      out[#out + 1] = w[2]
    end
  else
    out, refused = UNCHECKED, true
  end
  for s = 1, refused and 0 or n do
    local b = first + 7 * (s - 1)
    local w = scopes[words[b]]
    local rpm, tpm, parallel, budget = words[b + 1], words[b + 2], words[b + 3], words[b + 4]
    if slot and parallel >= 0 and w[5] >= parallel then
      refused, wait = 'parallel', 1
    elseif rpm >= 0 and w[1] >= rpm then
      refused, wait = 'rpm', (w[3] or sec) + 60 - now
    elseif tpm >= 0 and tokens > 0 and w[2] + tokens > tpm then
      refused, wait = 'tpm', w[4] and (w[4] + 60 - now) or 60
    elseif slot and budget >= 0 then
      local total = spends[words[b] .. ':s:' .. words[b + 6]][1]
      if words[b + 5] > total then total = words[b + 5] end
      if total >= budget then
        refused, wait = 'budget', 0
      elseif total + w[9] / 1e9 >= budget then
        refused, wait = 'held', 1
      end
    end
    if refused then
      out[1] = 0
      out[#out + 1] = s
      out[#out + 1] = refused
      out[#out + 1] = wait
      break
    end
  end
  if not refused then
    for s = 1, n do
      local b = first + 7 * (s - 1)
      local w = scopes[words[b]]
      w[1], w[2], w[6], w[7] = w[1] + 1, w[2] + tokens, w[6] + 1, w[7] + tokens
      if slot then w[5], w[10] = w[5] + 1, w[10] + 1 end
      if held > 0 and words[b + 4] >= 0 then w[8], w[9] = w[8] + held, w[9] + held end
      if w[3] == nil then w[3] = sec end
      if w[4] == nil and tokens > 0 then w[4] = sec end
      out[1 + 2 * s] = w[1]
      out[2 + 2 * s] = w[2]
    end
  end
  replies[#replies + 1] = out
end
-- Every read done, nothing failed: the writes (none to a key unusable: false here).
local function drop(key, fields)  -- in HDELs of at most 1,000 fields (unpack's stack)
  for i = 1, #fields, 1000 do
    redis.call('HDEL', key, unpack(fields, i, math.min(i + 999, #fields)))
  end
end
local taken = {call}
for base, w in pairs(scopes) do
  if w then
    if w[6] > 0 then
      add(w[11], w[6])
      add(w[12], w[7])
    end
    if w[10] > 0 then take(w[13], w[10]) end
    if w[8] > 0 then take(w[14], w[8]) end
    if w[10] > 0 or w[8] > 0 then
      taken[#taken + 1] = base
      taken[#taken + 1] = w[10]
      taken[#taken + 1] = w[8]
    end
  end
end
redis.call('SET', alive .. me, 1, 'PX', ARGV[5])
for key, w in pairs(windows) do
  if w then
    drop(key, w[4])
    if w[5] then
      redis.call('HSET', key, second, w[1])
      redis.call('EXPIRE', key, 120)
    end
  end
end
for key, h in pairs(instances) do
  if h then
    drop(key, h[4])
    if h[5] then
      if h[1] > 0 then redis.call('HSET', key, me, h[1]) else redis.call('HDEL', key, me) end
    end
    if h[6] then redis.call('EXPIRE', key, 3600) end
  end
end
for key, s in pairs(spends) do
  if s and s[2] > 0 then
    redis.call('INCRBYFLOAT', key, s[2])
    if s[3] > 0 then redis.call('EXPIRE', key, s[3]) end
  end
end
redis.call('SET', record, cmsgpack.pack(taken), 'EX', 86400)
if #broken > 0 then return {cmsgpack.pack(replies), cmsgpack.pack(broken)} end
return cmsgpack.pack(replies)
"""

_pack = msgspec.msgpack.Encoder().encode
# A budget period's spend outlives it by an hour in Redis, and at most ~68 years: the script
# takes no longer TTL (a "30000d" period would fail the batch its settle rides in).
_LONGEST_TTL = 2**31 - 1


def _ttl(left: float) -> int:
    """The TTL of a spend counted ``left`` seconds before its budget period ends."""
    return min(_LONGEST_TTL, max(1, math.ceil(left) + 3600))


_NO_SETTLES = _pack([[]])  # a call's settles when those it had could not be packed


def _packed(words: list[Any], dropped: str) -> bytes | Exception:
    """``words`` packed, or why they cannot be (logged, with what is ``dropped`` for it)."""
    try:
        return _pack(words)
    except Exception as exc:  # noqa: BLE001 - a bug (the limits bound every number): these words' alone
        log.error("state: a counters call could not be packed (%s): %s", exc, dropped)
        return exc


_unpack = msgspec.msgpack.Decoder(list[list[Any]]).decode
_unpack_broken = msgspec.msgpack.Decoder(list[str]).decode  # key, why, key, why ...

UNCHECKED = 2  # a reservation's answer: a key of its scopes cannot be counted in Redis
_NOT_COUNTED = [UNCHECKED]

_SCOPE_WORDS = {"key": "This API key", "team": "This API key's team"}


def _period_tag(end: float | None) -> str:
    return "ever" if end is None else repr(end)


def _refusal(scope: str, entry: KeyEntry | TeamEntry, reason: str, wait: float) -> RateLimited:
    whose = _SCOPE_WORDS[scope]
    if reason == "parallel":
        message = f"{whose} has {entry.max_parallel} requests in flight, its max_parallel"
    elif reason == "rpm":
        message = f"{whose} is over its rate limit of {entry.rpm} requests a minute"
    elif reason == "tpm":
        message = f"{whose} is over its rate limit of {entry.tpm} tokens a minute"
    elif reason == "held":
        message = (
            f"{whose} has the rest of its budget of ${entry.max_budget:g} reserved by its "
            "requests in flight"
        )
    else:
        message = f"{whose} has spent its budget of ${entry.max_budget:g}" + (
            " for this period" if entry.duration is not None else ""
        )
    code = "insufficient_quota" if reason in ("budget", "held") else "rate_limit_exceeded"
    refused = RateLimited(message, code=code, headers={"Retry-After": str(max(1, math.ceil(wait)))})
    refused.caused_by_upstream = False
    # aioproxy_rate_limited_total's scope, as the per-process limits name it.
    refused.scope = "budget" if reason in ("budget", "held") else scope
    return refused


class _Scope:
    """One scope of a key's limits as the script reads it, made once per cache load: its
    Redis key, its limits, and its budget period (kept until the period ends); and so, made
    once per period, its words in a reservation and its key among the settles merged."""

    __slots__ = (
        "base",
        "budgeted",
        "end",
        "entry",
        "floor",
        "limits",
        "period",
        "settled",
        "start",
        "words",
    )

    def __init__(self, base: str, entry: KeyEntry | TeamEntry) -> None:
        self.base = base
        self.entry = entry
        limits = (entry.rpm, entry.tpm, entry.max_parallel, entry.max_budget)
        self.limits = tuple(_NONE if value is None else value for value in limits)
        self.budgeted = entry.max_budget is not None  # keeps its requests' reserved cost
        self.start = self.end = math.inf  # no period yet: computed at first use
        self._in_period("ever", 0.0)

    def _in_period(self, period: str, floor: float) -> None:
        self.period = period
        self.floor = floor  # the database's spend of the period
        # Its words in a reservation (``_APPLY``): key, rpm, tpm, max_parallel, max_budget,
        # the database's spend and the budget period.
        self.words = (self.base, *self.limits, floor, period)
        self.settled = (self.base, period)  # its settles merge under this key

    def at(self, wall: float) -> None:
        """Move to the budget period holding ``wall``."""
        entry = self.entry
        end = period_end(entry.created_at, entry.duration, wall)
        self._in_period(_period_tag(end), entry.spend if entry.budget_resets_at == end else 0.0)
        if end is None or entry.duration is None:
            self.start, self.end = -math.inf, math.inf
        else:
            self.start, self.end = end - entry.duration, end


class _Prepared:
    """A key's limits as the requests of one cache load use them: their scopes, and per kind
    of x-ratelimit-* header the limits it is made from (limit, its text, its count's position
    in the script's answer)."""

    __slots__ = (
        "end",
        "headers",
        "limits",
        "moving",
        "resets",
        "scopes",
        "start",
        "unmoving",
        "words",
    )

    def __init__(self, prefix: str, limits: KeyLimits) -> None:
        self.limits = limits
        self.scopes = [
            _Scope(f"{prefix}:{scope[0]}:{entry.id}", entry) for scope, entry, _ in limits.scopes
        ]
        self.start = self.end = math.inf  # no period yet: ``at`` at first use
        self.words: tuple[Any, ...] = ()
        self.headers: list[tuple[tuple[str, str, str], list[tuple[int, str, int]]]] = []
        for kind, position, attribute in (("requests", 2, "rpm"), ("tokens", 3, "tpm")):
            limited = []
            for index, (_, entry, _) in enumerate(limits.scopes):
                limit = getattr(entry, attribute)
                if limit is not None:
                    limited.append((limit, str(limit), position + 2 * index))
            if limited:
                self.headers.append((HEADER_NAMES[kind], limited))
        # Where each kind of limit is set in one scope only (a key with no team, or a team
        # with no rpm nor tpm of its own), no search for the scope with the least room: the
        # headers are a copy of the texts that do not move (the limits, and the reset the
        # script's answer gives but in a clock's jump: a minute away), the remaining's place
        # kept in order; per kind the name of what moves, the limit and its count's position,
        # and the reset's names (``_headers``).
        self.unmoving: dict[str, str] | None = None
        self.moving: tuple[tuple[str, int, int], ...] = ()
        self.resets: tuple[str, ...] = ()
        if all(len(limited) == 1 for _, limited in self.headers):
            self.unmoving = {
                name: text
                for (limit_name, remaining_name, reset_name), ((_, limit_text, _),) in self.headers
                for name, text in (
                    (limit_name, limit_text),
                    (remaining_name, ""),
                    (reset_name, A_MINUTE),
                )
            }
            self.moving = tuple(
                (remaining_name, limit, position)
                for (_, remaining_name, _), ((limit, _, position),) in self.headers
            )
            self.resets = tuple(reset_name for (_, _, reset_name), _ in self.headers)

    def at(self, wall: float) -> None:
        """Move each scope to its budget period holding ``wall``; then the reservation's words
        (its number of scopes, then theirs) and when one of those periods ends."""
        for scope in self.scopes:
            if not scope.start <= wall < scope.end:
                scope.at(wall)
        self.words = (len(self.scopes), *(word for scope in self.scopes for word in scope.words))
        self.start = max((scope.start for scope in self.scopes), default=-math.inf)
        self.end = min((scope.end for scope in self.scopes), default=math.inf)


class SharedReservation:
    """What the script counted for one request, settled once (after the answer, or when its
    task ends without one)."""

    __slots__ = ("counters", "held", "pending", "released", "scopes", "tokens")

    def __init__(
        self, counters: SharedCounters, scopes: list[_Scope], tokens: int, held: int = 0
    ) -> None:
        self.counters = counters
        self.scopes = scopes
        self.tokens = tokens  # counted toward tpm now
        self.held = held  # nano-USD reserved toward the budgets, until released
        self.pending = 0  # tokens to add (or take off) when released
        self.released = False

    def count_tokens(self, tokens: int, _now: float = 0.0) -> None:
        """A failed request: keep its request counted, not its tokens (sent on release), nor
        its reserved cost (released now: a failure is not charged)."""
        self.pending += tokens - self.tokens
        self.tokens = tokens
        if self.held:
            held, self.held = self.held, 0
            self.counters.settle(self.scopes, 0, 0, 0.0, None, held)

    def release(self, _task: object = None) -> None:
        """The request's task ended before ``settle``: free the slot and the reserved cost."""
        if not self.released:
            self.released = True
            pending, self.pending = self.pending, 0
            held, self.held = self.held, 0
            self.counters.settle(self.scopes, pending, 1, 0.0, None, held)

    def settle(self, tokens: int, cost: float | None, wall: float) -> None:
        """The answer is out: its usage for the reservation, the slot freed (once), the cost
        added in place of the cost reserved. Merged, not awaited: it goes with the next batch,
        and nothing waits for it."""
        freed = 0 if self.released else 1
        self.released = True
        # With what ``count_tokens`` left to send (a stream that failed midway: on_error,
        # then this), or that change was lost and the reservation stayed counted.
        delta = tokens - self.tokens + self.pending
        self.tokens, self.pending = tokens, 0
        held, self.held = self.held, 0
        self.counters.settle(self.scopes, delta, freed, cost or 0.0, wall, held)


# A reservation waiting for its batch: its future, then its scopes, tokens and reserved cost
# (for a request gone meanwhile, whose counts are freed as soon as they are made).
_Waiting = tuple["asyncio.Future[Any]", list[_Scope], int, int]


class _Waiters:
    """The reply of one batch's script: each reservation's answer to its future at once."""

    __slots__ = ("answered", "call", "counters", "lost", "waiting")

    def __init__(
        self,
        counters: SharedCounters,
        waiting: list[_Waiting],
        lost: list[list[Any]],
        call: list[Any],
    ) -> None:
        self.counters = counters
        self.waiting = waiting
        # The calls whose answer was lost that it carries, and itself (its number, then its
        # settles): if its answer is lost too, each goes again.
        self.lost = lost
        self.call = call
        self.answered = False  # (no future of its own: close waits on the counters' one)

    def done(self) -> bool:
        return self.answered

    def set_result(self, packed: Any, /) -> None:
        replies = packed  # bytes, or [bytes, bytes]: it met keys it cannot count
        if type(replies) is list:
            replies, broken = replies
            self.counters.unusable(_unpack_broken(broken))
        for waiting, reply in zip(self.waiting, _unpack(replies), strict=True):
            try:  # (no test of ``done`` first: ~6 bytecodes a request fewer)
                waiting[0].set_result(reply)
            except asyncio.InvalidStateError:  # its request was cancelled while it waited:
                _, scopes, tokens, held = waiting
                if reply[0] == 1 and held >= 0:  # no slot leaks (rpm alone took none)
                    SharedReservation(self.counters, scopes, tokens, held).release()
        self.answered = True
        self.counters.answered(self)

    def set_exception(self, exception: BaseException, /) -> None:
        """Its outcome is unknown (Redis may have run it): the next call sets it right. But a
        call the script ran and failed on (a value it cannot count, a key of another type) is
        dropped, logged: carried, it would fail every later call the same way and hold the
        limits on per-process counters for good (it wrote nothing: ``_APPLY``)."""
        for future, *_ in self.waiting:
            if not future.done():
                future.set_exception(exception)
        if script_failed(exception):
            log.error(
                "state: Redis refused a counters call (%s): its settles are dropped, and the "
                "calls it carried",
                exception,
            )
        else:
            self.counters.missed([*self.lost, self.call], exception)
        self.answered = True
        self.counters.answered(self)

    def cancel(self) -> bool:
        for future, *_ in self.waiting:
            future.cancel()
        self.answered = True
        self.counters.answered(self)
        return True


class SharedCounters:
    """The Redis side of the limits plugin (``aioproxy.control.limits``)."""

    def __init__(self, link: RedisLink, clock: ControlClock) -> None:
        self.link = link
        self.clock = clock
        self.closed = link.config.on_error == "closed"
        self.script = LuaScript(_APPLY)
        self.batcher = link.batcher
        self._loop = asyncio.get_running_loop()
        # Queued for the next batch: reservations (their script words after the call's
        # number, and who waits), and the settles merged per scope and budget period:
        # [tokens, slots, cost, end, wall, reserved cost released].
        self._words: list[Any] = [0]
        self._waiting: list[_Waiting] = []
        self._settles: dict[tuple[str, str], list[Any]] = {}
        # Script calls whose answer was lost (each its number, then its settles' words):
        # carried by the next call.
        self._lost: list[list[Any]] = []
        self._numbers = itertools.count(1)  # of this instance's calls, in the order sent
        self._in_flight: set[_Waiters] = set()  # calls sent, not yet answered
        self._drained: asyncio.Future[None] | None = None  # close waits for their answers
        self._prepared: dict[str, _Prepared] = {}  # per key id
        self._taken: asyncio.Future[None] | None = None  # close waits for its settles' batch
        self.batcher.add_source(self.take)
        link.on_resume(self._resend)

    def _prepare(self, limits: KeyLimits) -> _Prepared:
        """What the script and the headers need of a key's limits, made once per cache load
        (a reload makes new limits, and these anew): ``reserve`` looks for them first."""
        prepared = self._prepared[limits.key.id] = _Prepared(self.link.prefix, limits)
        return prepared

    def settle(
        self,
        scopes: list[_Scope],
        delta: int,
        freed: int,
        cost: float,
        wall: float | None,
        held: int = 0,
    ) -> None:
        """Merge one request's settle into the next batch's, per scope and budget period;
        ``held``: the nano-USD it reserved, released (where the scope kept them)."""
        settles = self._settles
        for scope in scopes:
            unheld = held if scope.budgeted else 0
            merged = settles.get(scope.settled)
            if merged is None:
                settles[scope.settled] = [delta, freed, cost, scope.end, wall, unheld]
            else:
                merged[0] += delta
                merged[1] += freed
                merged[2] += cost
                merged[5] += unheld
                if wall is not None:
                    merged[4] = wall
        # Woken by every settle, not the first of a batch alone: a sender that died (an
        # error that is not Redis's) is started again by the next one, not left to the link's
        # heartbeat. (Those merged while Redis is lost are sent when it is back: ``_resend``.)
        if self.link.up:
            self.batcher.wake()

    def unusable(self, broken: list[str]) -> None:
        """Keys a call could not count (key, why, ...): each counted, logged."""
        for key, why in zip(broken[::2], broken[1::2], strict=True):
            self.link.count_unusable(
                key,
                "state: Redis key %s cannot be counted (%s): the requests of its scope are "
                "counted by each process alone, and its settles dropped, until it is deleted",
                key,
                why,
            )

    def missed(self, lost: list[list[Any]], error: BaseException) -> None:
        """A call's answer was lost: it goes with the next call, when Redis is back, which
        frees what it reserved or applies its settles (no slot leaks, no settle counts twice)."""
        self._lost[:0] = lost  # before any lost since: in the order sent
        if isinstance(error, RedisError | OSError):
            self.link.lost(error)

    def take(self, batch: list[Any]) -> None:
        """The batcher's source: one script call with what queued since the last batch.
        Nothing while Redis is lost (the reservations waiting fall back now), so that the
        first call to run after a lost one carries it."""
        waiting = self._waiting
        if not self.link.up:
            if waiting:
                self._words, self._waiting = [0], []
                down = RedisConnectionError("Redis is lost")
                for future, *_ in waiting:
                    if not future.done():
                        future.set_exception(down)
            return
        settles, lost = self._settles, self._lost
        if not waiting and not settles and not lost:
            return
        words: list[Any] = [lost]
        for (base, period), (delta, freed, cost, end, wall, unheld) in settles.items():
            ttl = 0 if wall is None or end == math.inf else _ttl(end - wall)
            words += (base, delta, freed, cost, period, ttl, unheld)
        if lost:
            self._lost = []
        if settles or lost:
            self._settles = {}
            if self._taken is not None and not self._taken.done():
                self._taken.set_result(None)  # close: the last settles are on their way
        reservations = self._words
        # Taken whatever follows: a word that could not be packed would fail every later batch.
        self._words, self._waiting = [0], []
        number = reservations[0] = next(self._numbers)
        settled: bytes | Exception
        reserved: bytes | Exception
        try:
            settled, reserved = _pack(words), _pack(reservations)
        except Exception:  # noqa: BLE001 - a bug (the limits bound every number): see below
            # A word that cannot be packed fails what it is part of alone: the settles
            # (dropped), or the reservations (their requests fail).
            settled = _packed(words, "its settles are dropped")
            if isinstance(settled, Exception):
                words, lost = [[]], []
                settled = _NO_SETTLES
            reserved = _packed(reservations, "its requests fail")
            if isinstance(reserved, Exception):
                for future, *_ in waiting:
                    if not future.done():
                        future.set_exception(reserved)
                waiting, reserved = [], _pack([number])
            if not waiting and len(words) == 1 and not words[0]:
                return  # nothing left to send
        call = ("EVALSHA", self.script.sha, 0, settled, reserved, *self.link.lease)
        words[0] = number  # this call, kept should its answer be lost: as ARGV[1] lists it
        waiters = _Waiters(self, waiting, lost, words)
        self._in_flight.add(waiters)
        batch.append((self.script, call, waiters))

    async def close(self) -> None:
        """Settles still on their way: sent, or given up after the timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.link.config.timeout):
                while (self._settles or self._lost) and self.link.up:  # in the next batch
                    self._taken = asyncio.get_running_loop().create_future()
                    self.batcher.wake()
                    await self._taken
                if self._in_flight:
                    self._drained = asyncio.get_running_loop().create_future()
                    try:
                        await self._drained
                    finally:
                        self._drained = None

    def answered(self, waiters: _Waiters) -> None:
        """A call sent has its answer (or failed): close waits for none left."""
        self._in_flight.discard(waiters)
        if self._drained is not None and not self._in_flight and not self._drained.done():
            self._drained.set_result(None)

    async def _resend(self) -> None:
        if self._settles or self._lost:
            self.batcher.wake()

    def refuse_while_down(self) -> RateLimited:
        refused = RateLimited(
            "Rate limits cannot be checked now (the shared state is unreachable); try again "
            "shortly",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        )
        refused.caused_by_upstream = False
        refused.scope = "gateway"  # its own state is away: no key's nor deployment's cap
        return refused

    def before_request(
        self, call: Call, limits: KeyLimits, tokens: int, held: int, locally: ReserveHere
    ) -> Awaitable[None] | None:
        """The limits plugin's reservation of ``tokens`` and ``held`` nano-USD, in Redis;
        ``locally`` while Redis is away (``on_error = "open"``), else a 429 for a limited key."""
        if self.link.up:
            return self.reserve(call, limits, tokens, held, locally)
        return self.fall_back(call, limits, tokens, held, locally)

    def fall_back(
        self, call: Call, limits: KeyLimits, tokens: int, held: int, locally: ReserveHere | None
    ) -> Awaitable[None] | None:
        if self.closed:
            raise self.refuse_while_down()
        return None if locally is None else locally(call, limits, tokens, held)

    async def reserve(
        self,
        call: Call,
        limits: KeyLimits,
        tokens: int,
        held: int = 0,
        locally: ReserveHere | None = None,
    ) -> None:
        """Count the request in every scope (``call.state[RESERVATION]``, released when its
        task ends) or refuse it (RateLimited); if Redis fails, ``locally`` counts it."""
        wall = self.clock.time()
        prepared = self._prepared.get(limits.key.id)  # a frame a request fewer than _prepare's
        if prepared is None or prepared.limits is not limits:
            prepared = self._prepare(limits)
        if not prepared.start <= wall < prepared.end:
            prepared.at(wall)
        scopes = prepared.scopes
        self._words += (tokens, held, *prepared.words)  # no loop over the scopes: ~20 fewer
        future: asyncio.Future[Any] = self._loop.create_future()
        self._waiting.append((future, scopes, tokens, held))
        self.batcher.wake()  # queued first; every time (see ``settle``)
        try:
            answer = await future
        except (RedisError, OSError) as exc:
            self.link.lost(exc)
            answer = _NOT_COUNTED
        if answer[0] != 1:
            if answer[0] == UNCHECKED:  # Redis failed, or a key of its scopes is unusable
                falling_back = self.fall_back(call, limits, tokens, held, locally)
                if falling_back is not None:
                    await falling_back
                return
            index, reason, wait = answer[-3:]
            name, entry, _ = limits.scopes[int(index) - 1]
            refused = _refusal(name, entry, reason, wait)
            if prepared.headers:  # also on a 429: the client learns when to come back
                request_state(call.request)[RATE_LIMIT_HEADERS] = _headers(prepared, answer)
            if reason == "tpm" and CACHE_ANSWERS in call.state:
                await unless_cached(
                    call, refused, lambda: self.reserve(call, limits, 0, 0, locally)
                )
                return
            raise refused
        if prepared.headers:
            request_state(call.request)[RATE_LIMIT_HEADERS] = _headers(prepared, answer)
        if held < 0:  # REQUEST_ONLY: counted toward rpm alone, nothing to release
            return
        reservation = call.state[RESERVATION] = SharedReservation(self, scopes, tokens, held)
        task = task_of(self._loop)
        if task is not None:
            task.add_done_callback(reservation.release)


def _headers(prepared: _Prepared, answer: list[Any]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers from the counts the script returned, from the scope with
    the least room left."""
    if prepared.unmoving is not None:  # ~50 bytecodes a request fewer than the search below
        headers = prepared.unmoving.copy()
        for remaining_name, limit, position in prepared.moving:
            remaining = limit - answer[position]
            headers[remaining_name] = str(remaining) if remaining > 0 else "0"
        if answer[1] <= 59:  # a reset's text is a minute's for (59, 60] s: Redis's clock jumped
            reset = reset_text(answer[1])
            for reset_name in prepared.resets:
                headers[reset_name] = reset
        return headers
    reset = reset_text(answer[1])
    headers = {}
    for (limit_name, remaining_name, reset_name), limited in prepared.headers:
        limit, text, position = limited[0]
        remaining = limit - answer[position]
        for limit, other, position in limited[1:]:  # the team's too: the one with less room
            if limit - answer[position] < remaining:
                text, remaining = other, limit - answer[position]
        headers[limit_name] = text
        headers[remaining_name] = str(remaining) if remaining > 0 else "0"
        headers[reset_name] = reset
    return headers
