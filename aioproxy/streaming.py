"""Server-sent events: split an upstream stream into events, and frame events for the client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from aiohttp import StreamReader

__all__ = [
    "DONE",
    "SSE_HEADERS",
    "iter_sse",
    "iter_sse_blocks",
    "split_events",
    "sse_data",
    "sse_event",
]

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


async def iter_sse_blocks(content: StreamReader) -> AsyncIterator[bytes]:
    """Yield the complete SSE events of a body as they arrive, several at once when they came so.

    Each chunk read from the network yields what it completes: every whole event (ending in a
    blank line) it holds, as one block, so that relaying costs one write per chunk, not per
    event, and nothing that arrived is held back. A partial event waits for the rest of it, so
    a client never gets half an event. ``\r\n`` line ends become ``\n``. A trailing event that
    never got its blank line (the upstream cut the stream) is yielded, terminated, at the end.
    """
    buffer = b""
    async for chunk in content.iter_any():
        buffer = buffer + chunk if buffer else chunk
        if b"\r" in buffer:  # not just in chunk: a \r\n may be split across two chunks
            buffer = buffer.replace(b"\r\n", b"\n")
        end = buffer.rfind(b"\n\n")
        if end < 0:
            continue
        if end + 2 == len(buffer):
            block, buffer = buffer, b""
        else:
            block, buffer = buffer[: end + 2], buffer[end + 2 :]
        yield block
    if buffer.strip():
        yield buffer.rstrip(b"\n") + b"\n\n"


def split_events(block: bytes) -> list[bytes]:
    """The events of a block from ``iter_sse_blocks``, each ending in a blank line."""
    return [event + b"\n\n" for event in block.split(b"\n\n") if event.strip(b"\n")]


async def iter_sse(content: StreamReader) -> AsyncIterator[bytes]:
    """Yield each complete event of an SSE body, one by one, as soon as it arrives."""
    async for block in iter_sse_blocks(content):
        for event in split_events(block):
            yield event


def json_as_sse(kind: str, body: bytes) -> bytes:
    """A whole JSON answer as the stream the client asked for, when the stream's headers had to
    go out (keep-alive comments) before the upstream answered with JSON after all."""
    try:
        answer = msgspec.json.decode(body)
    except msgspec.DecodeError:
        answer = None
    if not isinstance(answer, dict) or "error" in answer:
        return b"data: " + body + b"\n\n"
    if kind == "responses":
        return sse_event("response.completed", {"type": "response.completed", "response": answer,
                                                "sequence_number": 0})
    usage = answer.pop("usage", None)
    if kind == "chat_completions":
        answer["object"] = "chat.completion.chunk"
        for choice in answer.get("choices") or ():
            delta = choice.pop("message", None) or {}
            for index, tool_call in enumerate(delta.get("tool_calls") or ()):
                tool_call.setdefault("index", index)
            choice["delta"] = delta
    events = [sse_data(answer)]
    if usage is not None:
        events.append(sse_data({**answer, "choices": [], "usage": usage}))
    return b"".join(events) + DONE
