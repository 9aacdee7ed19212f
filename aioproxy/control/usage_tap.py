"""Asking a stream for its usage without the client seeing the difference.

When a client streams chat or legacy completions without ``stream_options.include_usage``, the
spend plugin sets it upstream, so the cost is known, and the tap takes the usage-only chunk
(``"choices": []`` with ``usage``) out of what the client receives, keeping its usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from ..context import STREAM_FILTER, Call
from ..outcome import Usage, chunk_usage
from ..passthrough import PassedEvents
from ..providers import StreamReply
from ..routes import Kind
from ..streaming import data_of

__all__ = ["TAPPED_KINDS", "UsageTap", "asks_usage", "tap_unasked_usage"]

TAPPED_KINDS = frozenset({Kind.CHAT_COMPLETIONS, Kind.COMPLETIONS})


def asks_usage(call: Call) -> bool:
    options = call.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def tap_unasked_usage(call: Call) -> None:
    """Set the tap on a chat or completions stream whose client did not ask for its usage
    (once, whoever needs it: the spend plugin, the response cache). A ``stream_options`` that
    is not an object is left for the provider to refuse."""
    if call.kind in TAPPED_KINDS and STREAM_FILTER not in call.state:
        if "stream_options" not in call.fields:  # the usual stream: no options, none to decode
            call.state[STREAM_FILTER] = UsageTap(call, _NO_OPTIONS)
            return
        # Read once for both checks and the tap.
        options = call.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is not True:
            call.state[STREAM_FILTER] = UsageTap(call, options)


# How many events of a block, from its end, may hold the usage: OpenAI sends it in the last
# chunk before ``[DONE]``, and the core reads a stream's usage from its last few events too
# (``aioproxy.outcome``), so the rest of a block is never searched.
_TAIL_EVENTS = 3
# A usage object (not "usage":null, which every chunk may carry), as OpenAI writes it or spaced.
_MARKER, _SPACED = b'"usage":{', b'"usage": {'
_DONE = b"data: [DONE]"
_AFTER_DONE = b"\n\n" + _DONE + b"\n\n"  # a block's last event, [DONE], after another one
_DONE_SIZE = len(_DONE) + 2  # [DONE] and its blank line: where the event before it ends
_NO_OPTIONS: dict[str, object] = {}  # never changed: only read
# The options of a client that gave none, encoded once: Call.set copies a Raw's bytes, not a dict.
_ASK_USAGE = msgspec.Raw(b'{"include_usage":true}')
_UNREAD = object()


class UsageTap:
    """Set on a call whose client did not ask for usage: asks for it, then hides its chunk."""

    __slots__ = ("found", "usage_event")

    def __init__(self, call: Call, options: object = _UNREAD) -> None:
        """``options``: the call's ``stream_options``, decoded already (else read here)."""
        if options is _UNREAD:
            options = call.get("stream_options")
        if options is _NO_OPTIONS:  # none given (tap_unasked_usage's usual case): no copy
            call.set("stream_options", _ASK_USAGE)
        else:
            options = options if isinstance(options, dict) else {}
            call.set("stream_options", {**options, "include_usage": True})
        self.usage_event: bytes | None = None  # the data of the last event with a usage
        self.found: Usage | None = None  # and its usage, read

    def __call__(self, reply: StreamReply) -> StreamReply:
        events = reply.events  # the reply kept: its close, its headers
        if events.__class__ is PassedEvents and events.transform is None:
            events.transform = self.strip  # the core's pass-through strips its blocks itself
        else:
            reply.events = _Tapped(self, events)
        return reply

    def strip(self, block: bytes) -> bytes:
        """``block`` without its usage-only event. Only the last events of the block are
        looked at, from its end, and only one with a non-null usage is decoded."""
        end = len(block)
        if block.endswith(_AFTER_DONE):  # as the loop would skip it, found with no search
            end -= _DONE_SIZE
        elif block.find(_MARKER) < 0 and block.find(_SPACED) < 0:
            # Most blocks (a stream's events of tokens) hold no usage object at all: two
            # searches, not the walk over their last events (~20 bytecodes an event).
            return block
        looked = 0
        while end > 0 and looked < _TAIL_EVENTS:
            # The event ending at ``end`` (its blank line included) starts after the one before.
            # (``end`` is 2 or more: a block's end, [DONE]'s start or an event's, never 1.)
            start = block.rfind(b"\n\n", 0, end - 2) + 2
            if start == 1:  # the block's first event
                start = 0
            if block.find(_MARKER, start, end) < 0 and block.find(_SPACED, start, end) < 0:
                # [DONE] holds no usage and is not counted: looked at only when this one is
                # not the usage (one call less a usual stream, whose usage is found at once).
                if not block.startswith(_DONE, start):
                    looked += 1
                end = start
                continue
            looked += 1
            if block.startswith(b"data: {", start) and block.find(b"\n", start) == end - 2:
                # The usual chunk, one data line: what data_of reads of it, with no copy
                # of the event and no call first (~25 bytecodes a stream).
                data = block[start + 6 : end - 2]
            else:
                data = data_of(block[start:end])
            found = chunk_usage(data)
            if found is not None:  # the last usage: kept, so no one parses it again
                self.usage_event = data
                usage_only, self.found = found
                if not usage_only:
                    return block
                # One copy of what the client gets, not one of each part and another.
                return b"".join((memoryview(block)[:start], block[end:]))
            end = start
        return block

    def usage(self) -> Usage | None:
        """The usage of the last event that had one (taken out or not), if any."""
        return self.found


class _Tapped:
    """A stream's events through the tap: an iterator, not an async generator (which costs the
    event loop's hooks, a finalizer and an ``aclose`` of its own)."""

    __slots__ = ("events", "tap")

    def __init__(self, tap: UsageTap, events: AsyncIterator[bytes]) -> None:
        self.tap = tap
        self.events = events

    def __aiter__(self) -> _Tapped:
        return self

    async def aclose(self) -> None:
        """Close the events it reads (``StreamReply.aclose`` calls it)."""
        aclose = getattr(self.events, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __anext__(self) -> bytes:
        while True:
            block = self.tap.strip(await anext(self.events))
            if block:
                return block
