"""What every answer shares: its ids, its whole object, its stream chunks, and streaming n
choices side by side."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NamedTuple

import msgspec

from aioproxy import Call, sse_data

from .settings import pace
from .text import Echo

__all__ = [
    "Head",
    "chunk_writer",
    "head_of",
    "interleave",
    "request_digest",
    "whole_answer",
]


def request_digest(call: Call) -> str:
    """A hash of the request body, for ids: the same request always gets the same ids."""
    return hashlib.sha256(call.body()).hexdigest()[:24]


class Head(NamedTuple):
    """What every object and chunk of one answer repeats."""

    id: str
    created: int
    model: str  # the name the client asked for, not the deployment's


def head_of(call: Call, prefix: str) -> Head:
    return Head(prefix + request_digest(call), int(time.time()), call.model)


def whole_answer(
    head: Head, object: str, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    """A whole (not streamed) chat or legacy completion: ``object`` names which."""
    return {
        "id": head.id,
        "object": object,
        "created": head.created,
        "model": head.model,
        "choices": choices,
        "usage": usage,
    }


# One chunk per token: a Struct, as msgspec encodes those fastest.
class _Chunk(msgspec.Struct, kw_only=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[Any]  # the endpoint's own choice Structs
    usage: dict[str, Any] | None | msgspec.UnsetType = msgspec.UNSET


def chunk_writer(
    head: Head, object: str, usage: dict[str, Any] | None | msgspec.UnsetType = msgspec.UNSET
) -> Callable[..., bytes]:
    """``chunk(choices, usage=usage)``: one SSE event of this answer's stream (``object`` is
    ``chat.completion.chunk`` or ``text_completion``); ``usage`` is what the chunks carry unless
    told otherwise."""
    default_usage = usage

    def chunk(choices: list[Any], usage: Any = default_usage) -> bytes:
        return sse_data(
            _Chunk(
                id=head.id,
                object=object,
                created=head.created,
                model=head.model,
                choices=choices,
                usage=usage,
            )
        )

    return chunk


async def interleave(replies: Sequence[Echo], delay: float) -> AsyncIterator[tuple[int, str]]:
    """``(choice index, token)`` position by position, as a model generating n choices sends them.

    One ``delay`` per position: the choices are generated side by side, not one after another.
    """
    longest = max((len(reply.tokens) for reply in replies), default=0)
    for position in range(longest):
        await pace(delay)
        for index, reply in enumerate(replies):
            if position < len(reply.tokens):
                yield index, reply.tokens[position]
