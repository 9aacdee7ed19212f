"""aioproxy.streaming: an SSE body split into events whatever the chunking; event framing."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any
from unittest import mock

import pytest
from aiohttp import StreamReader, web
from hypothesis import given, settings
from hypothesis import strategies as st

from aioproxy.budget import BufferBudget
from aioproxy.streaming import (
    DONE,
    SSE_HEADERS,
    EventTooLarge,
    iter_sse,
    iter_sse_blocks,
    split_events,
    sse_data,
    sse_event,
)

EVENTS = [
    b'data: {"id":"1","choices":[{"delta":{"content":"Hel"}}]}\n\n',
    b'event: response.output_text.delta\ndata: {"delta":"lo"}\n\n',
    b": a comment line\n\n",
    b'data: {"multi":\ndata: "line"}\n\n',
    b'data: {"usage":{"prompt_tokens":3}}\n\n',
    DONE,
]
BODY = b"".join(EVENTS)

PROPERTY = settings(max_examples=100, deadline=None, database=None, derandomize=True)


async def sse_from_chunks(chunks: Sequence[bytes], reader_fn: Any = None) -> list[bytes]:
    """Feed ``chunks`` one by one into an aiohttp StreamReader, each read before the next comes."""
    reader = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    events: list[bytes] = []

    async def consume() -> None:
        async for event in (reader_fn or iter_sse)(reader):
            events.append(event)

    task = asyncio.create_task(consume())
    for chunk in chunks:
        reader.feed_data(chunk)
        await asyncio.sleep(0)  # the consumer takes this chunk alone
    reader.feed_eof()
    await task
    return events


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c for c in cuts if 0 < c < len(data))})
    return [data[a:b] for a, b in itertools.pairwise(points)]


async def test_feeding_really_delivers_chunks_one_by_one() -> None:
    # The harness's premise: each fed chunk reaches iter_any() on its own.
    reader = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    seen: list[bytes] = []

    async def consume() -> None:
        async for chunk in reader.iter_any():
            seen.append(chunk)

    task = asyncio.create_task(consume())
    for chunk in (b"a", b"bc", b"d"):
        reader.feed_data(chunk)
        await asyncio.sleep(0)
    reader.feed_eof()
    await task
    assert seen == [b"a", b"bc", b"d"]


async def test_whole_body_in_one_chunk() -> None:
    assert await sse_from_chunks([BODY]) == EVENTS


async def test_one_byte_at_a_time() -> None:
    assert await sse_from_chunks([bytes([b]) for b in BODY]) == EVENTS


async def test_event_yielded_as_soon_as_complete() -> None:
    reader = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    events = iter_sse(reader)
    reader.feed_data(b"data: 1\n\ndata: 2")
    assert await asyncio.wait_for(anext(events), 1) == b"data: 1\n\n"  # before EOF
    reader.feed_data(b"\n\n")
    assert await asyncio.wait_for(anext(events), 1) == b"data: 2\n\n"
    reader.feed_eof()
    with pytest.raises(StopAsyncIteration):
        await anext(events)


@PROPERTY
@given(cuts=st.lists(st.integers(0, len(BODY)), max_size=12))
async def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    assert await sse_from_chunks(split(BODY, cuts)) == EVENTS


@PROPERTY
@given(
    events=st.lists(
        st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b),
        min_size=1,
        max_size=6,
    ),
    data=st.data(),
)
async def test_any_events_any_chunking(events: list[bytes], data: st.DataObject) -> None:
    body = b"".join(b"data: " + e + b"\n\n" for e in events)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=10))
    assert await sse_from_chunks(split(body, cuts)) == [b"data: " + e + b"\n\n" for e in events]


# --- CRLF ----------------------------------------------------------------------------------------

CRLF_BODY = BODY.replace(b"\n", b"\r\n")


async def test_crlf_normalised() -> None:
    assert await sse_from_chunks([CRLF_BODY]) == EVENTS


async def test_mixed_line_ends() -> None:
    body = b"data: a\r\n\r\ndata: b\n\ndata: c\r\n\n"
    assert await sse_from_chunks([body]) == [b"data: a\n\n", b"data: b\n\n", b"data: c\n\n"]


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: a\r", b"\n\r\n"],
        [b"data: a\r\n\r", b"\n\r\n", b"data: b\r\n\r\n"],
        [b"data: a\r\n", b"\r\n"],
        [b"data: a\r", b"\n", b"\r\n"],
        [b"data: a\r\n\r", b"\ndata: b", b"\r\n\r\n"],
    ],
    ids=["cr|lf-cr-lf", "cr-lf-cr|lf", "crlf|crlf", "cr|lf|cr-lf", "cr|lf-text|cr"],
)
async def test_cr_lf_split_across_chunks(chunks: list[bytes]) -> None:
    events = await sse_from_chunks(chunks)
    assert events[0] == b"data: a\n\n"
    assert all(b"\r" not in event for event in events)


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"data: a\r\n\r", b"\n"], [b"data: a\n\n"]),
        ([b"data: a\r\n\r", b"\ndata: b\n\n"], [b"data: a\n\n", b"data: b\n\n"]),
        ([b"data: a\r", b"\n\n"], [b"data: a\n\n"]),
        ([b"data: a\r", b"\n", b"\r", b"\n"], [b"data: a\n\n"]),
    ],
    ids=["last-lf-alone", "events-merge", "cr|lf-lf", "every-byte-of-the-end"],
)
async def test_cr_then_lf_in_a_chunk_without_cr(chunks: list[bytes], expected: list[bytes]) -> None:
    assert await sse_from_chunks(chunks) == expected


@PROPERTY
@given(
    events=st.lists(st.sampled_from([b"a", b"[DONE]", b'{"x":1}']), min_size=1, max_size=3),
    data=st.data(),
)
async def test_any_chunking_of_crlf_events(events: list[bytes], data: st.DataObject) -> None:
    body = b"".join(b"data: " + e + b"\r\n\r\n" for e in events)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=4))
    assert await sse_from_chunks(split(body, cuts)) == [b"data: " + e + b"\n\n" for e in events]


# --- the end of the stream -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"data: a\n\ndata: b", [b"data: a\n\n", b"data: b\n\n"]),
        (b"data: a\n\ndata: b\n", [b"data: a\n\n", b"data: b\n\n"]),
        (b"data: b\r\n", [b"data: b\n\n"]),
        (b"data: a\n\n\n", [b"data: a\n\n"]),
        (b"data: a\n\n  \n", [b"data: a\n\n"]),
        (b"", []),
    ],
    ids=["no-end", "one-newline", "crlf", "extra-newline", "whitespace", "empty"],
)
async def test_trailing_incomplete_event(body: bytes, expected: list[bytes]) -> None:
    assert await sse_from_chunks([body]) == expected


async def test_empty_stream_yields_nothing() -> None:
    assert await sse_from_chunks([]) == []


# --- through a real aiohttp response -------------------------------------------------------------


async def test_iter_sse_on_a_real_response(aiohttp_client: Any) -> None:
    pieces = split(CRLF_BODY, [5, 17, 40, 41, 90, 91, 92, 150])

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(0.001)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/sse", stream)
    client = await aiohttp_client(app)
    response = await client.get("/sse")
    assert response.content_type == "text/event-stream"
    assert [event async for event in iter_sse(response.content)] == EVENTS


# --- framing -------------------------------------------------------------------------------------


def test_sse_data() -> None:
    framed = sse_data({"id": "x", "choices": [], "text": "line1\nline2"})
    assert framed.startswith(b"data: ") and framed.endswith(b"\n\n")
    assert framed.count(b"\n") == 2  # JSON escapes the newline: one data line
    assert json.loads(framed[6:]) == {"id": "x", "choices": [], "text": "line1\nline2"}


def test_sse_event() -> None:
    framed = sse_event("response.completed", {"type": "response.completed"})
    assert framed == b'event: response.completed\ndata: {"type":"response.completed"}\n\n'


async def test_framing_round_trips_through_iter_sse() -> None:
    body = sse_data({"a": 1}) + sse_event("e", [1, "é"]) + DONE
    assert await sse_from_chunks(split(body, [3, 11, 30])) == [
        b'data: {"a":1}\n\n',
        b'event: e\ndata: [1,"\xc3\xa9"]\n\n',
        b"data: [DONE]\n\n",
    ]


def test_done_and_headers() -> None:
    assert DONE == b"data: [DONE]\n\n"
    assert SSE_HEADERS["Content-Type"].startswith("text/event-stream")
    assert SSE_HEADERS["Cache-Control"] == "no-cache"
    assert SSE_HEADERS["X-Accel-Buffering"] == "no"


async def test_blocks_pass_on_what_each_chunk_completes() -> None:
    """One write per network read: whole events together, a partial one held until complete."""
    chunks = [b"data: 1\n\ndata: 2\n\ndata: 3", b"a\n\n", b"data: 4\n", b"\n"]
    blocks = await sse_from_chunks(chunks, iter_sse_blocks)
    assert blocks == [b"data: 1\n\ndata: 2\n\n", b"data: 3a\n\n", b"data: 4\n\n"]
    assert [e for b in blocks for e in split_events(b)] == await sse_from_chunks(chunks)


@given(st.lists(st.integers(0, len(BODY)), max_size=8))
@PROPERTY
async def test_blocks_join_to_the_same_events_under_any_chunking(cuts: list[int]) -> None:
    blocks = await sse_from_chunks(split(BODY, cuts), iter_sse_blocks)
    assert all(block.endswith(b"\n\n") for block in blocks)
    assert [e for b in blocks for e in split_events(b)] == EVENTS


async def test_an_event_that_never_ends_is_refused() -> None:
    """A hostile upstream that never sends a blank line cannot grow the buffer without bound."""
    chunks = [b"data: " + b"x" * 1000] + [b"y" * 1000] * 20

    async def capped(reader: StreamReader) -> AsyncIterator[bytes]:
        async for block in iter_sse_blocks(reader, max_event=8000):
            yield block

    with pytest.raises(EventTooLarge):
        await sse_from_chunks(chunks, capped)


class _CountingBuffer(bytearray):
    """The splitter's buffer, counting the bytes its searches and rewrites go over."""

    scanned = 0

    def rfind(self, sub: Any, start: Any = None, *rest: Any) -> int:
        _CountingBuffer.scanned += len(self) - (start or 0)
        return super().rfind(sub, *(() if start is None else (start, *rest)))

    def find(self, sub: Any, start: Any = None, *rest: Any) -> int:
        _CountingBuffer.scanned += len(self) - (start or 0)
        return super().find(sub, *(() if start is None else (start, *rest)))

    def replace(self, *args: Any) -> bytearray:
        _CountingBuffer.scanned += len(self)
        return super().replace(*args)


