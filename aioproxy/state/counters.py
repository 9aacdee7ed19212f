"""Key and team counters in Redis: rpm, tpm, max_parallel and budget, shared by every instance.

Reserve, then settle, each one atomic Lua script (one round trip, no read-then-write race):
``reserve`` checks every scope of the request (the key, its team) and, only if all have room,
counts the request, its in-flight slot and its reserved tokens; ``settle`` replaces the
reserved tokens by the usage, frees the slot and adds the cost. Rates are one-second buckets
of a hash per scope, summed over the last minute, on Redis's clock (one clock for all).

The budget of a period is the larger of the database's figure (every instance's written
spend) and Redis's (every instance's spend, at once): Redis is ahead until it loses its data.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from ..context import Call
from ..control.database import RATE_LIMIT_HEADERS
from ..control.limits import _HEADER_NAMES, RESERVATION, _reserve, _reset
from ..control.meters import KeyLimits
from ..control.records import KeyEntry, TeamEntry, period_end
from ..errors import RateLimited
from .batch import LuaScript
from .link import RedisLink

if TYPE_CHECKING:
    from ..control.clock import ControlClock

__all__ = ["SharedCounters", "SharedReservation"]

_NONE = -1  # a limit not set, as the scripts read it

_RESERVE = """
local clock = redis.call('TIME')
local sec = tonumber(clock[1])
local now = sec + tonumber(clock[2]) / 1000000
local tokens = tonumber(ARGV[1])
local function window(key)
  local all = redis.call('HGETALL', key)
  local total, oldest = 0, nil
  for i = 1, #all, 2 do
    local s = tonumber(all[i])
    if s <= sec - 60 then
      redis.call('HDEL', key, all[i])
    else
      local v = tonumber(all[i + 1])
      total = total + v
      if v > 0 and (oldest == nil or s < oldest) then oldest = s end
    end
  end
  return total, oldest
