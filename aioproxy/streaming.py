"""Server-sent events: split an upstream stream into events, and frame events for the client."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable

import msgspec
from aiohttp import StreamReader

from ._aiohttp import arrived_chunk, read_any
from .budget import BufferBudget
from .replies import ClosedAtOnce, StreamReply

__all__ = [
    "DONE",
    "MAX_EVENT",
    "SSE_HEADERS",
    "EventTooLarge",
    "SSEBlocks",
    "StreamStalled",
    "data_of",
    "first_event",
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


class EventTooLarge(ValueError):
    """An SSE event grew past MAX_EVENT without ending: a broken or hostile upstream."""


MAX_EVENT = 16 * 1024 * 1024


class StreamStalled(TimeoutError):
    """Bytes kept coming, but no event was completed for ``idle`` seconds (a trickling upstream)."""


def iter_sse_blocks(
    content: StreamReader,
    max_event: int = MAX_EVENT,
    idle: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    budget: BufferBudget | None = None,
    end: bytes = b"\n\n",
) -> SSEBlocks:
    """Yield the complete SSE events of a body as they arrive, several at once when they came so.
    (``end=b"\n"``: complete lines, e.g. of NDJSON, the same way.)

    Each chunk read from the network yields what it completes: every whole event (ending in a
    blank line) it holds, as one block, so that relaying costs one write per chunk, not per
    event, and nothing that arrived is held back. A partial event waits for the rest of it, so
    a client never gets half an event (one over ``max_event`` bytes raises EventTooLarge).
    ``\r\n`` line ends become ``\n``. A trailing event that never got its blank line (the
    upstream cut the stream) is yielded, terminated, at the end.

    Progress is counted in events, not bytes: bytes that complete no event for ``idle`` seconds
    raise StreamStalled. (Silence is the socket's read timeout's to catch.) The clock is read
    only for reads that leave an event unfinished, never on the usual path.

    The unfinished event's bytes are counted against ``budget`` (BufferFull past it) while it
    is held, and given back as events complete and when the iterator ends (closed, failed or
    read to its end).
    """
    return SSEBlocks(content, max_event, idle, clock, budget, end)


class SSEBlocks(ClosedAtOnce):
    """``iter_sse_blocks``' iterator. A class, not an async generator: a stream pays neither the
    event loop's async-generator hooks (a WeakSet entry made, then removed: ~55 bytecodes a
    stream) nor a generator's ``aclose``. It ends as the generator did: for good, its held bytes
    given back, once it fails, is read to its end or is closed."""

    __slots__ = (
        "_budget",
        "_clock",
        "_content",
        "_end",
        "_held",
        "_idle",
        "_max_event",
        "_pending",
        "_stalled_since",
    )

    def __init__(
        self,
        content: StreamReader,
        max_event: int,
        idle: float | None,
        clock: Callable[[], float],
        budget: BufferBudget | None,
        end: bytes,
    ) -> None:
        # The body; None once the iterator has ended. Read with ``read_any``, aiohttp's
        # ``readany`` minus its chunk reader (~20 bytecodes a read, ~65 at the end), not
        # ``iter_any()``'s iterator around it (~16 more); with no coroutine (``arrived_chunk``)
        # when a chunk is there already.
        self._content: StreamReader | None = content
        self._max_event = max_event
        self._idle = idle
        self._clock = clock
        self._budget = budget
        self._end = end
        self._pending = bytearray()  # the unfinished event, its \r\n made \n (bar a last \r)
        self._stalled_since: float | None = None  # when bytes of it were first seen
        self._held = 0  # bytes of pending counted against the budget

    def __aiter__(self) -> SSEBlocks:
        return self

    async def __anext__(self) -> bytes:
        content = self._content
        if content is None:
            raise StopAsyncIteration
        try:
            while True:
                chunk = arrived_chunk(content)
                if chunk is None:
                    chunk = await read_any(content)
                if not self._pending and chunk.endswith(self._end) and chunk.find(b"\r") < 0:
                    return chunk  # the usual case: whole events, nothing to copy or hold
                if block := self._completed(chunk):
                    return block
        except BaseException:  # StopAsyncIteration too: read to its end
            self.close()
            raise

    def _completed(self, chunk: bytes) -> bytes:
        """The events ``chunk`` completes with the bytes held before it, as one block; b""
        while the event is unfinished. At the end (``chunk`` empty): the held event, cut short,
        ended; else StopAsyncIteration. (The usual chunk, whole events with nothing held, is
        its caller's: it never comes here.)"""
        pending, end, budget = self._pending, self._end, self._budget
        if not chunk:
            if pending.strip():  # the upstream cut its last event short: it goes out ended
                block = bytes(pending.rstrip(b"\n")) + end
                pending.clear()  # still held (counted) until the iterator ends, as before
                return block
            raise StopAsyncIteration
        if chunk.find(b"\r") >= 0 or pending.endswith(b"\r"):
            # Only the new bytes are rewritten: pending is normalized already.
            if pending.endswith(b"\r") and chunk.startswith(b"\n"):  # \r\n across reads
                del pending[-1]
            chunk = chunk.replace(b"\r\n", b"\n")
        searched = max(0, len(pending) - 1)  # what is known to hold no event end
        pending += chunk
        if budget is not None:
            budget.take(len(pending) - self._held)
            self._held = len(pending)
        last = pending.rfind(end, searched)
        if last < 0:
            if len(pending) > self._max_event:
                raise EventTooLarge(f"an event grew past {self._max_event} bytes without ending")
            if self._idle is not None:
                now = self._clock()
                if self._stalled_since is None:
                    self._stalled_since = now
                elif now - self._stalled_since >= self._idle:
                    raise StreamStalled(f"no complete event in {self._idle:g} s")
            return b""
        block = bytes(pending[: last + len(end)])
        del pending[: last + len(end)]
        self._stalled_since = None
        if budget is not None:
            budget.give(self._held - len(pending))
            self._held = len(pending)
        return block

    async def aclose(self) -> None:
        """End it now: the bytes it holds are given back (nothing more is read)."""
        self.close()

    def close(self) -> None:
        """``aclose``, for a caller that need not await it (no coroutine made)."""
        if self._content is not None:
            self._content = None
            if self._held:  # bytes of an unfinished event (most streams end holding none)
                if self._budget is not None:
                    self._budget.give(self._held)
                self._held = 0

    def __del__(self) -> None:
        # Dropped unfinished (a caller that broke out without closing it): its bytes go back
        # to the budget, as the async generator it replaced gave them back when finalised.
        if self._content is not None:  # checked here: most were ended already, with no call
            self.close()


def split_events(block: bytes) -> list[bytes]:
    """The events of a block from ``iter_sse_blocks``, each ending in a blank line."""
    if (
        block.count(b"\n\n") == 1
        and block.endswith(b"\n\n")
        and not block.endswith(b"\n\n\n")
        and block[:1] != b"\n"
    ):
        return [block]  # the usual case: one event, nothing to copy
    return [event + b"\n\n" for event in block.split(b"\n\n") if event.strip(b"\n")]


def data_of(event: bytes) -> bytes:
    """The joined ``data:`` lines of one SSE event (comments and ``event:`` lines dropped)."""
    if event.startswith(b"data:"):  # the usual event, one data line: no split, no join
        end = event.find(b"\n")
        if end < 0:
            return event[5:].lstrip()
        if event.count(b"\n", end) == len(event) - end:  # nothing but newlines after it
            return event[5:end].lstrip()
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


async def iter_sse(
    content: StreamReader, idle: float | None = None, budget: BufferBudget | None = None
) -> AsyncGenerator[bytes, None]:
    """Yield each complete event of an SSE body, one by one, as soon as it arrives (``idle``
    and ``budget``: as for ``iter_sse_blocks``).

    Closed early (``aclose``), it closes the generator it reads from then and there; left to
    the garbage collector, that would cost a task the event loop spawns to finalize it.
    """
    blocks = iter_sse_blocks(content, idle=idle, budget=budget)
    try:
        async for block in blocks:
            for event in split_events(block):
                yield event
    finally:
        await blocks.aclose()


async def first_event(reply: StreamReply) -> bytes | None:
    """Pull a stream's first event now, so that a failure before it keeps its own status.

    None for an empty stream. On a failure (cancellation too) the stream is closed and the
    failure raised as it is: mapping it is the caller's job.
    """
    try:
        return await anext(reply.events)
    except StopAsyncIteration:
        return None
    except BaseException:
        await reply.aclose()
        raise


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
        return sse_event(
            "response.completed",
            {"type": "response.completed", "response": answer, "sequence_number": 0},
        )
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
