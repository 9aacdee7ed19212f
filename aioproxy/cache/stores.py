"""Where cached answers live: an LRU in this process, or Redis (shared by every instance:
``redis_store``, imported only with ``[state] redis_url``)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal, Protocol

import msgspec

from ..config import CacheConfig

__all__ = ["Entry", "MemoryStore", "Store"]


class Entry(msgspec.Struct, array_like=True):
    """One cached answer, in the form it came: a JSON body, or a stream's SSE events."""

    form: Literal["json", "stream"]
    body: bytes
    # A stream's usage-only chunk, apart from ``body``: replayed only to requests asking for
    # it. Last, with a default: entries kept before it was added still decode.
    usage: bytes = b""


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
        self.bytes += len(entry.body) + len(entry.usage)
        while len(self.entries) > self.config.max_entries or self.bytes > self.config.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: str) -> None:
        _, entry = self.entries.pop(key)
        self.bytes -= len(entry.body) + len(entry.usage)
