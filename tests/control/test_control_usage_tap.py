"""The usage tap alone: which events it takes out of a stream, and which it leaves."""

from __future__ import annotations

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
