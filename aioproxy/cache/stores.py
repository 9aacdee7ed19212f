"""Where cached answers live: an LRU in this process, or Redis (shared by every instance)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal, Protocol

import msgspec
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
    def lookup(self, key: str) -> asyncio.Future[Any]:
        """Start looking ``key`` up now (so it may share a round trip): a future (never
        awaited when the request is refused meanwhile) for ``entry_of``."""
        ...

    async def entry_of(self, lookup: asyncio.Future[Any]) -> Entry | None: ...

    def keep(self, key: str, entry: Entry, ttl: float) -> None:
        """Keep ``entry`` (in the background: no request waits for it)."""
        ...


class MemoryStore:
    """Least recently used first out, beyond ``max_entries`` or ``max_bytes`` of answers."""

    def __init__(self, config: CacheConfig, now: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.now = now
        self.entries: OrderedDict[str, tuple[float, Entry]] = OrderedDict()
        self.bytes = 0

    def lookup(self, key: str) -> asyncio.Future[Any]:
        found: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        found.set_result(self._find(key))
        return found

    async def entry_of(self, lookup: asyncio.Future[Any]) -> Entry | None:
        entry: Entry | None = await lookup
        return entry

    def _find(self, key: str) -> Entry | None:
        found = self.entries.get(key)
        if found is None:
            return None
        expires, entry = found
        if expires <= self.now():
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return entry

    def keep(self, key: str, entry: Entry, ttl: float) -> None:
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
    """Entries with Redis's own expiry, read and written in the link's batches; a Redis that
    fails is a miss, never an error."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.prefix = f"{link.prefix}:cache:"

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
            written = self.link.batcher.command(
                "SET", self.prefix + key, _encode(entry), "PX", max(1, int(ttl * 1000))
            )
            written.add_done_callback(self._done)

    def _done(self, call: asyncio.Future[Any]) -> None:
        """A failed call marks the link lost (and its exception is retrieved: no warning)."""
        if not call.cancelled() and (error := call.exception()) is not None:
            self.link.lost(error)
