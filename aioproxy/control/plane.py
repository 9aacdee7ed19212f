"""``ControlPlane``: one app's database, key cache, request log, prices and clock."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from ..config import Config
from ..deployments import deployments_from
from .cache import KeyCache
from .clock import ControlClock
from .engine import open_engine
from .pricing import Pricing
from .requestlog import RequestLog
from .rows import RowBuilder

if TYPE_CHECKING:
    from ..state.counters import SharedCounters

__all__ = ["ControlPlane", "clock_key", "plane_key"]


class ControlPlane:
    def __init__(self, config: Config, engine: AsyncEngine, clock: ControlClock) -> None:
        self.config = config
        self.engine = engine
        self.clock = clock
        self.cache = KeyCache(engine)
        self.cache.plane = self
        self.pricing = Pricing()
        build = RowBuilder(self.pricing, self.cache, log_rows=config.spend.log)
        self.log = RequestLog(engine, self.cache, config.spend, clock.time, build)
        self._poller: asyncio.Task[None] | None = None
        # Set once closed: plugins that keep the plane (keyauth, spend) find the app's new one
        # when the same app object is started again.
        self.closed = False
        # Set by the state plugin with [state] redis_url: key and team counters in Redis, and
        # what tells the other instances that keys or teams changed.
        self.shared: SharedCounters | None = None
        self.announce_change: Callable[[], Awaitable[None]] | None = None

    @classmethod
    async def open(cls, config: Config, clock: ControlClock) -> ControlPlane:
        plane = cls(config, await open_engine(config.database.url), clock)
        try:
            await plane.cache.reload()
        except BaseException:
            await plane.engine.dispose()
            raise
        table = deployments_from(config)
        await plane.pricing.preload(d for deployments in table.values() for d in deployments)
        return plane

    def start(self) -> None:
        self.log.start()
        self._poller = asyncio.create_task(
            self.cache.poll(self.config.database.poll_interval), name="aioproxy key cache"
        )

    async def close(self) -> None:
        self.closed = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.log.stop()
        await self.engine.dispose()


plane_key = web.AppKey("aioproxy.control", ControlPlane)
# Tests set it before the app starts, to move time instead of waiting.
clock_key = web.AppKey("aioproxy.control.clock", ControlClock)
