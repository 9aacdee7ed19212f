"""The usage tap alone: which events it takes out of a stream, and which it leaves."""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioproxy.control.usage_tap import UsageTap
from aioproxy.providers import StreamReply


def event(**chunk: object) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


CONTENT = event(choices=[{"index": 0, "delta": {"content": "hi"}}], usage=None)
FINISH_WITH_USAGE = event(
    choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}],
    usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
)
USAGE_ONLY = event(
    choices=[], usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
)
DONE = b"data: [DONE]\n\n"


class _Call:
    def __init__(self) -> None:
        self.fields: dict[str, object] = {}

    def get(self, name: str, default: object = None) -> object:
        return self.fields.get(name, default)

    def set(self, name: str, value: object) -> None:
        self.fields[name] = value


async def relay(blocks: list[bytes]) -> tuple[list[bytes], UsageTap]:
    async def events() -> AsyncIterator[bytes]:
        for block in blocks:
            yield block

    call = _Call()
    tap = UsageTap(call)  # type: ignore[arg-type]
    assert call.fields["stream_options"] == {"include_usage": True}
    return [block async for block in tap(StreamReply(events())).events], tap


@pytest.mark.parametrize(
    "blocks",
    [
        [CONTENT, USAGE_ONLY, DONE],
        [CONTENT, USAGE_ONLY + DONE],
        [CONTENT + USAGE_ONLY + DONE],
        [CONTENT * 3 + USAGE_ONLY.replace(b'"usage": {', b'"usage":{') + DONE],
        [CONTENT * 3 + USAGE_ONLY + DONE + DONE + DONE],  # [DONE]s are not counted as looked at
    ],
)
async def test_the_usage_only_chunk_goes(blocks: list[bytes]) -> None:
    out, tap = await relay(blocks)
    assert b"".join(out) == b"".join(blocks).replace(USAGE_ONLY, b"").replace(
        USAGE_ONLY.replace(b'"usage": {', b'"usage":{'), b""
    )
    usage = tap.usage()
    assert usage is not None and usage.total_tokens == 7


async def test_a_chunk_with_choices_and_usage_stays() -> None:
    blocks = [CONTENT * 50 + FINISH_WITH_USAGE + DONE]
    out, tap = await relay(blocks)
    assert out == blocks
    usage = tap.usage()  # read on the way, so nothing parses the stream's end again
    assert usage is not None and usage.total_tokens == 2


async def test_only_a_blocks_last_events_are_searched() -> None:
    """The usage chunk is a stream's last before [DONE] (where the core reads usage too), so
    a block's earlier events are passed on unread: a usage-only chunk followed by three more
    events is not the stream's usage chunk, and stays."""
    blocks = [CONTENT + USAGE_ONLY + CONTENT * 3 + DONE]
    out, tap = await relay(blocks)
    assert out == blocks and tap.usage() is None
    out, tap = await relay([CONTENT * 40 + USAGE_ONLY + CONTENT * 2 + DONE])
    assert b"".join(out) == CONTENT * 42 + DONE and tap.usage() is not None


async def test_the_tapped_stream_is_no_async_generator() -> None:
    """An async generator costs the event loop's first-iteration hook, a finalizer and an
    aclose of its own per stream; the tap's iterator is a plain object."""

    async def events() -> AsyncIterator[bytes]:
        yield CONTENT + USAGE_ONLY + DONE

    reply = UsageTap(_Call())(StreamReply(events()))  # type: ignore[arg-type]
    assert not inspect.isasyncgen(reply.events)
    assert [block async for block in reply.events] == [CONTENT + DONE]


async def test_a_usage_chunk_whose_usage_is_not_counts_still_goes() -> None:
    """Read in one decode, a usage that fails the counts' checks (a negative count) is still
    the usage-only chunk the client did not ask for: taken out, its usage unknown."""
    bad = event(choices=[], usage={"prompt_tokens": -1, "completion_tokens": 4})
    out, tap = await relay([CONTENT + bad + DONE])
    assert b"".join(out) == CONTENT + DONE and tap.usage() is None
    out, tap = await relay([CONTENT + b"data: {not json\n\n" + DONE])
    assert b"".join(out) == CONTENT + b"data: {not json\n\n" + DONE and tap.usage() is None


def _strip_as_it_was(block: bytes) -> tuple[bytes, bytes | None]:
    """The tap's strip before its shortcuts (a trailing [DONE] skipped with no search, the usual
    chunk's data read in place, a block with no usage object passed at once): the reference
    they must agree with. The block out, and the data of the usage event kept."""
    from aioproxy.outcome import chunk_usage
    from aioproxy.streaming import data_of

    end, looked = len(block), 0
    while end > 0 and looked < 3:
        start = block.rfind(b"\n\n", 0, max(0, end - 2)) + 2
        if start == 1:
            start = 0
        if block.startswith(b"data: [DONE]", start):
            end = start
            continue
        looked += 1
        if block.find(b'"usage":{', start, end) >= 0 or block.find(b'"usage": {', start, end) >= 0:
            data = data_of(block[start:end])
            found = chunk_usage(data)
            if found is not None:
                return (block if not found[0] else block[:start] + block[end:]), data
        end = start
    return block, None


_PARTS = [
    CONTENT,
    USAGE_ONLY,
    USAGE_ONLY.replace(b'"usage": {', b'"usage":{').replace(b'"choices": []', b'"choices":[]'),
    FINISH_WITH_USAGE,
    DONE,
    b"data: [DONE]\n\n\n",
    b"data:" + USAGE_ONLY[5:],  # no space after "data:"
    b"event: x\n" + USAGE_ONLY,  # a named event
    USAGE_ONLY[:-2] + b"\ndata: 1\n\n",  # two data lines
    USAGE_ONLY[:-1],  # one newline only (a block's last event as a provider may give it)
    b": comment\n\n",
    b"\n",
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PARTS), max_size=7))
def test_strip_agrees_with_the_walk_it_shortcuts(parts: list[bytes]) -> None:
    block = b"".join(parts)
    tap = UsageTap(_Call())  # type: ignore[arg-type]
    expected, data = _strip_as_it_was(block)
    assert tap.strip(block) == expected
    assert tap.usage_event == data
