"""What both bridges need: the chat Call they make, and reading the chat provider's stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec

from .. import streaming
from ..context import Call, Deployment
from ..errors import BadRequest
from ..failures import as_proxy_error, scrub_bytes
from ..providers import JSONReply, StreamReply
from ..streaming import split_events

__all__ = [
    "ChatAnswer",
    "ChatChoice",
    "ChatFunction",
    "ChatMessage",
    "ChatToolCall",
    "chat_call",
    "events_of",
    "first_event",
    "once",
    "scrubbed",
    "text_of",
    "unsupported",
]


# What the bridges read of a chat answer's choices (whole, or a stream chunk's), typed; each
# bridge's ChatAnswer holds them with the usage in the form it needs.


class ChatFunction(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class ChatToolCall(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: ChatFunction | None = None


class ChatMessage(msgspec.Struct):
    content: Any = None  # a string; some providers send a list of parts (see text_of)
    refusal: str | None = None
    tool_calls: list[ChatToolCall] | None = None


class ChatChoice(msgspec.Struct):
    index: int = 0
    message: ChatMessage | None = None  # a whole answer
    delta: ChatMessage | None = None  # a stream chunk
    finish_reason: str | None = None


class ChatAnswer(msgspec.Struct):
    """A chat completion or one of its stream chunks (or an error event): what a bridge reads."""

    choices: list[ChatChoice] = []
    usage: dict[str, Any] | None = None
    error: Any = None


def chat_call(call: Call, body: dict[str, Any]) -> Call:
    """A chat-completions Call carrying ``body``: :meth:`Call.for_chat`."""
    return call.for_chat(body)


def text_of(content: Any) -> str:
    """A chat message's text: its content string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def once(close: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """``close``, made safe to call more than once (the generator's finally and the reply's)."""
    done = False

    async def close_once() -> None:
        nonlocal done
        if not done:
            done = True
            await close()

    return close_once


async def first_event(reply: StreamReply, deployment: Deployment | None = None) -> bytes | None:
    """Deprecated (issue 11): :func:`aioproxy.streaming.first_event`, with transport errors as
    the client's 502/504, for callers that do not map them themselves yet."""
    try:
        return await streaming.first_event(reply)
    except (aiohttp.ClientError, OSError) as exc:
        raise as_proxy_error(exc, deployment) from exc


async def events_of(reply: StreamReply, first: bytes | None) -> AsyncIterator[bytes]:
    """The stream's events one by one, ``first`` (already pulled) included.

    A provider may yield several events in one item (what one network read completed): they
    are taken apart here, each still handled as soon as its item arrives.
    """
    if first is None:
        return
    for event in split_events(first):
        yield event
    async for item in reply.events:
        for event in split_events(item):
            yield event


def unsupported(what: str, param: str) -> BadRequest:
    """The 400 for a request field a chat-only provider cannot honour through a bridge."""
    return BadRequest(
        f"{what} not supported by this model: its provider only serves chat completions",
        param=param,
        code="unsupported_parameter",
    )


def scrubbed(reply: JSONReply, call: Call) -> JSONReply:
    """A chat provider's error answer as it is, but for the deployment's secrets masked (a
    provider may relay an upstream's words, which can echo its key)."""
    return JSONReply(scrub_bytes(reply.body, call.deployment), reply.status, reply.headers)
