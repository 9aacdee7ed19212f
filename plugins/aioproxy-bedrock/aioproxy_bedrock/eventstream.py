"""``application/vnd.amazon.eventstream`` answers, decoded message by message as bytes arrive.

The binary framing (prelude, headers, payload, CRCs) is botocore's to decode: its
``EventStreamBuffer`` takes bytes in any cuts and yields each message once complete, checking
both checksums and bounding the header and payload lengths.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["FrameError", "FrameReader", "Message", "StreamStalled"]


class FrameError(Exception):
    """The bytes are not an event stream: a checksum, a length or a header is wrong."""


class StreamStalled(Exception):
    """Bytes kept coming for ``idle`` seconds without completing a message."""


class Message:
    """One decoded message: its headers (``:message-type``, ``:event-type``...) and payload."""

    __slots__ = ("headers", "payload")

    def __init__(self, headers: dict[str, Any], payload: bytes) -> None:
        self.headers = headers
        self.payload = payload

    @property
    def kind(self) -> str:
        """``event``, ``exception`` or ``error``."""
        return str(self.headers.get(":message-type", "event"))

    @property
    def event_type(self) -> str:
        return str(self.headers.get(":event-type", ""))


class FrameReader:
    """Feeds network chunks to botocore's decoder; gives the messages each chunk completes.

    ``idle``: the longest bytes may keep arriving without completing a message (a trickle; mere
    silence is the socket's read timeout's to catch). The clock is read only for chunks that
    complete nothing.
    """

    __slots__ = ("_buffer", "_clock", "_idle", "_parser_error", "_pending", "_stalled_since")

    def __init__(
        self, idle: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        from botocore.eventstream import EventStreamBuffer, ParserError  # lazily: see README

        self._buffer = EventStreamBuffer()
        self._parser_error: type[Exception] = ParserError
        self._idle = idle
        self._clock = clock
        self._stalled_since: float | None = None
        self._pending = 0  # bytes fed that no complete message has taken yet

    def pending(self) -> int:
        """The bytes kept of an unfinished message (what ``Upstream.chunks`` counts as held)."""
        return self._pending

    def feed(self, chunk: bytes) -> Iterator[Message]:
        """The messages ``chunk`` completes, in order (none while a message is partial); a
        broken message raises FrameError after those before it. Consume it whole."""
        self._buffer.add_data(chunk)
        self._pending += len(chunk)
        completed = False
        try:
            for message in self._buffer:
                completed = True
                self._pending -= message.prelude.total_length
                yield Message(message.headers, message.payload)
        except self._parser_error as exc:
            raise FrameError(str(exc)) from exc
        if completed:
            self._stalled_since = None
        elif self._idle is not None:
            now = self._clock()
            if self._stalled_since is None:
                self._stalled_since = now
            elif now - self._stalled_since >= self._idle:
                raise StreamStalled(f"no complete event-stream message in {self._idle:g} s")