@pytest.mark.parametrize("chunk", [b"\r", b"x\r\n", b"\r\n\r"], ids=repr)
async def test_splitting_work_grows_linearly(monkeypatch: pytest.MonkeyPatch, chunk: bytes) -> None:
    """Small chunks (``\\r`` above all) after a large unfinished event: each chunk costs work in
    proportion to itself, not to the event so far (16k ``\\r`` after 4 MiB once took 15 s)."""
    from aioproxy import streaming

    monkeypatch.setattr(streaming, "bytearray", _CountingBuffer, raising=False)
    start = b"data: " + b"a" * 256 * 1024
    chunks = [start] + [chunk] * 2000
    _CountingBuffer.scanned = 0
    events = await sse_from_chunks(chunks, iter_sse_blocks)
    fed = sum(map(len, chunks))
    assert len(events) == 1 and events[0].startswith(b"data: aaa")
    assert _CountingBuffer.scanned <= 4 * fed  # linear; quadratic was ~2000 times the event


async def test_bytes_that_complete_no_event_for_idle_seconds_stall() -> None:
    """Progress is counted in events: an upstream trickling bytes of an event that never ends
    is stopped once ``idle`` seconds pass without a complete one (the clock is injected)."""
    from aioproxy.streaming import StreamStalled

    now = [0.0]
    chunks = [b"data: 1\n\n"] + [b"x"] * 10
    reader = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    blocks = iter_sse_blocks(reader, idle=2.0, clock=lambda: now[0])
    reader.feed_data(chunks[0])
    assert await anext(blocks) == b"data: 1\n\n"
    seen = 0

    async def trickle() -> None:
        nonlocal seen
        for chunk in chunks[1:]:
            now[0] += 0.5  # one byte each half second: never silent, never an event
            seen += 1
            reader.feed_data(chunk)
            await asyncio.sleep(0)

    feeding = asyncio.create_task(trickle())
    with pytest.raises(StreamStalled):
        await anext(blocks)
    feeding.cancel()
    assert seen == 5  # the first byte at 0.5 s starts the clock; at 2.5 s it has run 2 s


