"""Cached answers in Redis, shared by every instance (``[state] redis_url``): its own module, so
that a process without Redis never imports the client."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from redis.exceptions import RedisError

from ..state.link import RedisLink
from .stores import Entry

__all__ = ["RedisStore"]

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Entry).decode


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
