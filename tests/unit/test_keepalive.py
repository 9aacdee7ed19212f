"""KeepAliveClock: one shared timer starts each waiting stream's comments within 0.75-1 interval
(at its 4th tick of interval/4). The ticks are a fake's, fired by the tests: no wall clock."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from aioproxy.context import Call, Principal
from aioproxy.keepalive import KeepAliveClock
from aioproxy.routes import Kind
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


def _call() -> Call:
    request: web.Request = make_mocked_request("POST", "/v1/chat/completions")
    return Call(Kind.CHAT_COMPLETIONS, request, Principal("p"), "m", {}, True)


async def test_a_waiting_stream_starts_at_its_fourth_tick_of_a_quarter_interval() -> None:
    ticks = Ticks()
    clock = KeepAliveClock(INTERVAL, ticks)
    call = _call()
    clock.watch(call)
    assert [delay for delay, _ in ticks.pending] == [INTERVAL / 4]
    ticks.fire(3)  # 0.75 interval (at most) since the watch: not yet
    assert call not in clock._started
    ticks.fire()
    keeper = clock._started[call]
    assert keeper._task is not None
    await eventually(lambda: keeper.response is not None, what="the headers and a first comment")
    assert await clock.stop(call) is not None  # the stream goes on from this response
    assert not clock._started and not clock._waiting
    assert ticks.pending == [] and clock._timer is None  # nobody waits: the timer stopped


async def test_a_stream_stopped_in_time_never_starts_and_the_timer_stops() -> None:
    ticks = Ticks()
    clock = KeepAliveClock(INTERVAL, ticks)
    call = _call()
    clock.watch(call)
    assert clock._timer is not None
    assert clock.started(call) is None  # nothing was sent: no response to go on with
    ticks.fire()
    assert not clock._started
    assert ticks.pending == [] and clock._timer is None


async def test_streams_watched_later_wait_their_own_interval() -> None:
    ticks = Ticks()
    clock = KeepAliveClock(INTERVAL, ticks)
    first, second = _call(), _call()
    clock.watch(first)
    ticks.fire(2)
    clock.watch(second)  # the pending tick serves it too: no second timer
    assert len(ticks.pending) == 1
    ticks.fire(2)
    assert first in clock._started and second not in clock._started
    ticks.fire()
    assert second not in clock._started  # 3 ticks after its watch: not yet
    ticks.fire()
    assert second in clock._started
    await clock.stop(first)
    await clock.stop(second)
    assert ticks.pending == []


async def test_an_answer_in_the_same_turn_as_the_start_keeps_its_status() -> None:
    """Started by a tick and stopped before its task ran: no headers go out, so the answer
    (an error, say) still gets its own status."""
    ticks = Ticks()
    clock = KeepAliveClock(INTERVAL, ticks)
    call = _call()
    clock.watch(call)
    ticks.fire(4)  # the tick that starts it: its task has not run yet
    assert clock._started[call]._task is not None
    assert await clock.stop(call) is None
