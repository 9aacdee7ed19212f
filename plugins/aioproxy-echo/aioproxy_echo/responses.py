"""``/v1/responses``: the last user message of ``input`` echoed, whole or as the event stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from aioproxy import Call, JSONReply, Reply, StreamReply
from aioproxy.streaming import sse_event

from .common import Head, interleave, request_digest
from .inputs import response_input, token_cap
from .settings import EchoSettings, pace
from .text import Echo, echo

__all__ = ["answer"]

# Request fields a response object repeats, with what OpenAI reports when they were not sent.
_ECHOED_FIELDS: dict[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
}


# A Struct for the delta event, as there is one per token: msgspec encodes it fastest.
class _TextDelta(msgspec.Struct):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


class _Answer:
    """One response in the making: builds its objects at each stage of the stream."""

    def __init__(self, call: Call, reply: Echo, input_tokens: int) -> None:
        digest = request_digest(call)
        self.head = Head("resp_echo_" + digest, int(time.time()), call.model)
        self.item_id = "msg_echo_" + digest
        self.reply = reply
        self.input_tokens = input_tokens
        # Decoded once here, not per event: the same fields go into three response objects.
        self.echoed = {
            name: _field(call, name, default) for name, default in _ECHOED_FIELDS.items()
        }

    @property
    def status(self) -> str:
        return "incomplete" if self.reply.capped else "completed"

    def part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def item(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def usage(self) -> dict[str, Any]:
        output_tokens = len(self.reply.tokens)
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + output_tokens,
        }

    def response(self, finished: bool) -> dict[str, Any]:
        """The response object: in progress with no output, or finished with output and usage."""
        status = self.status if finished else "in_progress"
        capped = finished and self.reply.capped
        response: dict[str, Any] = {
            "id": self.head.id,
            "object": "response",
            "created_at": self.head.created,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if capped else None,
            "model": self.head.model,
            "output": [self.item(self.status, [self.part(self.reply.text)])] if finished else [],
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": False,  # nothing is kept: GET /v1/responses/{id} has nothing to find
            **self.echoed,
        }
        # OpenAI sends "usage": null while in progress; its schema allows no null, so leave it out.
        if finished:
            response["usage"] = self.usage()
        return response


def _field(call: Call, name: str, default: Any) -> Any:
    value = call.get(name)
    return default if value is None else value


async def answer(call: Call, settings: EchoSettings) -> Reply:
    text, input_tokens = response_input(call)
    reply = echo(text, token_cap(call, "max_output_tokens"))
    state = _Answer(call, reply, input_tokens)
    if call.stream:
        return StreamReply(_stream(state, settings.delay))
    await pace(settings.delay, len(reply.tokens))
    return JSONReply.of(state.response(finished=True))


async def _stream(state: _Answer, delay: float) -> AsyncIterator[bytes]:
    """The event sequence OpenAI sends for one text message, ``sequence_number`` from 0."""
    sequence = 0

    def event(type_: str, **fields: Any) -> bytes:
        nonlocal sequence
        data = sse_event(type_, {"type": type_, "sequence_number": sequence, **fields})
        sequence += 1
        return data

    where = {"item_id": state.item_id, "output_index": 0, "content_index": 0}
    text = state.reply.text
    yield event("response.created", response=state.response(finished=False))
    yield event("response.in_progress", response=state.response(finished=False))
    yield event("response.output_item.added", output_index=0, item=state.item("in_progress", []))
    yield event("response.content_part.added", **where, part=state.part(""))
    async for _, token in interleave([state.reply], delay):
        delta = _TextDelta("response.output_text.delta", sequence, state.item_id, 0, 0, token)
        yield sse_event(delta.type, delta)
        sequence += 1
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=state.part(text))
    yield event(
        "response.output_item.done",
        output_index=0,
        item=state.item(state.status, [state.part(text)]),
    )
    # A capped answer ends as the real API's does: response.incomplete, not response.completed.
    final = "response.completed" if state.status == "completed" else "response.incomplete"
    yield event(final, response=state.response(finished=True))
