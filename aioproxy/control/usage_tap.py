"""Asking a stream for its usage without the client seeing the difference.

When a client streams chat or legacy completions without ``stream_options.include_usage``, the
spend plugin sets it upstream, so the cost is known, and the tap takes the usage-only chunk
(``"choices": []`` with ``usage``) out of what the client receives, keeping its usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from ..context import Call
from ..outcome import Outcome, Usage
from ..providers import StreamReply
from ..routes import Kind
from ..streaming import data_of

__all__ = ["UsageTap", "asks_usage"]

TAPPED_KINDS = frozenset({Kind.CHAT_COMPLETIONS, Kind.COMPLETIONS})


_NULL = msgspec.Raw(b"null")


class _Chunk(msgspec.Struct):
    # Left undecoded (a Raw cannot be Optional: absent reads as null): only compared.
    choices: msgspec.Raw = _NULL
    usage: msgspec.Raw = _NULL


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_EMPTY = frozenset({b"[]", b"null"})


def _usage_only(data: bytes) -> bool | None:
    """True: the event is the usage chunk (a usage, no choices); False: it has a usage and
    choices; None: it has no usage (or is not JSON)."""
    try:
        chunk = _decode_chunk(data)
    except msgspec.DecodeError:
        return None
    if bytes(chunk.usage) == b"null":
        return None
    return bytes(chunk.choices).replace(b" ", b"") in _EMPTY


def asks_usage(call: Call) -> bool:
    options = call.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class UsageTap:
    """Set on a call whose client did not ask for usage: asks for it, then hides its chunk."""

    __slots__ = ("usage_event",)

    def __init__(self, call: Call) -> None:
        options = call.get("stream_options")
        call.set(
            "stream_options",
            {**(options if isinstance(options, dict) else {}), "include_usage": True},
        )
        self.usage_event: bytes | None = None  # the data of the last event with a usage

    def __call__(self, reply: StreamReply) -> StreamReply:
        return StreamReply(self._events(reply), reply.aclose, reply.headers, reply.finished)

    async def _events(self, reply: StreamReply) -> AsyncIterator[bytes]:
        async for block in reply.events:
            # Only an event with a non-null usage can be the chunk: the rest pass untouched.
            # ``find``, not ``in`` (which tries its operand as an integer first, raising and
            # clearing a TypeError each time).
            if block.find(b'"usage":{') >= 0 or block.find(b'"usage": {') >= 0:
                block = self._strip(block)
                if not block:
                    continue
            yield block

    def _strip(self, block: bytes) -> bytes:
        """``block`` without its usage-only event; only the events with a usage are decoded
        (a whole answer in one block has it on its last chunks)."""
        for marker in (b'"usage":{', b'"usage": {'):
            at = block.find(marker)
            while at != -1:
                before = block.rfind(b"\n\n", 0, at)
                start = 0 if before == -1 else before + 2
                end = block.find(b"\n\n", at)
                end = len(block) if end == -1 else end + 2
                data = data_of(block[start:end])
                usage_only = _usage_only(data)
                if usage_only is not None:  # it has a usage: kept, so no one parses it again
                    self.usage_event = data
                if usage_only:
                    return block[:start] + block[end:]
                at = block.find(marker, end)
        return block

    def usage(self) -> Usage | None:
        """The usage of the last event that had one (taken out or not), if any."""
        if self.usage_event is None:
            return None
        outcome = Outcome(200, stream=False)
        outcome.body = self.usage_event
        return outcome.usage()
