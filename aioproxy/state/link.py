"""The Redis connection: short timeouts, and a health flag the request path reads instead of
waiting on a Redis that is gone (or refuses writes).

A failed call marks the link down (logged once, counted); requests then use per-process
counters at once, without trying Redis. A probe renews this instance's lease in the background
and marks it up again when that write succeeds.

Each instance holds a lease in Redis (``<prefix>:alive:<instance>``), renewed by a heartbeat
and by each of its scripts: counts of requests in flight are kept per instance, and those of
an instance whose lease ran out (killed, or cut off from Redis) stop counting, so the slots
of a crashed instance are freed within ``LEASE`` seconds instead of being held for an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from ..config import StateConfig
from .batch import Batcher, LuaScript, script_failed

__all__ = ["RedisLink"]

log = logging.getLogger("aioproxy")

PROBE_INTERVAL = 0.5  # seconds between two pings while Redis is down
LEASE = 15.0  # seconds an instance's counts in flight outlive its last sign of life
HEARTBEAT = 3.0  # seconds between two renewals of the lease (a loop may lag a few seconds)
UNUSABLE_LOG_EVERY = 60.0  # seconds: a key a call cannot use is logged once in these


class RedisLink:
    """One app's Redis client and whether it is usable now."""

    def __init__(self, config: StateConfig) -> None:
        assert config.redis_url is not None
        self.config = config
        self.prefix = config.prefix
        self.instance = os.urandom(8).hex()  # this process's name in the counts in flight
        self.alive_prefix = f"{config.prefix}:alive:"  # + an instance: its lease
        self.lease_ms = int(LEASE * 1000)
        # What each script that counts requests in flight is told (made once): who, the
        # prefix of its keys (``alive:`` + an instance: its lease; ``applied:`` + an instance:
        # the record of its last calls run), how long a lease lasts.
        self.lease = (self.instance, f"{config.prefix}:", self.lease_ms)
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
        self.probes = 0  # writes the probe tried while Redis was lost (tests wait on them)
        self._probe: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._on_resume: list[Callable[[], Awaitable[None]]] = []
        self._scripts: dict[str, LuaScript] = {}  # preloaded: again when Redis is back
        self.on_lost: Callable[[], None] | None = None  # counts it (the metrics, when on)
        self.unusable = 0  # times a call met a key it cannot use (for metrics and tests)
        self.on_unusable: Callable[[], None] | None = None  # counts those (the metrics)
        self.monotonic = time.monotonic  # when each was last logged (the control plane's clock)
        self._unusable_logged: dict[str, float] = {}  # per key (or what refused): when

    def on_resume(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` each time Redis comes back (resubscribe, reload what was missed)."""
        self._on_resume.append(callback)

    async def start(self) -> None:
        """At start-up: an unreachable Redis is logged and probed for, not fatal; the lease
        is renewed from now on."""
        try:
            await self._renew()
        except (RedisError, OSError) as exc:
            self.lost(exc)
        self._heartbeat = asyncio.create_task(self._beat(), name="aioproxy redis lease")

    async def _beat(self) -> None:
        key = self.alive_prefix + self.instance
        while True:
            if self.up:
                try:
                    await self.batcher.command("SET", key, 1, "PX", self.lease_ms)
                except (RedisError, OSError) as exc:
                    self.lost(exc)
            await asyncio.sleep(HEARTBEAT)

    async def preload(self, *scripts: LuaScript) -> None:
        """Load ``scripts`` at start-up, and again each time Redis is back (a restart
        flushes them), so that no request's batch pays a NOSCRIPT and a load round trip."""
        self._scripts.update((script.sha, script) for script in scripts)
        if self.up:
            try:
                await self._load(scripts)
            except (RedisError, OSError) as exc:
                self.lost(exc)

    async def _load(self, scripts: Iterable[LuaScript]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for script in scripts:
                pipe.script_load(script.text)
            await pipe.execute()

    async def _renew(self) -> None:
        """Renew the lease directly (not batched): what tells a usable Redis. A write, not a
        PING: a Redis that answers but refuses writes (out of memory under ``noeviction``, a
        replica after a failover) is not back, or each request would find it lost again."""
        await self.client.set(self.alive_prefix + self.instance, 1, px=self.lease_ms)

    def count_unusable(self, about: str, message: str, *args: object) -> None:
        """A call met a key it cannot use (of another type, not holding counts): that call's
        or that key's scope's failure, not the link's. Counted each time; ``message`` logged
        once a minute per ``about`` (each batch holding the key's requests meets it)."""
        self.unusable += 1
        if self.on_unusable is not None:
            self.on_unusable()
        now = self.monotonic()
        logged = self._unusable_logged
        if now - logged.get(about, -math.inf) < UNUSABLE_LOG_EVERY:
            return
        if len(logged) >= 1000:  # bounded: the oldest forgotten
            del logged[next(iter(logged))]
        logged.pop(about, None)
        logged[about] = now
        log.error(message + " (logged once a minute)", *args)

    def failed(self, error: BaseException, about: str, refusal: str) -> None:
        """A call failed: Redis is lost, unless it refused the call itself (``script_failed``:
        a key under the prefix it cannot use), which is ``about``'s alone (``refusal``: what
        to log, with the error)."""
        if script_failed(error):
            self.count_unusable(about, refusal, error)
        else:
            self.lost(error)

    def lost(self, error: BaseException) -> None:
        """A call failed: fall back until a ping answers again."""
        if not self.up:
            return
        self.up = False
        self.failures += 1
        if self.on_lost is not None:
            self.on_lost()
        # A refusal's text is Redis's own (no address, no password): it says what to fix.
        why = f"{type(error).__name__}: {error}" if isinstance(error, ResponseError) else ""
        log.warning(
            "state: Redis is unreachable or refuses (%s); limits fall back to per-process "
            "counters ([state] on_error = %r) until it is back",
            why or type(error).__name__,
            self.config.on_error,
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._wait_for_redis(), name="aioproxy redis probe")

    async def _wait_for_redis(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            self.probes += 1
            try:
                await self._renew()
                await self._load(self._scripts.values())  # before any request's batch
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
        for task in (self._probe, self._heartbeat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.up:  # gone: the others stop counting this one's requests in flight at once
            with contextlib.suppress(RedisError, OSError):
                await self.batcher.command("DEL", self.alive_prefix + self.instance)
        await self.batcher.close()
        await self.client.aclose()
