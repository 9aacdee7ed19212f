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
# minute, and requests in flight, all live instances together (a dead instance's, whose lease
# ran out, are dropped).
# Nothing is written before every argument and key is checked (Redis keeps what a script wrote
# before it failed: a sync fails whole or not at all): the counts are integers, the record a
# number, and each deployment's hashes hashes of integer counts (WRONGTYPE if another type).
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
local applied = redis.call('GET', record)
if applied and not whole(applied) then fail(record .. ' does not hold a number') end
for i = 1, #KEYS do
  for _, suffix in ipairs({':r', ':t', ':f'}) do
    local all = redis.call('HGETALL', KEYS[i] .. suffix)
    for k = 1, #all, 2 do
      if not whole(all[k + 1]) or (suffix ~= ':f' and not tonumber(all[k])) then
        fail(KEYS[i] .. suffix .. ' holds a field that is not a count')
      end
    end
  end
end
redis.call('SET', alive .. me, 1, 'PX', ARGV[3])
local new = sync > tonumber(applied or 0)
if new then redis.call('SET', record, sync, 'EX', 86400) end
local out = {}
for i = 1, #KEYS do
  local base = KEYS[i]
  local requests, tokens, flight = ARGV[3 * i + 2], ARGV[3 * i + 3], tonumber(ARGV[3 * i + 4])
  if new then
    if requests ~= '0' then redis.call('HINCRBY', base .. ':r', sec, requests) end
    if tokens ~= '0' then redis.call('HINCRBY', base .. ':t', sec, tokens) end
    if flight ~= 0 then redis.call('HINCRBY', base .. ':f', me, flight) end
  end
  redis.call('EXPIRE', base .. ':r', 120)
  redis.call('EXPIRE', base .. ':t', 120)
  redis.call('EXPIRE', base .. ':f', 600)
  local totals = {}
  for j, suffix in ipairs({':r', ':t'}) do
    local all, total = redis.call('HGETALL', base .. suffix), 0
    for k = 1, #all, 2 do
      if tonumber(all[k]) <= sec - 60 then
        redis.call('HDEL', base .. suffix, all[k])
      else
        total = total + tonumber(all[k + 1])
      end
    end
    totals[j] = total
  end
  local flights, in_flight = redis.call('HGETALL', base .. ':f'), 0
  for k = 1, #flights, 2 do
    if flights[k] == me or redis.call('EXISTS', alive .. flights[k]) == 1 then
      in_flight = in_flight + tonumber(flights[k + 1])
    else
      redis.call('HDEL', base .. ':f', flights[k])
    end
  end
  out[#out + 1] = totals[1]
  out[#out + 1] = totals[2]
  out[#out + 1] = in_flight
end
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
        self._in_flight: defaultdict[str, int] = defaultdict(int)  # own, as sent
        self.synced = asyncio.Event()  # set after each sync (tests wait for it)
        self._numbers = itertools.count(1)  # of this instance's syncs
        # A sync whose answer was lost (its keys, script words, changes): the next one.
        self._unanswered: tuple[list[str], list[object], dict[str, list[int]]] | None = None
        self._task: asyncio.Task[None] | None = None

    def _is_shared(self, deployment: Deployment) -> bool:
        """Whether routing reads the deployment's counts: its caps, or least-busy's in-flight."""
        return (
            deployment.rpm is not None
            or deployment.tpm is not None
            or self.router.policy(deployment.name).strategy == "least-busy"
        )

    def counted(self, deployment: Deployment, requests: int, tokens: int, flight: int) -> None:
        """The router's observer: called as it counts a deployment."""
        key = deployment.id or deployment.key  # (``key``'s own test: its frame, ~8 fewer)
        shared = self._shared.get(key)
        if shared is None:  # one the config did not name (made at run time)
            shared = self._shared[key] = self._is_shared(deployment)
        if shared:
            self._add(key, requests, tokens, flight)

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
            keys, args, delta = self._unanswered
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
            self._unanswered = None if script_failed(exc) else (keys, args, delta)
            self.link.failed(
                exc,
                "deployments sync",
                "state: Redis refused a deployments sync (%s): its counts are dropped, until the "
                "key is deleted",
            )
            return
        self._unanswered = None
        for index, key in enumerate(keys):
            if key in delta:
                self._in_flight[key] += delta[key][2]
            self.router.mirror(
                key,
                int(totals[3 * index]),
                int(totals[3 * index + 1]),
                # Never below 0: own requests dropped while this one's lease had run out.
                max(0, int(totals[3 * index + 2]) - self._in_flight[key]),
            )
        self.synced.set()

    async def close(self) -> None:
        self.router.on_count = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
