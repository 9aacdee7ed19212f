"""_aiohttp.read_arrived_body: a body that came whole is read as ``request.read()`` reads it;
take_arrived: a payload at EOF is read as ``read_nowait`` reads it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import StreamReader, web
from aiohttp.test_utils import TestClient

from aioproxy._aiohttp import (
    EMPTY_PAYLOAD,
    BaseProtocol,
    arrived_chunk,
    read_any,
    read_arrived_body,
    take_arrived,
)
from aioproxy.config import Timeouts
from aioproxy.h1client import H1Pool
from aioproxy.streaming import iter_sse_blocks

Client = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


def _app(client_max_size: int = 1024**2) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        assert request.content.is_eof()  # a small body comes with the headers
        body = read_arrived_body(request)
        again = await request.read()  # a later read (a plugin's) gets the same bytes
        return web.json_response({"body": body.decode(), "same": again == body})

    app = web.Application(client_max_size=client_max_size)
    app.router.add_post("/", echo)
    return app


async def test_the_body_and_a_later_read_are_the_bytes_sent(aiohttp_client: Client) -> None:
    client = await aiohttp_client(_app())
    response = await client.post("/", data=b'{"model": "m"}')
    assert await response.json() == {"body": '{"model": "m"}', "same": True}


async def test_a_body_over_client_max_size_is_413(aiohttp_client: Client) -> None:
    client = await aiohttp_client(_app(client_max_size=8))
    response = await client.post("/", data=b"x" * 9)
    assert response.status == 413
    assert "Maximum request body size 8 exceeded." in await response.text()
    response = await client.post("/", data=b"x" * 8)  # at the limit: read
    assert (await response.json())["body"] == "x" * 8


async def test_a_request_without_a_body_reads_as_empty(aiohttp_client: Client) -> None:
    client = await aiohttp_client(_app())
    response = await client.post("/")  # no body: aiohttp's EMPTY_PAYLOAD
    assert await response.json() == {"body": "", "same": True}


# take_arrived, on aiohttp's own StreamReader: it leaves the reader as read_nowait leaves it.


def _reader_at_eof(chunks: list[bytes], chunked: bool = False) -> StreamReader:
    reader = StreamReader(BaseProtocol(asyncio.get_running_loop()), 2**16)
    if chunked:
        reader.begin_http_chunk_receiving()
    for chunk in chunks:
        reader.feed_data(chunk)
        if chunked:
            reader.end_http_chunk_receiving()
    reader.feed_eof()
    return reader


def _state(reader: StreamReader) -> tuple[object, ...]:
    splits = reader._http_chunk_splits
    return (
        reader._size,
        reader._cursor,
        len(reader._buffer),
        reader.at_eof(),
        splits and [*splits],
    )


@pytest.mark.parametrize(
    ("chunks", "chunked"),
    [
        ([b'{"model": "m"}'], False),  # the usual body: one chunk, taken as it is
        ([b'{"a": ', b"1}"], False),  # several: read_nowait's way
        ([b"data: 1\n\n", b"data: 2\n\n"], True),  # a chunked answer's splits
        ([b"data: 1\n\n"], True),
        ([], False),
    ],
)
async def test_take_arrived_reads_as_read_nowait(chunks: list[bytes], chunked: bool) -> None:
    taken, read = _reader_at_eof(chunks, chunked), _reader_at_eof(chunks, chunked)
    assert take_arrived(taken) == read.read_nowait() == b"".join(chunks)
    assert _state(taken) == _state(read)
    assert await taken.read() == b""  # a later read finds the end, as after read_nowait
    assert await taken.readchunk() == await read.readchunk()


async def test_take_arrived_after_an_earlier_read_drops_the_splits_read_past() -> None:
    def reader_read_once() -> StreamReader:
        reader = StreamReader(BaseProtocol(asyncio.get_running_loop()), 2**16)
        reader.begin_http_chunk_receiving()
        reader.feed_data(b"data: 1\n\n")
        reader.end_http_chunk_receiving()
        assert reader.read_nowait() == b"data: 1\n\n"  # its split stays until read past
        reader.feed_data(b"data: 2\n\n")
        reader.end_http_chunk_receiving()
        reader.feed_eof()
        return reader

    taken, read = reader_read_once(), reader_read_once()
    assert take_arrived(taken) == read.read_nowait() == b"data: 2\n\n"
    assert _state(taken) == _state(read) == (0, 18, 0, True, [18])


async def test_take_arrived_raises_the_readers_error() -> None:
    reader = _reader_at_eof([b"{}"])
    reader.set_exception(ValueError("broken body"))
    with pytest.raises(ValueError, match="broken body"):
        take_arrived(reader)


def test_take_arrived_of_no_body_is_empty() -> None:
    assert take_arrived(EMPTY_PAYLOAD) == b""


# read_any: aiohttp's readany, a lone chunk taken whole.


class _Resumes(BaseProtocol):
    """aiohttp's protocol, counting the reader's calls to resume reading."""

    def __init__(self) -> None:
        super().__init__(asyncio.get_running_loop())
        self.resumed = 0

    def resume_reading(self, resume_parser: bool = True) -> None:
        self.resumed += 1


def _reader(chunks: list[bytes], eof: bool = False) -> tuple[StreamReader, _Resumes]:
    protocol = _Resumes()
    protocol.transport = asyncio.Transport()  # connected: a read may wait
    reader = StreamReader(protocol, 2**16)
    for chunk in chunks:
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
        protocol.resumed = 0  # feed_eof's own
    return reader, protocol


@pytest.mark.parametrize(
    ("chunks", "eof"),
    [
        ([b"data: 1\n\n"], False),  # the usual read: one chunk, its reader resumed
        ([b"data: 1\n\n", b"data: 2\n\n"], False),
        ([b"data: 1\n\n"], True),  # at the end: nothing to resume
        ([b"data: 1\n\n", b"data: 2\n\n"], True),  # several at the end: joined, no resume
        ([], True),  # the end itself: b""
    ],
)
async def test_read_any_reads_as_readany(chunks: list[bytes], eof: bool) -> None:
    (ours, ours_protocol), (theirs, theirs_protocol) = _reader(chunks, eof), _reader(chunks, eof)
    assert await read_any(ours) == await theirs.readany() == b"".join(chunks)
    assert _state(ours) == _state(theirs)
    # At the end, feed_eof resumed reading already: readany's second resume is left out.
    assert ours_protocol.resumed == (0 if eof else theirs_protocol.resumed)


async def test_read_any_waits_for_data_then_its_end() -> None:
    reader, _ = _reader([])
    reading = asyncio.ensure_future(read_any(reader))
    await asyncio.sleep(0)
    assert not reading.done()
    reader.feed_data(b"data: 1\n\n")
    assert await reading == b"data: 1\n\n"
    reader.feed_eof()
    assert await read_any(reader) == b""


async def test_read_any_raises_the_error_that_came_while_waiting() -> None:
    reader, _ = _reader([])
    reading = asyncio.ensure_future(read_any(reader))
    await asyncio.sleep(0)
    reader.set_exception(ValueError("cut"))
    with pytest.raises(ValueError, match="cut"):
        await reading
    with pytest.raises(ValueError, match="cut"):  # and on every read after
        await read_any(reader)


async def test_read_any_of_no_body_is_empty() -> None:
    assert await read_any(EMPTY_PAYLOAD) == b""


async def test_arrived_chunk_is_what_read_any_returns_at_once_else_none() -> None:
    """Read with no coroutine only when read_any would neither wait nor raise: a chunk there,
    no error; otherwise None (read_any is awaited, and waits, raises or ends)."""
    reader, _ = _reader([b"data: 1\n\n"])
    assert arrived_chunk(reader) == b"data: 1\n\n"
    assert arrived_chunk(reader) is None  # nothing more yet: read_any would wait
    reader.feed_data(b"data: 2\n\n")
    reader.set_exception(ValueError("cut"))
    assert arrived_chunk(reader) is None  # read_any raises it first
    with pytest.raises(ValueError, match="cut"):
        await read_any(reader)
    ended, _ = _reader([], eof=True)
    assert arrived_chunk(ended) is None and await read_any(ended) == b""
    assert arrived_chunk(EMPTY_PAYLOAD) is None


def _connected_reader() -> StreamReader:
    protocol = BaseProtocol(asyncio.get_running_loop())
    protocol.transport = asyncio.Transport()  # connected: a read may wait
    return StreamReader(protocol, 2**16)


async def _until_waiting(reader: StreamReader) -> None:
    """Let the reading task run until it waits on the reader (an event, not a duration)."""
    while reader._waiter is None:
        await asyncio.sleep(0)


@pytest.mark.parametrize("read", ["readany", "read_any"])
async def test_a_waiting_read_gets_the_data_that_came_with_an_error_first(read: str) -> None:
    """Data fed and an error set in one go while a read waits (the parser's last good bytes,
    then its framing error, in one data_received): the data first, the error on the next read,
    as aiohttp's readany does."""
    reader = _connected_reader()

    def read_once() -> Awaitable[bytes]:
        return reader.readany() if read == "readany" else read_any(reader)

    reading = asyncio.ensure_future(read_once())
    await _until_waiting(reader)
    reader.feed_data(b'data: {"n":1}\n\n')
    reader.set_exception(aiohttp.ClientPayloadError("invalid answer body"))
    assert await reading == b'data: {"n":1}\n\n'
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_once()


async def test_a_streams_last_events_before_broken_framing_pass_on() -> None:
    """On the lean client, the upstream's last good chunk and a broken chunk header in one
    write while the relay waits: the event is passed on, then the failure."""
    sent_head, go_on, hung_up = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            await writer.drain()
            sent_head.set()
            await go_on.wait()
            writer.write(b'f\r\ndata: {"n":1}\n\n\r\nzz\r\nnonsense\r\n')  # one write: one read
            await writer.drain()
            await reader.read()  # until the client hangs up
        finally:
            writer.close()
            hung_up.set()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = H1Pool(asyncio.get_running_loop())
    try:
        response = await pool.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            b"{}",
            {"content-type": "application/json"},
            Timeouts(total=20, connect=5, read=10),
        )
        await sent_head.wait()
        received: list[bytes] = []

        async def relay() -> None:
            async for block in iter_sse_blocks(response.content):
                received.append(block)

        relaying = asyncio.ensure_future(relay())
        await _until_waiting(response.content)  # the relay waits for the next chunk
        go_on.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await relaying
        assert received == [b'data: {"n":1}\n\n']
    finally:
        await pool.close()
        await hung_up.wait()
        server.close()
        await server.wait_closed()