async def test_events_keep_a_slow_stream_alive() -> None:
    """Events that keep completing, however slowly, are progress: no stall."""
    ticks = iter(range(1000))

    def clock() -> float:
        return next(ticks) * 1.5  # each read that leaves an event unfinished: 1.5 s later

    chunks = [piece for i in range(5) for piece in (b"data: ", b"%d" % i, b"\n\n")]
    events = await sse_from_chunks(chunks, lambda r: iter_sse_blocks(r, idle=2.0, clock=clock))
    assert events == [b"data: %d\n\n" % i for i in range(5)]


def _reader(*chunks: bytes, eof: bool = True) -> StreamReader:
    reader = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    for chunk in chunks:
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
    return reader


async def test_sse_blocks_end_for_good_giving_their_held_bytes_back() -> None:
    """The block iterator ends as an async generator would: read to its end (its cut last
    event yielded first), closed or failed, it yields nothing more, and the unfinished event's
    bytes it counted are given back once, when it ends."""
    budget = BufferBudget(1_000)
    blocks = iter_sse_blocks(_reader(b"data: 1\n\ndata: 2"), budget=budget)
    assert await anext(blocks) == b"data: 1\n\n"
    assert await anext(blocks) == b"data: 2\n\n"  # the cut event, ended
    assert budget.used == len(b"data: 2")  # held until the iterator ends
    with pytest.raises(StopAsyncIteration):
        await anext(blocks)
    assert budget.used == 0
    with pytest.raises(StopAsyncIteration):
        await anext(blocks)
    await blocks.aclose()
    assert budget.used == 0

    blocks = iter_sse_blocks(_reader(b"data: 1\n\ndata: 2", eof=False), budget=budget)
    assert await anext(blocks) == b"data: 1\n\n"
    await blocks.aclose()  # mid-stream: nothing held (the next event not read yet)
    with pytest.raises(StopAsyncIteration):
        await anext(blocks)
    assert budget.used == 0

    blocks = iter_sse_blocks(_reader(b"data: " + b"x" * 50), max_event=20, budget=budget)
    with pytest.raises(EventTooLarge):
        await anext(blocks)
    assert budget.used == 0
    with pytest.raises(StopAsyncIteration):
        await anext(blocks)


