"""Anthropic's Messages API (``/v1/messages``) served by a provider that only has chat completions,
and its ``count_tokens`` estimated.

The request becomes a chat request (``messages_request``), the chat answer a Message and a chat
stream Anthropic's event sequence, events going out as each chat chunk arrives
(``messages_events``). Failures are raised as ProxyErrors: the Messages routes render them in
Anthropic's shape (``errors.anthropic_error``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from ..context import Call
from ..errors import BadGateway, ProxyError
from ..failures import scrub
from ..providers import JSONReply, ProviderMethod, Reply, StreamReply
from ..streaming import data_of
from .common import chat_call, first_event, once
from .messages_events import MessageStream, decode_chunk, message_events, message_from_chat
from .messages_request import chat_request

__all__ = ["count_tokens_estimate", "make_messages_bridge"]


class _ErrorDetail(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    code: str | int | None = None


class _ErrorAnswer(msgspec.Struct):
    error: _ErrorDetail | str | None = None


_decode_error = msgspec.json.Decoder(_ErrorAnswer).decode


def _error_of(status: int, data: bytes, call: Call) -> ProxyError:
    """A chat provider's error (an answer with ``status``, or an error chunk) as a ProxyError,
    for the Messages route to render in Anthropic's shape; its words scrubbed of secrets."""
    try:
        detail = _decode_error(data).error
    except msgspec.DecodeError:
        detail = None
    message = detail if isinstance(detail, str) else detail and detail.message
    code = detail.code if isinstance(detail, _ErrorDetail) else None
    return ProxyError(
        scrub(message or f"The chat completion failed ({status})", call.deployment),
        status=status,
        code=None if code is None else scrub(str(code), call.deployment),
        caused_by_upstream=True if status >= 500 else None,
    )


def make_messages_bridge(chat: ProviderMethod) -> ProviderMethod:
    """The ``messages`` method of a provider that only has ``chat`` (its chat_completions)."""

    async def messages(call: Call) -> Reply:
        reply = await chat(chat_call(call, chat_request(call)))
        if isinstance(reply, JSONReply):
            if reply.status >= 400:
                raise _error_of(reply.status, reply.body, call)
            message = message_from_chat(decode_chunk(reply.body), call.model)
            if call.stream:  # asked for a stream, got a whole answer
                return StreamReply(_single(message_events(message)))
            return JSONReply.of(message)
        close = once(reply.aclose)
        first = await first_event(reply, call.deployment)
        stream = MessageStream(call.model)
        if call.stream:
            events = _translate(stream, reply, first, call, close)
            # Over once the closing events are out: then a whole stream (one read brought
            # all of it) goes out as one body, as chat's does (relay._send_stream).
            return StreamReply(events, close=close, finished=lambda: stream.finished)
        await close()
        raise BadGateway("The chat provider streamed an answer that was not asked to stream")

    return messages


async def _single(events: bytes) -> AsyncIterator[bytes]:
    yield events


async def _translate(
    stream: MessageStream,
    reply: StreamReply,
    first: bytes | None,
    call: Call,
    close: Callable[[], Awaitable[None]],
) -> AsyncIterator[bytes]:
    """Each block of chat events as the Anthropic events it gives, as it arrives. The block
    that ends the chat stream (its ``[DONE]``, the upstream's answer over) goes out together
    with the closing events: a stream that came in one read goes out in one piece."""
    try:
        out: list[bytes] = [stream.start()]
        block = first
        while block is not None:
            if _feed(stream, block, out, call) and reply.finished and reply.finished():
                break
            if out:
                yield b"".join(out)
                out.clear()
            block = await anext(reply.events, None)
        out.append(stream.finish())
        yield b"".join(out)
    finally:
        await close()


def _feed(stream: MessageStream, block: bytes, out: list[bytes], call: Call) -> bool:
    """Append the Anthropic events of a block of chat events to ``out``; whether the block
    held the chat stream's end (``[DONE]``; what follows it in the block is not read)."""
    for data in _payloads(block):
        if data == b"[DONE]":
            return True
        chunk = decode_chunk(data)
        if chunk.error is not None:
            raise _error_of(502, data, call)
        stream.feed(chunk, out)
    return False


def _payloads(block: bytes) -> list[bytes]:
    """The data of each event of a block: chat's usual ``data: {...}`` events are cut, not
    parsed line by line (comments and empty events dropped)."""
    payloads = []
    for event in block.split(b"\n\n"):
        if event.startswith(b"data: ") and b"\n" not in event:  # the usual one-line event
            payloads.append(event[6:])
        elif data := data_of(event):
            payloads.append(data)
    return payloads


# What the estimate counts a token as: four characters of text, as a rule of thumb for
# English; an image or PDF page as Anthropic's typical ~1,600.
_CHARS_PER_TOKEN = 4
_MEDIA_TOKENS = 1600
_PER_MESSAGE = 4  # the role and framing of each message


def _estimate(value: Any) -> int:
    """Characters of every string but base64 data, in tokens; media as a flat count."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_estimate(item) for item in value)
    if isinstance(value, dict):
        if value.get("type") in ("base64", "url", "file"):
            return _MEDIA_TOKENS * _CHARS_PER_TOKEN
        return sum(_estimate(item) for key, item in value.items() if key != "cache_control")
    return 0


async def count_tokens_estimate(call: Call) -> Reply:
    """``count_tokens`` where the provider cannot count: an estimate, from the characters of
    the system prompt, messages and tools (a chat request is checked to be possible first)."""
    chat_request(
        call, counting=True
    )  # refuses what the model could not be sent, as /v1/messages would
    messages = call.get("messages") or []
    characters = sum(_estimate(call.get(name)) for name in ("system", "messages", "tools"))
    tokens = characters // _CHARS_PER_TOKEN + _PER_MESSAGE * len(messages)
    return JSONReply.of({"input_tokens": tokens})
