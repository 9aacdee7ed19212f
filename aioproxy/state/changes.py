"""Publish/subscribe between instances: key and team changes (each instance reloads its key
cache at once, not at its next database poll), and deployment cooldowns (a deployment cooling
on one instance is skipped by all).

A cooldown is also kept in Redis until it ends (a hash: deployment -> when, by Redis's clock),
written and published in one script: an instance that subscribes (starting, or back after
losing Redis) reads the cooldowns in force once subscribed, so each one is either read or
heard, none missed in between."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from ..control.engine import CLOSE_WAIT
from .batch import LuaScript
from .link import PROBE_INTERVAL, RedisLink

__all__ = ["Change", "Changes"]

log = logging.getLogger("aioproxy")

# Seconds without a message before the channel is PINGed; as long again without an answer and
# its connection is taken for dead (a Redis gone silently: a failover to another host, a
# dropped route), not listened to for ever while changes go elsewhere.
QUIET = 3.0


class Change(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One message on the channel."""

    source: str  # the sending instance: it ignores its own
    what: str  # "keys" (keys or teams changed) or "cooldown"
    deployment: str | None = None  # cooldown: the deployment's key
    seconds: float = 0.0  # cooldown: how long from now


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Change).decode

# Now, in ms by Redis's clock: the one clock every instance reads. Then how the cooldowns'
# hash is read: once, each entry that holds no end (written by something else) skipped and
# reported (what, why), not the whole: the others' cooldowns are still kept and read.
_READ_COOLING = """
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local function whole(text)
  local digits = text:match('^-?(%d+)$')
  return digits ~= nil and #digits <= 18
end
local broken = {}
local function unusable(what, why)
  broken[#broken + 1] = what
  broken[#broken + 1] = why
end
-- The cooldowns' entries as (deployment, end) pairs; nil if the hash is of another type.
local function cooldowns()
  local all = redis.pcall('HGETALL', KEYS[1])
  if all.err then
    unusable('key ' .. KEYS[1], all.err)
    return nil
  end
  local ends = {}
  for i = 1, #all, 2 do
    if whole(all[i + 1]) then
      ends[#ends + 1] = {all[i], tonumber(all[i + 1])}
    else
      unusable('field ' .. all[i] .. ' of ' .. KEYS[1], 'holds no end')
    end
  end
  return ends
end
"""

# KEYS[1]: the cooldowns (a hash: deployment -> until, ms). ARGV: the deployment, its cooldown
# (ms), the channel and the message. Keeps the later end of any cooldown already held, drops
# the ended ones, lets the hash live as long as its last, then publishes: stored before heard.
# Its arguments are checked before its first write (Redis keeps what a script wrote before it
# failed). Another deployment's entry that holds no end is left as it is (it goes with the
# hash when the last cooldown ends); the deployment's own is replaced by its cooldown. None is
# kept in a hash of another type; the cooldown is published all the same. Returns what it could
# not use (what, why).
_COOL = (
    _READ_COOLING
    + """
if ARGV[1] == '' or not (whole(ARGV[2]) and tonumber(ARGV[2]) > 0) then
  error('aioproxy cooldown: arguments', 0)
end
local ends = cooldowns()
if ends then
  local ending = now + math.min(tonumber(ARGV[2]), 1e12)  -- a cooldown of decades at most
  local held, last, ended = 0, now, {}
  for _, entry in ipairs(ends) do
    if entry[1] == ARGV[1] then
      held = entry[2]
    elseif entry[2] <= now then
      ended[#ended + 1] = entry[1]
    elseif entry[2] > last then
      last = entry[2]
    end
  end
  if ending > held then  -- its own entry that held no end (held 0) is replaced too
    redis.call('HSET', KEYS[1], ARGV[1], ending)
    held = ending
  end
  last = math.max(last, held)
  for i = 1, #ended, 1000 do  -- in HDELs of at most 1,000 fields (unpack's stack)
    redis.call('HDEL', KEYS[1], unpack(ended, i, math.min(i + 999, #ended)))
  end
  if last > now then redis.call('PEXPIRE', KEYS[1], last - now) end
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return broken
"""
)