async def test_sse_blocks_closed_while_an_event_is_unfinished_give_its_bytes_back() -> None:
    budget = BufferBudget(1_000)
    reader = _reader(b"data: 1\n\ndata: 2", eof=False)
    blocks = iter_sse_blocks(reader, budget=budget)
    assert await anext(blocks) == b"data: 1\n\n"
    waiting = asyncio.ensure_future(anext(blocks))
    await asyncio.sleep(0)  # it took "data: 2" and waits for the rest
    assert budget.used == len(b"data: 2")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert budget.used == 0  # a cancelled read ends it, as it ended the generator
    with pytest.raises(StopAsyncIteration):
        await anext(blocks)


async def test_sse_blocks_dropped_unfinished_give_their_bytes_back() -> None:
    """A caller that breaks out and drops the iterator without closing it: the unfinished
    event's bytes go back when the iterator goes (as the generator's finaliser gave them)."""
    budget = BufferBudget(1_000)
    blocks = iter_sse_blocks(_reader(b"data: 1\n\ndata: 2"), budget=budget)
    assert await anext(blocks) == b"data: 1\n\n"
    assert await anext(blocks) == b"data: 2\n\n"  # the cut event: its bytes held till the end
    assert budget.used == len(b"data: 2")
    del blocks
    assert budget.used == 0
