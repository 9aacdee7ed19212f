"""Every aiohttp-internal import of aioproxy, in one place.

These names are not aiohttp's documented API: they may move between minor releases, which is
why pyproject pins ``aiohttp>=3.14,<3.15``. Upgrading aiohttp means checking this module (and
the tests of h1client.py and server.py) first. Elsewhere, import only ``aiohttp`` and
``aiohttp.web`` (plus the documented ``aiohttp.typedefs`` and ``aiohttp.test_utils``).
"""

import operator
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import StreamReader, http_writer, web
from aiohttp.base_protocol import BaseProtocol  # h1client: the connection's flow control
from aiohttp.http import HttpResponseParser, RawResponseMessage  # h1client: the C parser
from aiohttp.http_exceptions import BadHttpMessage  # the body read: a malformed body
from aiohttp.streams import EMPTY_PAYLOAD  # h1client: an answer without a body
from aiohttp.web_protocol import ERROR as UNPARSED_MESSAGE  # server: a request not parsed
from aiohttp.web_protocol import RequestHandler, RequestPayloadError  # server, the body read
from aiohttp.web_request import BaseRequest  # server: malformed-request answers

__all__ = [
    "EMPTY_PAYLOAD",
    "UNPARSED_MESSAGE",
    "BadHttpMessage",
    "BaseProtocol",
    "BaseRequest",
    "HttpResponseParser",
    "RawResponseMessage",
    "RequestHandler",
    "RequestPayloadError",
    "arrived_chunk",
    "peername",
    "read_any",
    "read_arrived_body",
    "request_state",
    "take_arrived",
    "write_large_bodies_unjoined",
]


def write_large_bodies_unjoined() -> None:
    """Let aiohttp hand an answer's headers and a body of 2 KiB or more to uvloop's transport
    as two buffers, which it writes as they are (callgrind: memcpy ~9 k instructions less for a
    9 KB stream come whole). aiohttp joins them into one copy first on every Python before
    3.12.9, for 3.12's broken selector writelines; 3.11's asyncio transport would join them
    itself (no gain) and a TLS one make two records of them. Process-wide:
    ``cli.new_event_loop`` (run.py's serving) calls it, on Python 3.11, when its loop is
    uvloop's (an embedding app keeps aiohttp's)."""
    if sys.version_info < (3, 12):
        http_writer.SKIP_WRITELINES = False


# The dict behind ``request[key]``, to read with its ``get`` in C: the request's own ``get``
# and ``in`` are Mapping's, in Python, and raise and catch a KeyError for a key not there. An
# attrgetter: read in C (a Python function would cost each call ~6 bytecodes).
request_state: Callable[[BaseRequest], dict[Any, Any]] = operator.attrgetter("_state")


# What aiohttp read of a request's peer (its connection's peer address, or what
# ``clone(remote=...)`` set), which ``request.remote`` turns into text on every read: the same
# object for each request of a connection, so a key to remember that text by (read in C).
peername: Any = operator.attrgetter("_transport_peername")


def read_arrived_body(request: BaseRequest) -> bytes:
    """``await request.read()`` for a body that has all arrived (its payload at EOF), without
    the coroutine and its loop: one read of the buffer, as ``read`` would find it (~100
    bytecodes a request less). Kept where ``read`` keeps it, so a later ``read`` (a plugin's)
    returns it; over ``client_max_size``, 413 as ``read`` refuses it."""
    if request._read_bytes is None:
        body = take_arrived(request.content)  # raises the payload's error, as readany does
        limit = request.client_max_size
        if limit and len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(limit)
        request._read_bytes = body
    return request._read_bytes


def take_arrived(content: StreamReader) -> bytes:
    """``content.read_nowait()`` for a payload that holds something or is at EOF: a lone chunk
    taken as it is (measured: ~100 bytecodes a read less at EOF). read_nowait's chunk reader
    would then call the protocol's ``resume_reading``, which at EOF has nothing left to do:
    ``feed_eof`` resumed reading already, and the parser is done with this body. The reader is
    left as read_nowait leaves it (at EOF, empty: a later read returns b""). read_nowait's
    timeout check is left out: the payloads read at EOF come without a timer (aiohttp's server,
    h1client), and ``read_any`` checks it itself."""
    try:
        exception = content._exception
    except AttributeError:  # EMPTY_PAYLOAD (no body) has none of a reader's state
        return content.read_nowait()
    if exception is not None:
        raise exception
    return _take(content)


def _take(content: StreamReader) -> bytes:
    """``take_arrived``'s read, the reader's error checked by the caller: ``read_any`` checks it
    before it waits, not after, as readany does (data that came with an error is read first,
    the error raised by the next read: a stream's last events before a broken frame pass on)."""
    buffer = content._buffer
    if content._buffer_offset or (len(buffer) != 1 and not content._eof):
        return content._read_nowait(-1)  # one chunk read in part, or several mid-body
    # One chunk as it is; at the end, all of them joined: no resume_reading either (h1client's
    # connection may be back in its pool by then, paused for another request's answer).
    data = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
    buffer.clear()
    content._size = 0
    content._cursor += len(data)
    splits = content._http_chunk_splits  # a chunked body's: those read past are dropped
    while splits and splits[0] < content._cursor:
        splits.popleft()
    # The chunk reader's: a protocol paused for a full buffer reads on (at EOF, feed_eof did).
    if (
        not content._eof
        and content._low_water > 0
        and (splits is None or len(splits) < content._low_water_chunks)
    ):
        content._protocol.resume_reading()
    return data


def arrived_chunk(content: StreamReader) -> bytes | None:
    """What ``read_any`` returns at once when a chunk has arrived and no error has, read with
    no coroutine (a burst's body is there when it is first read); None: await ``read_any``
    (nothing yet, an error, the end, or a reader of another kind)."""
    if getattr(content, "_exception", content) is None and content._buffer:
        content._timer.assert_timeout()
        return _take(content)
    return None


async def read_any(content: StreamReader) -> bytes:
    """``await content.readany()``: what has arrived, once something has (b"" at the end), a
    lone chunk taken as it is (measured: ~20 bytecodes a read less mid-stream, ~65 at EOF)."""
    try:
        exception = content._exception
    except AttributeError:  # EMPTY_PAYLOAD, or a reader of another kind: its own readany
        return await content.readany()
    if exception is not None:
        raise exception
    while not content._buffer and not content._eof:
        await content._wait("readany")  # raises the error the reader gets meanwhile
    content._timer.assert_timeout()
    return _take(content)
