"""Cached answers in Redis, shared by every instance (``[state] redis_url``): its own module, so
that a process without Redis never imports the client.

Bounded like the memory store, in entries and bytes (``[cache] max_entries``, ``max_bytes``),
across every instance: each write also records the entry in an index (by the time it was
written) and its size, and drops the oldest entries beyond the bounds, in one script. Redis's
own ``maxmemory`` is then not needed for the cache, and its eviction never takes the limits'
counters (nor refuses their scripts, under ``noeviction``) for the cache's sake."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from redis.exceptions import RedisError

from ..config import CacheConfig
from ..state.batch import LuaScript
from ..state.link import RedisLink
from .stores import Entry

__all__ = ["RedisStore"]

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Entry).decode

# ARGV: the entries' prefix, the index's (a sorted set: entry -> when written, µs), the sizes'
# (a hash: entry -> bytes) and the total's keys; the entry's name, its value, its TTL (ms);
# the bounds in entries and bytes. An entry expired by its TTL keeps its place in the index
# until it is the oldest (the bounds hold, a little early).
# Redis keeps what a script wrote before it failed: the accounting keys are read first, each of
# its type (WRONGTYPE fails the call there, before any write: nothing is kept, the cache misses
# until the key is deleted), and the total is computed here and set once at the end (a size
# or a total that is not a number counts as 0), so no write can fail on what a key holds.
_KEEP = """
local prefix, index, sizes, total = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local name, value = ARGV[5], ARGV[6]
local most, limit = tonumber(ARGV[8]), tonumber(ARGV[9])
local count = redis.call('ZCARD', index)
local old = tonumber(redis.call('HGET', sizes, name)) or 0
local bytes = tonumber(redis.call('GET', total)) or 0
bytes = bytes - old + #value
redis.call('SET', prefix .. name, value, 'PX', ARGV[7])
local clock = redis.call('TIME')
count = count + redis.call('ZADD', index, clock[1] * 1000000 + clock[2], name)
redis.call('HSET', sizes, name, #value)
while count > 0 and (count > most or bytes > limit) do
  local oldest = redis.call('ZPOPMIN', index)[1]
  bytes = bytes - (tonumber(redis.call('HGET', sizes, oldest)) or 0)
  redis.call('HDEL', sizes, oldest)
  redis.call('DEL', prefix .. oldest)
  count = count - 1
end
redis.call('SET', total, math.max(0, bytes))
"""


class RedisStore:
    """Entries with Redis's own expiry, read and written in the link's batches; a Redis that
    fails is a miss, never an error."""

    def __init__(self, link: RedisLink, config: CacheConfig) -> None:
        self.link = link
        self.prefix = f"{link.prefix}:cache:"
        self.script = LuaScript(_KEEP)
        # The script's words besides the entry, made once: where, and the bounds.
        self._where = [
            self.prefix,
            *(f"{link.prefix}:cache-{part}" for part in ("index", "sizes", "bytes")),
        ]
        self._bounds = [config.max_entries, config.max_bytes]

    def lookup(self, key: str) -> asyncio.Future[Any]:
        if not self.link.up:
            missed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            missed.set_result(None)
            return missed
        pending = self.link.batcher.command("GET", self.prefix + key)
        pending.add_done_callback(self._done)
        return pending

    async def entry_of(self, lookup: asyncio.Future[Any]) -> Entry | None:
        try:
            raw = await lookup
        except (RedisError, OSError):
            return None  # counted by _done
        return None if raw is None else _decode(raw)

    def keep(self, key: str, entry: Entry, ttl: float) -> None:
        if self.link.up:
            ttl_ms = max(1, int(ttl * 1000))
            args = [*self._where, key, _encode(entry), ttl_ms, *self._bounds]
            written = self.link.batcher.run(self.script, [], args)
            written.add_done_callback(self._done)

    def _done(self, call: asyncio.Future[Any]) -> None:
        """A failed call marks the link lost (and its exception is retrieved: no warning);
        but one Redis refused for what a key holds (an entry or an accounting key of another
        type) is that key's miss alone, logged, counted: the limits keep Redis."""
        if not call.cancelled() and (error := call.exception()) is not None:
            self.link.failed(
                error,
                "response cache",
                "state: Redis refused a response cache call (%s): a key under the prefix holds "
                "what the cache cannot use; it misses there until the key is deleted",
            )
