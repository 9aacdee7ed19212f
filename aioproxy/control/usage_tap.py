"""Asking a stream for its usage without the client seeing the difference.

When a client streams chat or legacy completions without ``stream_options.include_usage``, the
spend plugin sets it upstream, so the cost is known, and the tap takes the usage-only chunk
(``"choices": []`` with ``usage``) out of what the client receives, keeping its usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from ..context import Call
from ..outcome import Outcome, Usage
from ..providers import StreamReply
from ..routes import Kind
from ..streaming import data_of, split_events

__all__ = ["UsageTap", "asks_usage"]

TAPPED_KINDS = frozenset({Kind.CHAT_COMPLETIONS, Kind.COMPLETIONS})


class _Chunk(msgspec.Struct):
    choices: list[Any] | None = None
    usage: dict[str, Any] | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def asks_usage(call: Call) -> bool:
    options = call.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class UsageTap:
    """Set on a call whose client did not ask for usage: asks for it, then hides its chunk."""

    __slots__ = ("usage_event",)

    def __init__(self, call: Call) -> None:
        options = call.get("stream_options")
        call.set("stream_options", {**(options if isinstance(options, dict) else {}),
                                    "include_usage": True})
        self.usage_event: bytes | None = None  # the data of the chunk taken out

    def __call__(self, reply: StreamReply) -> StreamReply:
        return StreamReply(self._events(reply), reply.aclose, reply.headers, reply.finished)

    async def _events(self, reply: StreamReply) -> AsyncIterator[bytes]:
        async for block in reply.events:
            # Only a block with a non-null usage can hold the chunk: the others pass untouched.
            if b'"usage":{' in block or b'"usage": {' in block:
                block = self._strip(block)
                if not block:
                    continue
            yield block

    def _strip(self, block: bytes) -> bytes:
        kept = []
        for event in split_events(block):
            data = data_of(event)
            if data and data != b"[DONE]":
                try:
                    chunk = _decode_chunk(data)
                except msgspec.DecodeError:
                    chunk = None
                if chunk is not None and chunk.usage is not None and not chunk.choices:
                    self.usage_event = data
                    continue
            kept.append(event)
        return b"".join(kept)

    def usage(self) -> Usage | None:
        """The usage of the chunk taken out, if one was."""
        if self.usage_event is None:
            return None
        outcome = Outcome(200, stream=False)
        outcome.body = self.usage_event
        return outcome.usage()
