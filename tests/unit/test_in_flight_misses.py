"""The coalescing of identical cache misses (aioproxy.cache.coalescing.InFlight) on its own:
a first miss that never ends, a waiter that leaves."""

from __future__ import annotations

import asyncio

import pytest

from aioproxy.cache.coalescing import InFlight
from aioproxy.cache.stores import Entry
from aioproxy.testing import eventually


async def test_a_stuck_first_is_dropped_when_a_wait_ends() -> None:
    in_flight = InFlight()
    first = in_flight.lead("k")
    assert first is not None and in_flight.lead("k") is None  # one first per key
    assert await in_flight.wait("k", first, 0.01) is None  # the waiter goes upstream
    assert first.done() and in_flight.first("k") is None
    assert in_flight.lead("k") is not None  # the next miss leads, rather than waiting too


async def test_a_waiter_leaving_leaves_the_first_untouched() -> None:
    in_flight = InFlight()
    first = in_flight.lead("k")
    assert first is not None
    leaving = asyncio.ensure_future(in_flight.wait("k", first, 60))
    staying = asyncio.ensure_future(in_flight.wait("k", first, 60))
    await eventually(lambda: in_flight.waiting == 2)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert not first.done() and in_flight.first("k") is first
    entry = Entry("json", b"{}")
    in_flight.settle("k", first, entry)
    assert await staying is entry
    assert in_flight.waiting == 0 and in_flight.first("k") is None
