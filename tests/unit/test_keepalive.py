"""KeepAliveClock: one shared timer starts each waiting stream's comments within 0.75-1 interval
(at its 4th tick of interval/4). The ticks are a fake's, fired by the tests: no wall clock."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from aioproxy.keepalive import KeepAliveClock
from aioproxy.testing import eventually

INTERVAL = 0.08


class Ticks:
    """A fake ``call_later``: holds the one pending tick until the test fires it."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> object:
        self.pending.append((delay, callback))
        return object()

    def fire(self, times: int = 1) -> None:
        for _ in range(times):
            assert len(self.pending) == 1, "one tick pending at a time"
            _, callback = self.pending.pop()
            callback()


def _request() -> web.Request:
    return make_mocked_request("POST", "/v1/chat/completions")


async def test_a_waiting_stream_starts_at_its_fourth_tick_of_a_quarter_interval() -> None:
    ticks = Ticks()
    clock = KeepAliveClock(INTERVAL, ticks)
    keeper = clock.watch(_request())
    assert [delay for delay, _ in ticks.pending] == [INTERVAL / 4]
    ticks.fire(3)  # 0.75 interval (at most) since the watch: not yet
    assert keeper._task is None
    ticks.fire()
    assert keeper._task is not None
    await eventually(lambda: keeper.response is not None, what="the headers and a first comment")
    assert await keeper.stop() is not None  # the stream goes on from this response
    assert ticks.pending == [] and clock._timer is None  # nobody waits: the timer stopped


async def test_a_stream_stopped_in_time_never_starts_and_the_timer_stops() -> None:
    ticks = Ticks()
    clock = KeepAliveClock(INTERVAL, ticks)
    keeper = clock.watch(_request())
    assert clock._timer is not None
    assert await keeper.stop() is None  # nothing was sent: no response to go on with
    ticks.fire()
    assert keeper._task is None
    assert ticks.pending == [] and clock._timer is None


async def test_streams_watched_later_wait_their_own_interval() -> None:
    ticks = Ticks()
    clock = KeepAliveClock(INTERVAL, ticks)
    first = clock.watch(_request())
    ticks.fire(2)
    second = clock.watch(_request())  # the pending tick serves it too: no second timer
    assert len(ticks.pending) == 1
    ticks.fire(2)
    assert first._task is not None and second._task is None
    ticks.fire()
    assert second._task is None  # 3 ticks after its watch: not yet
    ticks.fire()
    assert second._task is not None
    await first.stop()
    await second.stop()
    assert ticks.pending == []


async def test_an_answer_in_the_same_turn_as_the_start_keeps_its_status() -> None:
    """Started by a tick and stopped before its task ran: no headers go out, so the answer
    (an error, say) still gets its own status."""
    clock = KeepAliveClock(INTERVAL)
    keeper = clock.watch(_request())
    keeper.start()  # what a tick does
    assert await keeper.stop() is None
