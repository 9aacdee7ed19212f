"""A clock for the router and the retry loop that moves only when the test says so.

``install(proxy)`` puts one in a running proxy. ``now`` is the fake time; ``sleep`` records each
wait in ``sleeps`` and then either returns at once, time moved on by the delay (the default), or,
with ``hold = True``, waits until the test calls ``release()``, so a test can act while a retry
is "waiting" without any wall-clock bound.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from aiohttp import web

from ..keys import runtime_key
from ..router import Clock


class _Serving(Protocol):
    """A running proxy: the kit's ProxyUnderTest or pytest-aiohttp's TestServer."""

    @property
    def app(self) -> web.Application: ...


class FakeClock(Clock):
    def __init__(self, start: float = 1000.0) -> None:
        super().__init__(self._now, self._sleep)
        self.time = start
        self.sleeps: list[float] = []
        self.cancelled = 0  # sleeps that ended cancelled (the request went away meanwhile)
        self.hold = False
        self.sleeping = asyncio.Event()  # set while a held sleep waits
        self._released = asyncio.Event()

    def install(self, proxy: _Serving) -> FakeClock:
        proxy.app[runtime_key].router.clock = self
        return self

    def advance(self, seconds: float) -> None:
        self.time += seconds

    def release(self) -> None:
        """Let the held sleeps end (time moves on by their delays)."""
        self._released.set()

    def _now(self) -> float:
        return self.time

    async def _sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        if self.hold:
            self.sleeping.set()
            try:
                await self._released.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.sleeping.clear()
        self.time += delay
        await asyncio.sleep(0)
