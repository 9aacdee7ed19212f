"""SSE keep-alive comments for streams whose first event is slow to come."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from aiohttp import web

from .context import Call
from .streaming import SSE_HEADERS

__all__ = ["KeepAlive", "KeepAliveClock"]

_TICKS_PER_INTERVAL = 4

# call_later(delay, callback): schedules one tick, returning its handle.
CallLater = Callable[[float, Callable[[], None]], object]


class KeepAliveClock:
    """One timer for all of an app's streams that wait for their first event.

    It ticks only while some stream waits, ``_TICKS_PER_INTERVAL`` times an interval, and
    starts the comments of each stream due, so the first comment comes between three quarters
    of an interval and one interval after the request: early is harmless, late would let a load
    balancer's idle timeout set just above the interval cut the connection. Watching a stream whose first
    event comes in time (nearly all) costs a dict insert and delete, and no clock reading: a
    timer of its own would cost more, ~1-3 µs to set and cancel (a libuv timer under uvloop).
    Streams are known by their Call (a request is no dict key); a KeepAlive is made only for a
    stream whose comments start.
    """

    def __init__(self, interval: float, call_later: CallLater | None = None) -> None:
        self.interval = interval
        # Runs a callback after a delay: the running loop's call_later; tests pass a fake one
        # and fire its ticks themselves.
        self._call_later = call_later or _loop_call_later
        self._waiting: dict[Call, int] = {}  # each waiting stream: the tick at which it is due
        self._started: dict[Call, KeepAlive] = {}  # the streams sending comments
        self._ticks = 0
        self._timer: object | None = None  # the pending tick's handle, while one is pending

    def watch(self, call: Call) -> None:
        """Start watching a call's stream; ``started(call)`` once its first event (or failure)
        came. No KeepAlive is made unless its comments start (nearly all never do)."""
        # Due at the 4th tick from now: 0.75-1 interval away (the next tick is 0-0.25 away).
        self._waiting[call] = self._ticks + _TICKS_PER_INTERVAL
        if self._timer is None:
            self._timer = self._call_later(self.interval / _TICKS_PER_INTERVAL, self._on_tick)

    def started(self, call: Call) -> KeepAlive | None:
        """Stop watching ``call``: the KeepAlive its comments started in (to ``stop``), if they
        did. A plain call, not a coroutine: a stream whose first event came in time awaits
        nothing."""
        if self._waiting.pop(call, None) is None:
            return self._started.pop(call, None)
        return None

    async def stop(self, call: Call) -> web.StreamResponse | None:
        """Stop watching ``call`` and its comments; the response if the headers went out."""
        keeper = self.started(call)
        return None if keeper is None else await keeper.stop()

    def _on_tick(self) -> None:
        self._ticks += 1
        due = [call for call, tick in self._waiting.items() if tick <= self._ticks]
        for call in due:
            del self._waiting[call]
            keeper = self._started[call] = KeepAlive(self, call.request)
            keeper.start()
        self._timer = None
        if self._waiting:
            self._timer = self._call_later(self.interval / _TICKS_PER_INTERVAL, self._on_tick)


def _loop_call_later(delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
    return asyncio.get_running_loop().call_later(delay, callback)


class KeepAlive:
    """Once started, sends the SSE headers and then a comment every interval, until stopped."""

    __slots__ = ("_done", "_task", "clock", "request", "response")

    def __init__(self, clock: KeepAliveClock, request: web.Request) -> None:
        self.clock = clock
        self.request = request
        self.response: web.StreamResponse | None = None
        self._done: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._done = asyncio.Event()
        self._task = asyncio.ensure_future(self._run(self._done))

    async def _run(self, done: asyncio.Event) -> None:
        if done.is_set():  # the answer came in the same loop turn: its status is still free
            return
        try:
            response = web.StreamResponse(headers=SSE_HEADERS)
            await response.prepare(self.request)
            self.response = response
            while not done.is_set():
                await response.write(b": keepalive\n\n")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), self.clock.interval)
        except (ConnectionResetError, OSError):
            self.request.task.cancel()  # the client is gone: stop waiting for its answer

    async def stop(self) -> web.StreamResponse | None:
        """Stop sending comments; the response if the headers went out."""
        if self._task is not None and self._done is not None:
            self._done.set()
            await self._task
        return self.response
