"""Server-sent events: split an upstream stream into events, and frame events for the client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from aiohttp import StreamReader

__all__ = ["DONE", "SSE_HEADERS", "iter_sse", "sse_data", "sse_event"]

DONE = b"data: [DONE]\n\n"

# What a streamed answer is sent with: no caching, no proxy buffering (nginx honours
# X-Accel-Buffering), no compression (set by not enabling it), chunked.
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

_encode = msgspec.json.Encoder().encode


def sse_data(obj: object) -> bytes:
    """One ``data:`` event holding ``obj`` as JSON."""
    return b"data: " + _encode(obj) + b"\n\n"


def sse_event(event: str, obj: object) -> bytes:
    """One event with an ``event:`` name line, as the Responses API sends them."""
    return b"event: " + event.encode() + b"\ndata: " + _encode(obj) + b"\n\n"


async def iter_sse(content: StreamReader) -> AsyncIterator[bytes]:
    """Yield each complete event of an SSE body (ending in a blank line) as soon as it arrives.

    ``\\r\\n`` line ends are normalised to ``\\n``. A trailing event that never got its blank line
    (the upstream cut the stream) is yielded as it is, terminated, so nothing received is lost.
    """
    buffer = b""
    async for chunk in content.iter_any():
        buffer = buffer + chunk if buffer else chunk
        if b"\r" in buffer:  # not just in chunk: a \r\n may be split across two chunks
            buffer = buffer.replace(b"\r\n", b"\n")
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            yield buffer[start : end + 2]
            start = end + 2
        buffer = buffer[start:] if start else buffer
    if buffer.strip():
        yield buffer.rstrip(b"\n") + b"\n\n"
