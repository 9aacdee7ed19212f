"""``ControlPlane``: one app's database, key cache, request log, prices and clock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from ..config import Config
from ..deployments import deployments_from
from .cache import KeyCache
from .clock import ControlClock
from .engine import CLOSE_WAIT, open_engine
from .pricing import Pricing
from .requestlog import RequestLog
from .rows import RowBuilder

if TYPE_CHECKING:
    from ..state.counters import SharedCounters

__all__ = ["ControlPlane", "clock_key", "plane_key"]

log = logging.getLogger("aioproxy")


class _CheckedOut:
    """The engine's connections out of its pool, so that the close disposes of the engine
    only once every call on them returned. A call whose task was cancelled still runs in the
    driver (SQLite's worker thread); disposed under it, the connection is stopped without
    waiting, and the call's result, once it ends, is posted to a loop that may have closed
    meanwhile (aiosqlite's thread then raises "Event loop is closed")."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._out: set[Any] = set()  # their pool records
        self._none_out = asyncio.Event()
        self._none_out.set()
        sa.event.listen(engine.sync_engine, "checkout", self._checked_out)
        sa.event.listen(engine.sync_engine, "checkin", self._checked_in)

    def _checked_out(self, _connection: Any, record: Any, _proxy: Any) -> None:
        self._out.add(record)
        self._none_out.clear()

    def _checked_in(self, _connection: Any, record: Any) -> None:
        self._out.discard(record)
        if not self._out:
            self._none_out.set()

    async def all_returned(self, timeout: float) -> None:
        """Until no connection is out (each call on it returned), or ``timeout`` seconds."""
        if self._none_out.is_set():
            return
        log.info("control plane: waiting for %d database calls in flight", len(self._out))
        try:
            async with asyncio.timeout(timeout):
                await self._none_out.wait()
        except TimeoutError:
            log.warning(
                "control plane: %d database calls still running after %g s: closing anyway",
                len(self._out),
                timeout,
            )


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
        self._checked_out = _CheckedOut(engine)
        # Set once closed: plugins that keep the plane (keyauth, spend) find the app's new one
        # when the same app object is started again.
        self.closed = False
        # Set by the state plugin with [state] redis_url: key and team counters in Redis, and
        # what tells the other instances that keys or teams changed.
        self.shared: SharedCounters | None = None
        self.announce_change: Callable[[], Awaitable[None]] | None = None

    @classmethod
    async def open(cls, config: Config, clock: ControlClock) -> ControlPlane:
        plane = cls(
            config, await open_engine(config.database.url, config.database.statement_timeout), clock
        )
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
        """Stop the poll and the request log, then dispose of the engine once every call on
        its connections returned (others' too: a key reload the state plugin cancelled)."""
        self.closed = True
        await self._stop_poller()
        # A server can fall silent (a SQLite file cannot): its writes then wait this long.
        bound = self.config.database.statement_timeout
        server = self.engine.dialect.name != "sqlite"
        await self.log.stop(bound if server and bound else None)
        await self._checked_out.all_returned(CLOSE_WAIT)
        try:
            # Each pooled connection's close waits for the server's goodbye: none from a
            # silent one (TCP would give up after ~15 min, one connection after another).
            async with asyncio.timeout(CLOSE_WAIT):
                await self.engine.dispose()
        except TimeoutError:
            log.error("database: its connections were still closing %g s on, left", CLOSE_WAIT)

    async def _stop_poller(self) -> None:
        """Cancel the poll and wait for it to end: a refresh cancelled mid-query ends once its
        connection closed, after the query (a stuck database: ``CLOSE_WAIT`` at most)."""
        poller, self._poller = self._poller, None
        if poller is None:
            return
        poller.cancel()
        done, _ = await asyncio.wait({poller}, timeout=CLOSE_WAIT)
        if not done:
            log.warning("control plane: the key cache's poll still running after %g s", CLOSE_WAIT)


plane_key = web.AppKey("aioproxy.control", ControlPlane)
# Tests set it before the app starts, to move time instead of waiting.
clock_key = web.AppKey("aioproxy.control.clock", ControlClock)
