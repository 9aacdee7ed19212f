"""Deployment rpm/tpm caps and in-flight counts shared by every instance, a moment behind.

Routing picks a deployment with no await (picking and counting together is what keeps one
instance within its caps), so the other instances' counts are mirrored, not asked for: what
this instance counted goes to Redis in one pipelined script every ``SYNC_INTERVAL``, which
answers with every instance's totals; the router adds the others' share to its own. Caps hold
across instances to within what they admit in one interval; least-busy sees every instance's
requests in flight. Only the deployments whose counts are read are counted: those with caps,
and those of a least-busy model (decided once per deployment, not per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import defaultdict
from typing import cast

from redis.exceptions import RedisError

from ..context import Deployment
from ..router import Router
from .batch import LuaScript, script_failed
from .link import RedisLink

__all__ = ["SharedDeployments"]

log = logging.getLogger("aioproxy")

SYNC_INTERVAL = 0.25  # seconds

# KEYS: per deployment its hash base. ARGV[1]: this instance, ARGV[2] the prefix of its keys,
# ARGV[3] a lease's length (ms) (``RedisLink.lease``), ARGV[4] this sync's number (a record
# per instance keeps the number of its last sync run); then per deployment the requests,
# tokens and in-flight change since the last sync. A sync whose answer was lost is sent again
# with its number: its changes count once, whether Redis ran it or not (nor do they count if
# it arrives after a later one). Returns per deployment: requests and tokens over the last
# minute, all live instances together, and the other live instances' requests in flight (a
# dead instance's, whose lease ran out, are dropped).
# Each hash is read once: its totals are what it held plus this sync's change, computed here.
# The arguments are checked before the first write (Redis keeps what a script wrote before it
# failed: such a sync, aioproxy's own bug, fails whole, writing nothing). A deployment whose
# hash cannot be used (of another type, holding what is not a count) fails alone: nothing
# written for it, its answer the hash's key and why in place of its totals; the others
# synced. A record that is not one is replaced (its key and why follow the answers): a sync
# refused for it would be refused for good, and this instance's counts never shared.
_SYNC = """
local sec = tonumber(redis.call('TIME')[1])
local me, alive = ARGV[1], ARGV[2] .. 'alive:'
local record, sync = ARGV[2] .. 'applied:' .. me .. ':deployments', tonumber(ARGV[4])
local function fail(what) error('aioproxy deployments: ' .. what, 0) end
local function whole(text)  -- a count HINCRBY adds to (at most 18 digits: no overflow)
  local digits = text:match('^-?(%d+)$')
  return digits ~= nil and #digits <= 18
end
if #ARGV ~= 4 + 3 * #KEYS or me == '' or not (whole(ARGV[3]) and tonumber(ARGV[3]) > 0) then
  fail('arguments')
end
for i = 4, #ARGV do
  if not whole(ARGV[i]) then fail('a count that is not an integer') end
