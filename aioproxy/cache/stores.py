"""Where cached answers live: an LRU in this process, or Redis (shared by every instance)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal, Protocol

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..config import CacheConfig
from ..state.link import RedisLink

__all__ = ["Entry", "MemoryStore", "RedisStore", "Store"]


class Entry(msgspec.Struct, array_like=True):
    """One cached answer, in the form it came: a JSON body, or a stream's SSE events."""

    form: Literal["json", "stream"]
    body: bytes


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Entry).decode


class Store(Protocol):
    async def get(self, key: str) -> Entry | None: ...

    async def put(self, key: str, entry: Entry, ttl: float) -> None: ...


class MemoryStore:
    """Least recently used first out, beyond ``max_entries`` or ``max_bytes`` of answers."""

    def __init__(self, config: CacheConfig, now: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.now = now
        self.entries: OrderedDict[str, tuple[float, Entry]] = OrderedDict()
        self.bytes = 0

    async def get(self, key: str) -> Entry | None:
        found = self.entries.get(key)
        if found is None:
            return None
        expires, entry = found
        if expires <= self.now():
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return entry

    async def put(self, key: str, entry: Entry, ttl: float) -> None:
        if key in self.entries:
            self._drop(key)
        self.entries[key] = (self.now() + ttl, entry)
        self.bytes += len(entry.body)
        while len(self.entries) > self.config.max_entries or self.bytes > self.config.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: str) -> None:
        _, entry = self.entries.pop(key)
        self.bytes -= len(entry.body)


class RedisStore:
    """Entries with Redis's own expiry; a Redis that fails is a miss, never an error."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.client: aioredis.Redis = link.client
        self.prefix = f"{link.prefix}:cache:"

    async def get(self, key: str) -> Entry | None:
        if not self.link.up:
            return None
        try:
            raw = await self.client.get(self.prefix + key)
        except (RedisError, OSError) as exc:
            self.link.lost(exc)
            return None
        return None if raw is None else _decode(raw if isinstance(raw, bytes) else raw.encode())

    async def put(self, key: str, entry: Entry, ttl: float) -> None:
        if not self.link.up:
            return
        try:
            await self.client.set(self.prefix + key, _encode(entry), px=max(1, int(ttl * 1000)))
        except (RedisError, OSError) as exc:
            self.link.lost(exc)
