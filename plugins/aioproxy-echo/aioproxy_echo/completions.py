"""``/v1/completions`` (legacy): each prompt echoed, ``n`` choices per prompt, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from aioproxy import DONE, Call, JSONReply, Reply, StreamReply, completion_usage

from .common import Head, chunk_writer, head_of, interleave, whole_answer
from .inputs import choice_count, completion_prompts, include_usage, token_cap
from .settings import EchoSettings, pace
from .text import Echo, count_words, echo

__all__ = ["answer"]


# Structs for the chunks, as there is one per token: msgspec encodes them fastest.
class _Choice(msgspec.Struct):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None = None


async def answer(call: Call, settings: EchoSettings) -> Reply:
    prompts = completion_prompts(call)
    cap = token_cap(call, "max_tokens")
    n = choice_count(call)
    # Choices run prompt by prompt, n per prompt: choice i answers prompt i // n, as OpenAI's do.
    replies = [echo(prompt, cap) for prompt in prompts for _ in range(n)]
    head = head_of(call, "cmpl-echo-")
    usage = completion_usage(
        sum(map(count_words, prompts)), sum(len(reply.tokens) for reply in replies)
    )
    if call.stream:
        final_usage = usage if include_usage(call) else None
        return StreamReply(_stream(head, replies, final_usage, settings.delay))
    await pace(settings.delay, max(len(reply.tokens) for reply in replies))
    return JSONReply.of(_completion(head, replies, usage))


def _completion(head: Head, replies: list[Echo], usage: dict[str, Any]) -> dict[str, Any]:
    choices = [
        {"text": reply.text, "index": index, "logprobs": None, "finish_reason": reply.finish_reason}
        for index, reply in enumerate(replies)
    ]
    return whole_answer(head, "text_completion", choices, usage)


async def _stream(
    head: Head, replies: list[Echo], usage: dict[str, Any] | None, delay: float
) -> AsyncIterator[bytes]:
    """One chunk per token, an empty finish chunk per choice, the usage chunk if asked, [DONE].

    Unlike chat chunks, the others carry no ``"usage": null``: a text_completion's usage is not
    nullable in OpenAI's schema.
    """
    chunk = chunk_writer(head, "text_completion")

    async for index, token in interleave(replies, delay):
        yield chunk([_Choice(token, index)])
    for index, reply in enumerate(replies):
        yield chunk([_Choice("", index, finish_reason=reply.finish_reason)])
    if usage is not None:
        yield chunk([], usage)
    yield DONE