end
local seen, out = {}, {1, tostring(sec + 60 - now)}
for i = 1, #KEYS do
  local requests, r_oldest = window(KEYS[i] .. ':r')
  local used, t_oldest = window(KEYS[i] .. ':t')
  seen[i] = {requests, used, r_oldest, t_oldest}
  out[#out + 1] = requests
  out[#out + 1] = used
end
for i = 1, #KEYS do
  local base, a = KEYS[i], 1 + (i - 1) * 6
  local rpm, tpm, parallel = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local budget, floor, period = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), ARGV[a + 6]
  local requests, used, r_oldest, t_oldest = seen[i][1], seen[i][2], seen[i][3], seen[i][4]
  local refused, wait = nil, '1'
  if parallel >= 0 and tonumber(redis.call('GET', base .. ':f') or '0') >= parallel then
    refused = 'parallel'
  elseif rpm >= 0 and requests >= rpm then
    refused, wait = 'rpm', tostring((r_oldest or sec) + 60 - now)
  elseif tpm >= 0 and used + tokens > tpm then
    refused, wait = 'tpm', tostring(t_oldest and (t_oldest + 60 - now) or 60)
  elseif budget >= 0 then
    local spent = tonumber(redis.call('GET', base .. ':s:' .. period) or '0')
    if floor > spent then spent = floor end
    if spent >= budget then refused, wait = 'budget', '0' end
  end
  if refused then
    out[1] = 0
    out[#out + 1] = i
    out[#out + 1] = refused
    out[#out + 1] = wait
    return out
  end
end
for i = 1, #KEYS do
  local base = KEYS[i]
  redis.call('HINCRBY', base .. ':r', sec, 1)
  redis.call('EXPIRE', base .. ':r', 120)
  redis.call('HINCRBY', base .. ':t', sec, tokens)
  redis.call('EXPIRE', base .. ':t', 120)
  redis.call('INCR', base .. ':f')
  redis.call('EXPIRE', base .. ':f', 3600)
  out[1 + 2 * i] = seen[i][1] + 1
  out[2 + 2 * i] = seen[i][2] + tokens
end
return out
"""

_SETTLE = """
local sec = tonumber(redis.call('TIME')[1])
local delta, cost, release = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, #KEYS do
  local base = KEYS[i]
  if delta ~= 0 then
    redis.call('HINCRBY', base .. ':t', sec, delta)
    redis.call('EXPIRE', base .. ':t', 120)
  end
  if release == 1 and redis.call('DECR', base .. ':f') < 0 then
    redis.call('SET', base .. ':f', 0)
  end
  if cost > 0 then
    local spend = base .. ':s:' .. ARGV[2 + 2 * i]
    redis.call('INCRBYFLOAT', spend, ARGV[2])
    local ttl = tonumber(ARGV[3 + 2 * i])
    if ttl > 0 then redis.call('EXPIRE', spend, ttl) end
  end
end
return 1
"""

_SCOPE_WORDS = {"key": "This API key", "team": "This API key's team"}


def _limit(value: float | None) -> int | float:
    return _NONE if value is None else value


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
    else:
        message = f"{whose} has spent its budget of ${entry.max_budget:g}" + (
            " for this period" if entry.duration is not None else ""
        )
    code = "insufficient_quota" if reason == "budget" else "rate_limit_exceeded"
    refused = RateLimited(message, code=code, headers={"Retry-After": str(max(1, math.ceil(wait)))})
    refused.caused_by_upstream = False
    return refused


class SharedReservation:
    """What ``reserve`` counted for one request, settled once (after the answer, or when its
    task ends without one)."""

    __slots__ = ("counters", "keys", "pending", "periods", "released", "tokens")

    def __init__(
        self, counters: SharedCounters, keys: list[str], periods: list[str], tokens: int
    ) -> None:
        self.counters = counters
        self.keys = keys
        self.periods = periods
        self.tokens = tokens  # counted toward tpm now
        self.pending = 0  # tokens to add (or take off) when released
        self.released = False

    def count_tokens(self, tokens: int, _now: float = 0.0) -> None:
        """A failed request: keep its request counted, not its tokens (sent on release)."""
        self.pending += tokens - self.tokens
        self.tokens = tokens

    def release(self, _task: object = None) -> None:
        """The request's task ended before ``settle``: free the slot."""
        if not self.released:
            self.released = True
            self._send(self.pending, 0.0, None)

    def settle(self, tokens: int, cost: float | None, wall: float) -> None:
        """The answer is out: its usage for the reservation, the slot freed, the cost added.
        Queued, not awaited: it goes with the next batch, and nothing waits for its answer."""
        self.released = True
        delta, self.tokens = tokens - self.tokens, tokens
        self._send(delta, cost or 0.0, wall)

    def _send(self, delta: int, cost: float, wall: float | None) -> None:
        args: list[Any] = [delta, cost, 1]
        for period in self.periods:
            end = None if period == "ever" else float(period)
            ttl = 0 if end is None or wall is None else max(1, math.ceil(end - wall) + 3600)
            args += [period, ttl]
        self.counters.run(self.counters.settle_script, self.keys, args)


class SharedCounters:
    """The Redis side of the limits plugin (``aioproxy.control.limits``)."""

    def __init__(self, link: RedisLink, clock: ControlClock) -> None:
        self.link = link
        self.clock = clock
        self.closed = link.config.on_error == "closed"
        self.reserve_script = LuaScript(_RESERVE)
        self.settle_script = LuaScript(_SETTLE)
        self.batcher = link.batcher
        self._in_flight: set[asyncio.Future[Any]] = set()  # settles sent, not yet answered
        self._unsent: list[tuple[LuaScript, list[str], list[Any]]] = []  # settles Redis missed
        link.on_resume(self._resend)

    def run(self, script: LuaScript, keys: list[str], args: list[Any]) -> None:
        """Queue a settle: if Redis misses it, it is sent again when Redis is back (so no slot
        leaks in flight for ever)."""
        if not self.link.up:
            self._unsent.append((script, keys, args))
            return
        sent = self.batcher.run(script, keys, args)
        self._in_flight.add(sent)
        sent.add_done_callback(lambda done: self._settled(done, script, keys, args))

    def _settled(
        self, done: asyncio.Future[Any], script: LuaScript, keys: list[str], args: list[Any]
    ) -> None:
        self._in_flight.discard(done)
        if done.cancelled():
            return
        error = done.exception()
        if isinstance(error, RedisError | OSError):
            self._unsent.append((script, keys, args))
            self.link.lost(error)

    async def close(self) -> None:
        """Settles still on their way: sent, or given up after the timeout."""
        if self._in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.link.config.timeout):
                    await asyncio.wait(list(self._in_flight))

    async def _resend(self) -> None:
        unsent, self._unsent = self._unsent, []
        for script, keys, args in unsent:
            await self.batcher.run(script, keys, args)

    def refuse_while_down(self) -> RateLimited:
        refused = RateLimited(
            "Rate limits cannot be checked now (the shared state is unreachable); try again "
            "shortly",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        )
        refused.caused_by_upstream = False
        return refused

    async def before_request(
        self, call: Call, limits: KeyLimits, locally: Callable[[Call, KeyLimits], None]
    ) -> None:
        """The limits plugin's reservation, in Redis; ``locally`` while Redis is away
        (``on_error = "open"``), else a 429 for a limited key."""
        if self.link.up:
            reserved = await self.reserve(call, limits, _reserve(call))
            if reserved is not None:
                reservation, headers = reserved
                call.state[RESERVATION] = reservation
                task = asyncio.current_task()
                if task is not None:
                    task.add_done_callback(reservation.release)
                if headers:
                    call.request[RATE_LIMIT_HEADERS] = headers
                return
        if self.closed:
            raise self.refuse_while_down()
        locally(call, limits)

    async def reserve(
        self, call: Call, limits: KeyLimits, tokens: int
    ) -> tuple[SharedReservation, dict[str, str] | None] | None:
        """Count the request in every scope or refuse it (RateLimited); None: Redis failed
        (the caller falls back to per-process counters)."""
        wall = self.clock.time()
        prefix = self.link.prefix
        keys: list[str] = []
        periods: list[str] = []
        args: list[Any] = [tokens]
        for scope, entry, _meter in limits.scopes:
            keys.append(f"{prefix}:{scope[0]}:{entry.id}")
            end = period_end(entry.created_at, entry.duration, wall)
            periods.append(_period_tag(end))
            floor = entry.spend if entry.budget_resets_at == end else 0.0
            args += [
                _limit(entry.rpm),
                _limit(entry.tpm),
                _limit(entry.max_parallel),
                _limit(entry.max_budget),
                floor,
                periods[-1],
            ]
        try:
            answer = await self.batcher.run(self.reserve_script, keys, args)
        except (RedisError, OSError) as exc:
            self.link.lost(exc)
            return None
        if int(answer[0]) == 0:
            index, reason, wait = answer[-3:]
            scope, entry, _ = limits.scopes[int(index) - 1]
            refused = _refusal(scope, entry, reason.decode(), float(wait))
            if limits.limited:  # also on a 429: the client learns when to come back
                call.request[RATE_LIMIT_HEADERS] = _headers(limits, answer)
            raise refused
        reservation = SharedReservation(self, keys, periods, tokens)
        return reservation, _headers(limits, answer) if limits.limited else None


def _headers(limits: KeyLimits, answer: list[Any]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers from the counts ``reserve`` returned, from the scope with
    the least room left."""
    reset = _reset(float(answer[1]))
    headers: dict[str, str] = {}
    for kind, position, attribute in (("requests", 2, "rpm"), ("tokens", 3, "tpm")):
        best: tuple[int, int] | None = None
        for index, (_, entry, _) in enumerate(limits.scopes):
            limit = getattr(entry, attribute)
            if limit is None:
                continue
            remaining = limit - int(answer[position + 2 * index])
            if best is None or remaining < best[1]:
                best = (limit, remaining)
        if best is not None:
            limit_name, remaining_name, reset_name = _HEADER_NAMES[kind]
            headers[limit_name] = str(best[0])
            headers[remaining_name] = str(max(0, best[1]))
            headers[reset_name] = reset
    return headers
