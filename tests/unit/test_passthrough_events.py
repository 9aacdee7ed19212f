"""passthrough.events: the upstream's events as they come, an error event raised after the
events before it, the final event checked, and the budget's held bytes given back however the
stream ends (read to its end, failed, closed, cancelled or dropped unclosed)."""

from __future__ import annotations

import asyncio
import gc
from unittest import mock

import pytest
from aiohttp import StreamReader

from aioproxy.budget import BufferBudget
from aioproxy.context import Deployment
from aioproxy.errors import BadGateway, ProxyError
from aioproxy.passthrough import PassedEvents, events
from aioproxy.replies import ClosedAtOnce, StreamReply
from aioproxy.routes import Kind

DEPLOYMENT = Deployment(name="m", provider="openai", model="up")
ERROR = b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n'


class _Response:
    """What events reads of an upstream answer: its body, and whether it was released."""

    def __init__(self, *chunks: bytes, eof: bool = True) -> None:
        reader = StreamReader(
            mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop()
        )
        for chunk in chunks:
            reader.feed_data(chunk)
        if eof:
            reader.feed_eof()
        self.content = reader
        self.released = 0

    def release(self) -> None:
        self.released += 1


def _events(response: _Response, budget: BufferBudget | None = None) -> PassedEvents:
    return events(response, DEPLOYMENT, Kind.CHAT_COMPLETIONS, None, budget)  # type: ignore[arg-type]


async def _read(stream: PassedEvents) -> list[bytes]:
    return [block async for block in stream]


async def test_a_complete_stream_is_passed_on_and_its_answer_released() -> None:
    response = _Response(b"data: 1\n\n", b"data: 2\n\ndata: [DONE]\n\n")
    stream = _events(response)
    assert await _read(stream) == [b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"]  # as read
    assert response.released == 1
    with pytest.raises(StopAsyncIteration):  # ended for good
        await anext(stream)
    assert response.released == 1


async def test_a_stream_cut_short_is_the_clients_502() -> None:
    budget = BufferBudget(1_000)
    response = _Response(b"data: 1\n\ndata: 2")
    stream = _events(response, budget)
    assert await anext(stream) == b"data: 1\n\n"
    assert await anext(stream) == b"data: 2\n\n"  # the cut event, ended
    with pytest.raises(BadGateway) as raised:
        await anext(stream)
    assert raised.value.code == "upstream_stream_incomplete"
    assert raised.value.__context__ is None  # raised on its own, as the generator raised it
    assert response.released == 0 and budget.used == 0
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_an_error_event_comes_after_the_events_before_it() -> None:
    budget = BufferBudget(1_000)
    stream = _events(_Response(b"data: 1\n\n" + ERROR + b"data: 3\n\n", b"data: 4"), budget)
    assert await anext(stream) == b"data: 1\n\n"  # what came before the error goes out first
    with pytest.raises(ProxyError) as raised:
        await anext(stream)
    assert "overloaded" in raised.value.message
    assert budget.used == 0
    with pytest.raises(StopAsyncIteration):
        await anext(stream)

    stream = _events(_Response(ERROR))  # an error first: raised at once
    with pytest.raises(ProxyError):
        await anext(stream)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_closed_it_gives_the_held_bytes_back_and_ends() -> None:
    budget = BufferBudget(1_000)
    stream = _events(_Response(b"data: 1\n\ndata: 2", eof=False), budget)
    assert await anext(stream) == b"data: 1\n\n"
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # it holds "data: 2", waiting for the rest
    assert budget.used == len(b"data: 2")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert budget.used == 0
    with pytest.raises(StopAsyncIteration):
        await anext(stream)

    stream = _events(_Response(b"data: 1\n\n", eof=False), budget)
    assert await anext(stream) == b"data: 1\n\n"
    await stream.aclose()
    await stream.aclose()  # twice: nothing more happens
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert budget.used == 0

    await _events(_Response(b"data: 1\n\n"), budget).aclose()  # closed before it was read


async def test_dropped_unclosed_it_gives_the_held_bytes_back() -> None:
    budget = BufferBudget(1_000)
    stream = _events(_Response(b"data: 1\n\ndata: 2"), budget)
    assert await anext(stream) == b"data: 1\n\n"
    assert await anext(stream) == b"data: 2\n\n"
    assert budget.used == len(b"data: 2")
    del stream
    gc.collect()
    assert budget.used == 0


def _without_usage(block: bytes) -> bytes:
    """A transform as the usage tap's: its usage event taken out of a block."""
    return block.replace(b"data: usage\n\n", b"")


async def test_a_transform_changes_each_block_and_an_emptied_one_passes_nothing_on() -> None:
    response = _Response(b"data: 1\n\ndata: usage\n\n", eof=False)
    stream = _events(response)
    stream.transform = _without_usage
    assert await anext(stream) == b"data: 1\n\n"
    response.content.feed_data(b"data: usage\n\n")  # a block it empties: the next one comes
    reading = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    assert not reading.done()
    response.content.feed_data(b"data: [DONE]\n\n")
    response.content.feed_eof()
    assert await reading == b"data: [DONE]\n\n"
    assert await _read(stream) == []
    assert response.released == 1  # complete: its final event was checked as it came


async def test_a_transform_changes_the_events_before_an_error() -> None:
    stream = _events(_Response(b"data: 1\n\ndata: usage\n\n" + ERROR))
    stream.transform = _without_usage
    assert await anext(stream) == b"data: 1\n\n"
    with pytest.raises(ProxyError):
        await anext(stream)

    stream = _events(_Response(b"data: usage\n\n" + ERROR))  # all of them taken out
    stream.transform = _without_usage
    with pytest.raises(ProxyError) as raised:  # the error at once, as the next read gave it
        await anext(stream)
    assert "overloaded" in raised.value.message
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_a_reply_closes_its_events_at_once_and_then_its_answer() -> None:
    """StreamReply.aclose ends the core's SSE events with their sync close (no coroutine of
    theirs): held bytes back, nothing more read, and the reply's own close after."""
    budget = BufferBudget(1_000)
    closed: list[int] = []
    events = _events(_Response(b"data: 1\n\ndata: 2", eof=False), budget)
    reply = StreamReply(events, close=lambda: closed.append(budget.used))
    assert isinstance(events, ClosedAtOnce)
    assert await anext(events) == b"data: 1\n\n"
    assert budget.used == len(b"data: 2")  # the unfinished event, held
    await reply.aclose()
    assert closed == [0]  # the events gave their bytes back first
    with pytest.raises(StopAsyncIteration):
        await anext(events)
