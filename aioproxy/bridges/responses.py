"""The Responses API (``/v1/responses``) served by a provider that only has chat completions.

The request becomes a chat request (``response_request``), the chat answer a Response and a chat
stream the Responses event sequence, one event per chat delta as it arrives (``response_events``).
With a store, each response is kept with its conversation as chat messages, so that
``previous_response_id`` puts it before the next request's input.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from ..context import Call
from ..errors import BadGateway, BadRequest, NotFound, ProxyError
from ..failures import as_proxy_error
from ..fields import BOOL, STR, get_field
from ..providers import JSONReply, ProviderMethod, Reply, StreamReply
from ..streaming import data_of, sse_event
from .common import chat_call, events_of, first_event, once
from .response_events import ChatAnswer, ResponseBuilder, decode_chat_answer, response_from_chat
from .response_request import ChatRequest, chat_request, input_messages
from .store import BrokenChain, ResponseStore, StoreUnavailable, owner_of

__all__ = [
    "ChatRequest",
    "ResponseBuilder",
    "chat_request",
    "input_messages",
    "make_responses_bridge",
    "response_from_chat",
]

log = logging.getLogger("aioproxy")

# A response the store failed to keep still answers (the model's work is done and paid for), as
# ``"store": false``, which tells a client it cannot chain onto it, and with this header.
_NOT_STORED = {"Warning": '199 aioproxy "the response was not stored: the store is unavailable"'}


def _error_from(payload: Any, call: Call) -> ProxyError:
    """A chat-side ``{"error": ...}`` event as a ProxyError."""
    if isinstance(payload, dict):
        message = payload.get("message")
        code = payload.get("code")
        return BadGateway(
            message if isinstance(message, str) and message else "The chat completion failed",
            param=payload.get("param") if isinstance(payload.get("param"), str) else None,
            code=str(code) if code is not None else "upstream_error",
        )
    return BadGateway(str(payload) if payload else "The chat completion failed")


def make_responses_bridge(chat: ProviderMethod, store: ResponseStore | None) -> ProviderMethod:
    """The ``responses`` method of a provider that only has ``chat`` (its chat_completions)."""

    async def responses(call: Call) -> Reply:
        history: list[dict[str, Any]] = []
        previous_id = get_field(call.fields, "previous_response_id", STR)
        if previous_id is not None:
            history = await _history(store, call, previous_id)
        request = chat_request(call.fields, history)
        keep = store is not None and get_field(call.fields, "store", BOOL) is not False
        builder = ResponseBuilder(request.echo, call.model, store=keep)
        reply = await chat(chat_call(call, request.body))

        async def save() -> bool:
            """Store the response if asked; False if that failed (it then says so)."""
            if keep and store is not None:
                return await _save(store, call, builder, request, previous_id)
            return True

        if isinstance(reply, JSONReply):
            if reply.status >= 400:
                return reply  # a provider's own error answer: pass it on as it is
            if call.stream:  # asked for a stream, got a whole answer
                return StreamReply(_whole(builder, reply, call, save))
            builder.feed(_whole_answer(reply.body, call))
            builder.finish()
        else:
            close = once(reply.aclose)
            first = await first_event(reply)
            if call.stream:
                return StreamReply(
                    _translate(builder, reply, first, call, save, close), close=close
                )
            try:
                async for _ in _translate(builder, reply, first, call, None, close):
                    pass
            finally:
                await close()
            if builder.error is not None:
                raise builder.error
        stored = await save()
        assert builder.final is not None
        answer = JSONReply.of(builder.final)
        if not stored:
            answer.headers = _NOT_STORED
        return answer

    return responses


async def _history(
    store: ResponseStore | None, call: Call, previous_id: str
) -> list[dict[str, Any]]:
    if store is None:
        raise BadRequest(
            "'previous_response_id' needs the response store, which is disabled on this proxy",
            param="previous_response_id",
            code="unsupported_parameter",
        )
    try:
        found = await store.get(previous_id, owner_of(call.principal))
    except BrokenChain as broken:
        # A deleted (or expired) response is gone from every conversation that went through
        # it: continuing without it would send the model a conversation with a hole.
        raise NotFound(
            f"Previous response with id '{previous_id}' cannot be continued: the response"
            f" '{broken.missing}' before it was deleted or has expired.",
            param="previous_response_id",
            code="previous_response_not_found",
        ) from None
    if found is None:
        raise NotFound(
            f"Previous response with id '{previous_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return found[1]


async def _save(
    store: ResponseStore,
    call: Call,
    builder: ResponseBuilder,
    request: ChatRequest,
    previous_id: str | None,
) -> bool:
    """Store the response (its turn only: the chain holds the rest); False if it failed."""
    assert builder.final is not None
    turn = [*request.inputs, builder.chat_message()]
    try:
        await store.save(builder.id, owner_of(call.principal), builder.final, turn, previous_id)
    except StoreUnavailable:  # logged; the answer is good, but it says it was not stored
        builder.final["store"] = False
        return False
    return True


def _decode(data: bytes, call: Call) -> ChatAnswer:
    try:
        return decode_chat_answer(data)
    except msgspec.DecodeError:
        where = call.deployment.describe() if call.routed else "the upstream"
        raise BadGateway(
            f"Deployment {where} sent a chat completion the bridge cannot read",
            code="upstream_invalid_response",
        ) from None


def _whole_answer(data: bytes, call: Call) -> ChatAnswer:
    answer = _decode(data, call)
    if answer.error is not None:
        raise _error_from(answer.error, call)
    return answer


async def _translate(
    builder: ResponseBuilder,
    reply: StreamReply,
    first: bytes | None,
    call: Call,
    save: Callable[[], Awaitable[bool]] | None,
    close: Callable[[], Awaitable[None]],
) -> AsyncIterator[bytes]:
    """Chat chunks in, Responses events out, each as soon as its chunk arrives.

    The response is stored (``save``) before its final event goes out, so that a client can
    chain onto it as soon as it has it. The chat stream is closed when this ends, however.
    """
    try:
        for event in builder.start():
            yield event
        try:
            done = False
            async for event in events_of(reply, first):
                data = data_of(event)
                if not data:
                    continue  # a comment (keep-alive) or an empty event
                if data == b"[DONE]":
                    done = True
                    break
                answer = _decode(data, call)
                if answer.error is not None:
                    raise _error_from(answer.error, call)
                for out in builder.feed(answer):
                    yield out
            if not done and builder.finish_reason is None:
                where = call.deployment.describe() if call.routed else "the upstream"
                raise BadGateway(
                    f"Deployment {where} ended its stream before it was complete",
                    code="upstream_stream_incomplete",
                )
        except Exception as exc:  # noqa: BLE001 - any failure becomes the stream's error event
            if not isinstance(exc, ProxyError):
                log.warning("the chat stream of a bridged response failed: %r", exc)
            for out in builder.fail(as_proxy_error(exc, call.deployment if call.routed else None)):
                yield out
            return
        final = builder.finish()
        await close()  # release the chat stream's connection before the disk write
        if save is not None and not await save():
            final[-1] = _final_event(builder)
        for out in final:
            yield out
    finally:
        await close()


async def _whole(
    builder: ResponseBuilder, reply: JSONReply, call: Call, save: Callable[[], Awaitable[bool]]
) -> AsyncIterator[bytes]:
    """The event sequence for a whole chat answer (a provider that did not stream)."""
    answer = _whole_answer(reply.body, call)
    events = builder.start()
    events += builder.feed(answer)
    events += builder.finish()
    if not await save():
        events[-1] = _final_event(builder)
    for event in events:
        yield event


def _final_event(builder: ResponseBuilder) -> bytes:
    """The stream's last event again, for a response whose ``store`` turned false after it
    was encoded (the store failed to keep it)."""
    assert builder.final is not None
    completed = builder.final["status"] == "completed"
    type_ = "response.completed" if completed else "response.incomplete"
    payload = {"type": type_, "sequence_number": builder.sequence - 1, "response": builder.final}
    return sse_event(type_, payload)
