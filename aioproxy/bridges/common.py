"""What both bridges need: the chat Call they make, and reading the chat provider's stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec

from ..context import Call, Deployment
from ..errors import BadRequest
from ..providers import StreamReply
from ..routes import Kind
from ..streaming import split_events
from ..upstream import failure_from

__all__ = ["chat_call", "events_of", "first_event", "once", "text_of", "unsupported"]

_encode = msgspec.json.Encoder().encode


def chat_call(call: Call, body: dict[str, Any]) -> Call:
    """A chat-completions Call carrying ``body``, for the same client, deployment and state."""
    fields = {name: msgspec.Raw(_encode(value)) for name, value in body.items()}
    fields["model"] = msgspec.Raw(_encode(call.model))
    bridged = Call(
        Kind.CHAT_COMPLETIONS, call.request, call.principal, call.model, fields, call.stream
    )
    bridged.state = call.state  # one request: plugins' notes stay shared
    bridged.started = call.started
    bridged.upstream_headers = call.upstream_headers  # one request: one id, one trace
    if call.deployment is not None:
        bridged.route_to(call.deployment)
    return bridged


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
    """Pull a stream's first event now, so that a failure before it keeps its own status.

    None for an empty stream. On a failure (cancellation too) the stream is closed, and client
    errors come out as the client's 502/504.
    """
    try:
        return await anext(reply.events)
    except StopAsyncIteration:
        return None
    except BaseException as exc:
        await reply.aclose()
        if isinstance(exc, (aiohttp.ClientError, OSError)):
            raise failure_from(exc, deployment) from exc
        raise


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
