"""KeepAliveClock: one shared timer starts each waiting stream's comments within 0.75-1 interval."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from aioproxy.keepalive import KeepAlive, KeepAliveClock

INTERVAL = 0.08


def _request() -> web.Request:
    return make_mocked_request("POST", "/v1/chat/completions")


async def _started_at(keeper: KeepAlive, within: float) -> float | None:
    """When the keeper began sending (its task exists), polling every 2 ms; None if not within."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if keeper._task is not None:
            return time.monotonic()
        await asyncio.sleep(0.002)
    return None


async def test_a_waiting_stream_starts_within_three_quarters_to_one_interval() -> None:
    clock = KeepAliveClock(INTERVAL)
    await asyncio.sleep(INTERVAL * 0.6)  # not aligned with anything
    watched_at = time.monotonic()
    keeper = clock.watch(_request())
    started = await _started_at(keeper, INTERVAL * 2)
    await asyncio.sleep(0.01)  # its task runs: the headers and a first comment go out
    response = await keeper.stop()
    assert started is not None
    assert INTERVAL * 0.75 <= started - watched_at <= INTERVAL + 0.05  # + scheduling slack
    assert response is not None  # the stream goes on from this response


async def test_a_stream_stopped_in_time_never_starts_and_the_timer_stops() -> None:
    clock = KeepAliveClock(INTERVAL)
    keeper = clock.watch(_request())
    assert clock._timer is not None
    assert await keeper.stop() is None  # nothing was sent: no response to go on with
    assert await _started_at(keeper, INTERVAL * 1.6) is None
    assert clock._timer is None


async def test_streams_watched_later_wait_their_own_interval() -> None:
    clock = KeepAliveClock(INTERVAL)
    first = clock.watch(_request())
    await asyncio.sleep(INTERVAL * 0.5)
    second = clock.watch(_request())
    first_at, second_at = await asyncio.gather(
        _started_at(first, INTERVAL * 2), _started_at(second, INTERVAL * 2)
    )
    await first.stop()
    await second.stop()
    assert first_at is not None and second_at is not None
    assert second_at - first_at >= INTERVAL * 0.25


async def test_an_answer_in_the_same_turn_as_the_start_keeps_its_status() -> None:
    """Started by a tick and stopped before its task ran: no headers go out, so the answer
    (an error, say) still gets its own status."""
    clock = KeepAliveClock(INTERVAL)
    keeper = clock.watch(_request())
    keeper.start()  # what a tick does
    assert await keeper.stop() is None
