"""``/v1/chat/completions``: the last user message echoed, whole or as chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from aioproxy import DONE, Call, JSONReply, Reply, StreamReply, completion_usage

from .common import Head, chunk_writer, head_of, interleave, whole_answer
from .inputs import chat_input, choice_count, include_usage, token_cap
from .settings import EchoSettings, pace
from .text import Echo, echo

__all__ = ["answer"]


# Structs for the chunks, as there is one per token: msgspec encodes them fastest.
class _Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class _ChunkChoice(msgspec.Struct):
    index: int
    delta: _Delta
    logprobs: None = None
    finish_reason: str | None = None


async def answer(call: Call, settings: EchoSettings) -> Reply:
    text, prompt_tokens = chat_input(call)
    reply = echo(text, token_cap(call, "max_completion_tokens", "max_tokens"))
    replies = [reply] * choice_count(call)
    head = head_of(call, "chatcmpl-echo-")
    usage = completion_usage(prompt_tokens, len(reply.tokens) * len(replies))
    if call.stream:
        final_usage = usage if include_usage(call) else None
        return StreamReply(_stream(head, replies, final_usage, settings.delay))
    await pace(settings.delay, len(reply.tokens))
    return JSONReply.of(_completion(head, replies, usage))


def _completion(head: Head, replies: list[Echo], usage: dict[str, Any]) -> dict[str, Any]:
    choices: list[dict[str, Any]] = [
        {
            "index": index,
            "message": {
                "role": "assistant",
                "content": reply.text,
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": reply.finish_reason,
        }
        for index, reply in enumerate(replies)
    ]
    return whole_answer(head, "chat.completion", choices, usage)


async def _stream(
    head: Head, replies: list[Echo], usage: dict[str, Any] | None, delay: float
) -> AsyncIterator[bytes]:
    """Role chunks, one chunk per token, finish chunks, the usage chunk if asked for, [DONE]."""
    # OpenAI sends "usage": null on the other chunks only when the usage chunk was asked for.
    chunk = chunk_writer(
        head, "chat.completion.chunk", None if usage is not None else msgspec.UNSET
    )

    for index in range(len(replies)):
        yield chunk([_ChunkChoice(index, _Delta(role="assistant", content=""))])
    async for index, token in interleave(replies, delay):
        yield chunk([_ChunkChoice(index, _Delta(content=token))])
    for index, reply in enumerate(replies):
        yield chunk([_ChunkChoice(index, _Delta(), finish_reason=reply.finish_reason)])
    if usage is not None:
        yield chunk([], usage)
    yield DONE