# KEYS[1]: the cooldowns. Returns {per deployment still cooling: its key, the ms left}, and
# what it could not use (what, why).
_COOLING = (
    _READ_COOLING
    + """
local out = {}
for _, entry in ipairs(cooldowns() or {}) do
  if entry[2] > now then
    out[#out + 1] = entry[1]
    out[#out + 1] = entry[2] - now
  end
end
return {out, broken}
"""
)


class Changes:
    """This instance's end of the channel."""

    def __init__(
        self,
        link: RedisLink,
        reload_keys: Callable[[], Awaitable[None]],
        cool_down: Callable[[str, float], None],
    ) -> None:
        self.link = link
        self.channel = f"{link.prefix}:changes"
        self.cooling = [f"{link.prefix}:cooling"]  # the scripts' KEYS
        self.cool_script = LuaScript(_COOL)
        self.cooling_script = LuaScript(_COOLING)
        self.source = os.urandom(8).hex()
        self.reload_keys = reload_keys
        self.cool_down = cool_down
        # Its own connection, with no read timeout: a subscriber waits for messages.
        self.subscriber: aioredis.Redis = aioredis.Redis.from_url(
            str(link.config.redis_url), socket_connect_timeout=link.config.timeout
        )
        self.listening = asyncio.Event()  # set once subscribed (tests wait for it)
        self._own: dict[str, float] = {}  # deployment -> when its cooldown here ends (monotonic)
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        link.on_resume(self._resumed)  # changes published while this one could not hear

    async def start(self) -> None:
        """Listen, and wait (within the timeout, when Redis is up) until subscribed and the
        keys reloaded: the key cache was loaded before, and a change announced in between
        (as when workers start one after another and the first already serves) would
        otherwise be missed until the next database poll."""
        await self.link.preload(self.cool_script, self.cooling_script)
        self._task = asyncio.create_task(self._listen(), name="aioproxy state changes")
        if self.link.up:
            with contextlib.suppress(TimeoutError):  # the listener goes on trying
                async with asyncio.timeout(self.link.config.timeout):
                    await self.listening.wait()

    async def announce_keys(self) -> None:
        """Keys or teams changed here: the others reload (their poll, and the reload each
        does when Redis comes back, are the net). Tried even while the link is marked down:
        an admin call is rare, and Redis may be back before the probe says so."""
        await self._publish(Change(source=self.source, what="keys"), always=True)

    def announce_cooldown(self, deployment: str, seconds: float) -> None:
        """The router's callback: the deployment cools down here; kept in Redis until it ends
        (for the instances that subscribe meanwhile) and published (for the others). Also
        remembered until it ends: announced again when Redis is back, had it missed this."""
        self._own[deployment] = time.monotonic() + seconds
        if self.link.up:
            self._send_cooldown(deployment, seconds)

    def _send_cooldown(self, deployment: str, seconds: float) -> None:
        change = Change(source=self.source, what="cooldown", deployment=deployment, seconds=seconds)
        args = [deployment, max(1, int(seconds * 1000)), self.channel, _encode(change)]
        sent = self.link.batcher.run(self.cool_script, self.cooling, args)
        sent.add_done_callback(self._sent)

    def _sent(self, call: asyncio.Future[list[bytes]]) -> None:
        """A failed call marks the link lost (and its exception is retrieved: no warning);
        one the script refused (on arguments only aioproxy's code can get wrong) is logged,
        counted; what it could not use in the cooldowns' hash, counted, logged."""
        if call.cancelled():
            return
        if (error := call.exception()) is not None:
            self.link.failed(error, "cooldowns", "state: Redis refused a cooldown (%s)")
        else:
            self._unusable(call.result())

    def _unusable(self, broken: list[bytes]) -> None:
        """What a script could not use in the cooldowns' hash (what, why, ...): each counted,
        logged once a minute."""
        for what, why in zip(broken[::2], broken[1::2], strict=True):
            self.link.count_unusable(
                what.decode(),
                "state: Redis %s cannot be used for cooldowns (%s): the cooldowns it should "
                "hold are still announced to the instances listening, not kept for those that "
                "start or come back, until it is deleted",
                what.decode(),
                why.decode(),
            )

    async def _publish(self, change: Change, always: bool = False) -> None:
        if not (self.link.up or always):
            return
        try:
            await self.link.client.publish(self.channel, _encode(change))
        except (RedisError, OSError) as exc:
            self.link.lost(exc)

    async def _listen(self) -> None:
        while True:
            try:
                async with self.subscriber.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    # What changed before we could hear it: at start-up, since the key cache
                    # was loaded; later, while the connection was lost.
                    await self._catch_up()
                    self.listening.set()
                    await self._hear(pubsub)
            except (RedisError, OSError) as exc:
                self.listening.clear()
                self.link.lost(exc)
            await asyncio.sleep(PROBE_INTERVAL)

    async def _hear(self, pubsub: PubSub) -> None:
        """Take messages as they come; PING a quiet channel, and give up on one that does
        not answer (any message, or the PONG) within ``QUIET`` more seconds."""
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=QUIET)
            if message is not None:
                pinged = False
                if message["type"] == "message":
                    self._take(message)
            elif pinged:
                raise TimeoutError(f"no answer on {self.channel} for {2 * QUIET:g} s")
            else:
                await pubsub.ping()
                pinged = True

    def _take(self, message: dict[str, object]) -> None:
        data = message.get("data")
        if not isinstance(data, bytes):
            return
        try:
            change = _decode(data)
        except msgspec.DecodeError:
            log.warning("state: an unreadable message on %s was ignored", self.channel)
            return
        if change.source == self.source:
            return
        if change.what == "keys":
            task = asyncio.ensure_future(self._reload())
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        elif change.what == "cooldown" and change.deployment is not None:
            self.cool_down(change.deployment, change.seconds)

    async def _resumed(self) -> None:
        """The link is back: catch up, unless the listener is subscribing again (it lost its
        connection too), which catches up itself once subscribed."""
        if self.listening.is_set():
            await self._catch_up()

    async def _catch_up(self) -> None:
        """Once subscribed (and when the link is back): the keys reloaded, the cooldowns in
        force read, and this instance's own announced again (a failure to read is Redis's:
        the listener subscribes again)."""
        await self._reload()
        cooling, broken = await self.link.batcher.run(self.cooling_script, self.cooling, [])
        self._unusable(broken)
        for index in range(0, len(cooling), 2):
            self.cool_down(cooling[index].decode(), int(cooling[index + 1]) / 1000)
        now = time.monotonic()
        for deployment, ends in list(self._own.items()):
            if ends > now:
                self._send_cooldown(deployment, ends - now)
            else:
                del self._own[deployment]

    async def _reload(self) -> None:
        try:
            await self.reload_keys()
        except Exception as exc:  # noqa: BLE001 - the database poll retries
            log.warning("state: cannot reload the key cache: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._stop_reloads()
        await self.subscriber.aclose()

    async def _stop_reloads(self) -> None:
        """Cancel the key reloads under way and wait for them: one cancelled mid-query ends
        once its connection closed, after the query, and the control plane disposes of the
        engine next (a stuck database: ``CLOSE_WAIT`` at most)."""
        reloads = list(self._sends)
        for task in reloads:
            task.cancel()
        if reloads:
            _, running = await asyncio.wait(reloads, timeout=CLOSE_WAIT)
            if running:
                log.warning("state: %d key reloads still running at close", len(running))
