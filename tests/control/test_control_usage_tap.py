"""The usage tap alone: which events it takes out of a stream, and which it leaves."""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator

import pytest

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