end
-- This instance's record, if it is one: else as if none were kept (as when it expired),
-- reported (after the deployments' answers) and replaced.
local applied, broken = redis.pcall('GET', record), {}
if type(applied) == 'table' then
  applied, broken = false, {record, applied.err}
elseif applied and not whole(applied) then
  applied, broken = false, {record, 'does not hold a number'}
end
-- A hash of counts, its fields seconds (``timed``) or instances; nil and why if unusable.
local function counts(key, timed)
  local all = redis.pcall('HGETALL', key)
  if all.err then return nil, all.err end
  for k = 1, #all, 2 do
    if not whole(all[k + 1]) or (timed and not tonumber(all[k])) then
      return nil, 'holds a field that is not a count'
    end
  end
  return all
end
-- A deployment's windows of requests and tokens and its in-flight hash; or the key of the
-- first it cannot use, and why.
local function hashes(base)
  local r, why = counts(base .. ':r', true)
  if not r then return nil, base .. ':r', why end
  local t, why = counts(base .. ':t', true)
  if not t then return nil, base .. ':t', why end
  local f, why = counts(base .. ':f', false)
  if not f then return nil, base .. ':f', why end
  return {r, t, f}
end
local function drop(key, fields)  -- in HDELs of at most 1,000 fields (unpack's stack)
  for i = 1, #fields, 1000 do
    redis.call('HDEL', key, unpack(fields, i, math.min(i + 999, #fields)))
  end
end
-- A window's count over the last minute with ``added`` (this second's change, made), its
-- older buckets dropped.
local function window(key, all, added)
  local total, stale = tonumber(added), {}
  for k = 1, #all, 2 do
    if tonumber(all[k]) <= sec - 60 then
      stale[#stale + 1] = all[k]
    else
      total = total + tonumber(all[k + 1])
    end
  end
  drop(key, stale)
  return total
end
-- The other live instances' requests in flight; a dead one's dropped.
local function others(key, all)
  local total, dead = 0, {}
  for k = 1, #all, 2 do
    if all[k] ~= me then
      if redis.call('EXISTS', alive .. all[k]) == 1 then
        total = total + tonumber(all[k + 1])
      else
        dead[#dead + 1] = all[k]
      end
    end
  end
  drop(key, dead)
  return total
end
redis.call('SET', alive .. me, 1, 'PX', ARGV[3])
local new = sync > tonumber(applied or 0)
if new then redis.call('SET', record, sync, 'EX', 86400) end
local out = {}
for i = 1, #KEYS do
  local base = KEYS[i]
  local read, key, why = hashes(base)
  if read then
    local requests, tokens, flight = '0', '0', '0'
    if new then requests, tokens, flight = ARGV[3 * i + 2], ARGV[3 * i + 3], ARGV[3 * i + 4] end
    if requests ~= '0' then redis.call('HINCRBY', base .. ':r', sec, requests) end
    if tokens ~= '0' then redis.call('HINCRBY', base .. ':t', sec, tokens) end
    if flight ~= '0' then redis.call('HINCRBY', base .. ':f', me, flight) end
    out[#out + 1] = window(base .. ':r', read[1], requests)
    out[#out + 1] = window(base .. ':t', read[2], tokens)
    out[#out + 1] = others(base .. ':f', read[3])
    redis.call('EXPIRE', base .. ':r', 120)
    redis.call('EXPIRE', base .. ':t', 120)
    redis.call('EXPIRE', base .. ':f', 600)
  else
    out[#out + 1] = key
    out[#out + 1] = why
    out[#out + 1] = 0
  end
end
for _, word in ipairs(broken) do out[#out + 1] = word end
return out
"""


class SharedDeployments:
    """This instance's counts toward the shared ones, and the others' share, mirrored."""

    def __init__(self, link: RedisLink, router: Router, configured: list[Deployment]) -> None:
        self.link = link
        self.router = router
        # Per deployment key: whether its counts are shared (the config's from the start).
        self._shared = {d.key: self._is_shared(d) for d in configured}
        self.script = LuaScript(_SYNC)
        self.batcher = link.batcher
        # Since the last sync, per deployment key: [requests, tokens, in-flight change].
        self._delta: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        self.synced = asyncio.Event()  # set after each sync (tests wait for it)
        self._numbers = itertools.count(1)  # of this instance's syncs
        # A sync whose answer was lost (its keys and script words): the next one.
        self._unanswered: tuple[list[str], list[object]] | None = None
        self._task: asyncio.Task[None] | None = None

    def _is_shared(self, deployment: Deployment) -> bool:
        """Whether routing reads the deployment's counts: its caps, or least-busy's in-flight."""
        return (
            deployment.rpm is not None
            or deployment.tpm is not None
            or self.router.policy(deployment.name).strategy == "least-busy"
        )

    def counted(self, deployment: Deployment, requests: int, tokens: int, flight: int) -> bool:
        """The router's observer: called as it counts a deployment; whether its counts are
        shared (if not, the router tells it no more of them: ~50 bytecodes a request fewer)."""
        key = deployment.id or deployment.key  # (``key``'s own test: its frame, ~8 fewer)
        shared = self._shared.get(key)
        if shared is None:  # one the config did not name (made at run time)
            shared = self._shared[key] = self._is_shared(deployment)
        if shared:
            self._add(key, requests, tokens, flight)
        return shared

    def _add(self, key: str, requests: int, tokens: int, flight: int) -> None:
        delta = self._delta[key]
        delta[0] += requests
        delta[1] += tokens
        delta[2] += flight

    def start(self) -> None:
        self.router.on_count = self.counted
        self._task = asyncio.create_task(self._run(), name="aioproxy deployment sync")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            if self.link.up:
                await self.sync()

    async def sync(self) -> None:
        if self._unanswered is not None:  # the same sync again: counted once
            keys, args = self._unanswered
        else:
            shared = self._shared
            known = [key for key, counted in shared.items() if counted]
            seen = [key for key in self.router.health_keys() if shared.get(key, True)]
            keys = list(dict.fromkeys([*self._delta, *known, *seen]))
            if not keys:
                return
            delta, self._delta = self._delta, defaultdict(lambda: [0, 0, 0])
            args = [*self.link.lease, next(self._numbers)]
            for key in keys:
                args += delta.get(key, [0, 0, 0])
        prefix = f"{self.link.prefix}:d:"
        try:
            totals = await self.batcher.run(self.script, [prefix + key for key in keys], args)
        except (RedisError, OSError) as exc:
            # Redis may have run it: sent again as it is, with its number, before any other;
            # unless the script refused it whole (it wrote nothing): again, refused again.
            self._unanswered = None if script_failed(exc) else (keys, args)
            self.link.failed(
                exc,
                "deployments sync",
                "state: Redis refused a deployments sync (%s): its counts are dropped",
            )
            return
        self._unanswered = None
        for index, key in enumerate(keys):
            requests, tokens, others = totals[3 * index : 3 * index + 3]
            if type(requests) is bytes:  # the script's marker: the hash named, and why
                # Its requests and tokens (a minute's windows) are dropped; its in-flight
                # change is a level kept by changes: carried to the next sync, or the field
                # would stay off by it once the key is fixed (every other instance counting it).
                # (Its words follow the lease's three and the sync's number.)
                self._delta[key][2] += cast(int, args[3 * index + 6])
                self._unusable(key, requests.decode(), tokens.decode())
            else:
                self.router.mirror(key, requests, tokens, others)
        if len(totals) > 3 * len(keys):
            self._replaced(*(word.decode() for word in totals[3 * len(keys) :]))
        self.synced.set()

    def _unusable(self, key: str, hash_key: str, why: str) -> None:
        """A hash of the deployment ``key`` the script cannot use: its change since the last
        sync was dropped (nothing written for it), and the router counts it alone: the others'
        share as 0, not as last known (a figure that no longer moves would refuse, or admit,
        for as long as the hash is broken), as the counters' scopes fall back to each process."""
        self.router.mirror(key, 0, 0, 0)
        self.link.count_unusable(
            hash_key,
            "state: Redis key %s cannot be used for a deployment's counts (%s): the deployment "
            "is counted by each process alone, until the key is deleted",
            hash_key,
            why,
        )

    def _replaced(self, record: str, why: str) -> None:
        """This instance's record of syncs was not one: the script replaced it (a sync whose
        answer was lost may have counted twice)."""
        self.link.count_unusable(
            record, "state: Redis key %s was no record of syncs (%s): replaced", record, why
        )

    async def close(self) -> None:
        self.router.on_count = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
