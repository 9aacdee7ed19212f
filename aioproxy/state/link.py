"""The Redis connection: short timeouts, and a health flag the request path reads instead of
waiting on a Redis that is gone.

A failed call marks the link down (logged once, counted); requests then use per-process
counters at once, without trying Redis. A probe pings it in the background and marks it up
again when it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..config import StateConfig
from .batch import Batcher

__all__ = ["RedisLink"]

log = logging.getLogger("aioproxy")

PROBE_INTERVAL = 0.5  # seconds between two pings while Redis is down


class RedisLink:
    """One app's Redis client and whether it is usable now."""

    def __init__(self, config: StateConfig) -> None:
        assert config.redis_url is not None
        self.config = config
        self.prefix = config.prefix
        # A bounded pool that requests wait on (within the timeout) rather than failing when
        # every connection is busy; no retries: a script sent twice would count twice.
        pool = aioredis.BlockingConnectionPool.from_url(
            str(config.redis_url),
            max_connections=config.max_connections,
            timeout=config.timeout,
            socket_timeout=config.timeout,
            socket_connect_timeout=config.timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self.client: aioredis.Redis = aioredis.Redis(
            connection_pool=pool, retry=Retry(NoBackoff(), 0)
        )
        self.client.auto_close_connection_pool = True  # its aclose closes the pool too
        self.batcher = Batcher(self.client, config.timeout)  # every hot-path call goes through it
        self.up = True
        self.failures = 0  # times Redis was lost (for metrics and tests)
        self._probe: asyncio.Task[None] | None = None
        self._on_resume: list[Callable[[], Awaitable[None]]] = []
        self.on_lost: Callable[[], None] | None = None  # counts it (the metrics, when on)

    def on_resume(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` each time Redis comes back (resubscribe, reload what was missed)."""
        self._on_resume.append(callback)

    async def check(self) -> None:
        """At start-up: an unreachable Redis is logged and probed for, not fatal."""
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            self.lost(exc)

    def lost(self, error: BaseException) -> None:
        """A call failed: fall back until a ping answers again."""
        if not self.up:
            return
        self.up = False
        self.failures += 1
        if self.on_lost is not None:
            self.on_lost()
        log.warning(
            "state: Redis is unreachable (%s); limits fall back to per-process counters "
            "([state] on_error = %r) until it is back",
            type(error).__name__,
            self.config.on_error,
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._wait_for_redis(), name="aioproxy redis probe")

    async def _wait_for_redis(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self.client.ping()
            except (RedisError, OSError):
                continue
            break
        self.up = True
        log.warning("state: Redis is back; shared limits resume")
        for callback in self._on_resume:
            try:
                await callback()
            except (RedisError, OSError) as exc:
                self.lost(exc)
                return

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.batcher.close()
        await self.client.aclose()
