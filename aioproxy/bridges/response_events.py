"""A chat answer (whole, or chunk by chunk) as a Response object and its stream of events."""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgspec

from ..errors import ProxyError
from ..streaming import sse_event
from .common import ChatAnswer, ChatFunction, ChatToolCall, text_of

__all__ = [
    "ChatAnswer",
    "ResponseBuilder",
    "decode_chat_answer",
    "new_id",
    "response_from_chat",
    "response_usage",
]

_encode = msgspec.json.Encoder().encode


def new_id(prefix: str) -> str:
    """A new object id, OpenAI style: ``resp_``, ``msg_``, ``fc_`` and 48 hex digits."""
    return prefix + secrets.token_hex(24)


decode_chat_answer = msgspec.json.Decoder(ChatAnswer).decode


# The text delta is one event per token: a Struct, as msgspec encodes those fastest.
class _TextDelta(msgspec.Struct):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


# Request fields a Response repeats, with what OpenAI reports when they were not sent.
_ECHOED: dict[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "max_tool_calls": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None},
    "service_tier": "default",
    "temperature": 1.0,
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
}
_ECHOED_IF_SENT = ("user", "safety_identifier", "prompt_cache_key", "top_logprobs")


def _echoed(body: dict[str, Any], store: bool) -> dict[str, Any]:
    echoed = {
        name: default if body.get(name) is None else body[name] for name, default in _ECHOED.items()
    }
    echoed.update((name, body[name]) for name in _ECHOED_IF_SENT if body.get(name) is not None)
    text = body.get("text")
    echoed["text"] = {"format": {"type": "text"}, **(text if isinstance(text, dict) else {})}
    # As OpenAI lists them: ``parameters`` and ``strict`` always there (null: not sent, and
    # so not enforced, as chat does not by default).
    echoed["tools"] = [
        {"parameters": None, "strict": None, **tool} if isinstance(tool, dict) else tool
        for tool in echoed["tools"]
    ]
    echoed["store"] = store
    return echoed


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def response_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Chat usage in the Responses API's names."""
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    cached = _count(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
    reasoning = (
        _count(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else 0
    )
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": _count(usage.get("total_tokens")) or prompt + completion,
    }


class _Part:
    __slots__ = ("chunks", "kind")

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "output_text" or "refusal"
        self.chunks: list[str] = []

    def text(self) -> str:
        return "".join(self.chunks)

    def snapshot(self) -> dict[str, Any]:
        if self.kind == "refusal":
            return {"type": "refusal", "refusal": self.text()}
        return {"type": "output_text", "text": self.text(), "annotations": [], "logprobs": []}


class _Item:
    """An output item: what a message and a function call share."""

    __slots__ = ("id", "output_index", "status")
    type = ""  # the item's "type"

    def __init__(self, id_prefix: str, output_index: int) -> None:
        self.id = new_id(id_prefix)
        self.output_index = output_index
        self.status = "in_progress"

    def snapshot(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "status": self.status, **self.fields()}

    def fields(self) -> dict[str, Any]:
        raise NotImplementedError


class _MessageItem(_Item):
    __slots__ = ("parts",)
    type = "message"

    def __init__(self, output_index: int) -> None:
        super().__init__("msg_", output_index)
        self.parts: list[_Part] = []

    def fields(self) -> dict[str, Any]:
        return {"role": "assistant", "content": [part.snapshot() for part in self.parts]}


class _CallItem(_Item):
    __slots__ = ("call_id", "chunks", "name")
    type = "function_call"

    def __init__(self, output_index: int, call_id: str, name: str) -> None:
        super().__init__("fc_", output_index)
        self.call_id = call_id
        self.name = name
        self.chunks: list[str] = []

    def fields(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "name": self.name, "arguments": "".join(self.chunks)}


class ResponseBuilder:
    """One Response in the making, fed chat deltas; each method returns the events it causes.

    Items are emitted in order, as OpenAI does: an item is done before the next one is added.
    For a whole (non-streamed) answer, feed it with ``feed`` and ignore the events.
    """

    def __init__(
        self,
        body: dict[str, Any],
        model: str,
        *,
        store: bool,
        response_id: str | None = None,
        created_at: int | None = None,
    ) -> None:
        self.id = response_id or new_id("resp_")
        self.created_at = int(time.time()) if created_at is None else created_at
        self.model = model
        self.echoed = _echoed(body, store)
        self.items: list[_MessageItem | _CallItem] = []
        self.current: _MessageItem | _CallItem | None = None
        self.calls: dict[int, _CallItem] = {}  # by the chat tool call's index
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None  # the finished Response
        self.error: ProxyError | None = None  # why it failed
        self.sequence = 0

    # -- events ----------------------------------------------------------------------------

    def _event(self, type_: str, **fields: Any) -> bytes:
        data = sse_event(type_, {"type": type_, "sequence_number": self.sequence, **fields})
        self.sequence += 1
        return data

    def _item_event(self, type_: str, item: _MessageItem | _CallItem, **fields: Any) -> bytes:
        """An event within ``item``: it names the item and its place in the output."""
        return self._event(type_, item_id=item.id, output_index=item.output_index, **fields)

    def start(self) -> list[bytes]:
        response = self.response("in_progress")
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def feed(self, answer: ChatAnswer) -> list[bytes]:
        """A chat completion or stream chunk (first choice only: the bridge never asks for n)."""
        events: list[bytes] = []
        if answer.usage:
            self.usage = answer.usage
        for choice in answer.choices:
            if choice.index != 0:
                continue
            message = choice.message or choice.delta
            if message is not None:
                text = text_of(message.content)
                if text:
                    events += self._content("output_text", text)
                if message.refusal:
                    events += self._content("refusal", message.refusal)
                for position, call in enumerate(message.tool_calls or ()):
                    # A whole message's tool calls carry no index: their place is theirs.
                    index = call.index if choice.message is None else position
                    events += self._tool_call(index, call)
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason
        return events

    def _content(self, kind: str, delta: str) -> list[bytes]:
        events: list[bytes] = []
        item = self.current
        if not isinstance(item, _MessageItem):
            item = _MessageItem(len(self.items))
            events += self._open(item)
        part = item.parts[-1] if item.parts else None
        if part is None or part.kind != kind:
            if part is not None:
                events += self._close_part(item)
            part = _Part(kind)
            item.parts.append(part)
            events.append(
                self._item_event(
                    "response.content_part.added",
                    item,
                    content_index=len(item.parts) - 1,
                    part=part.snapshot(),
                )
            )
        part.chunks.append(delta)
        content_index = len(item.parts) - 1
        if kind == "output_text":
            text_delta = _TextDelta(
                "response.output_text.delta",
                self.sequence,
                item.id,
                item.output_index,
                content_index,
                delta,
            )
            self.sequence += 1
            events.append(sse_event(text_delta.type, text_delta))
        else:
            events.append(
                self._item_event(
                    "response.refusal.delta",
                    item,
                    content_index=content_index,
                    delta=delta,
                )
            )
        return events

    def _tool_call(self, index: int, delta: ChatToolCall) -> list[bytes]:
        events: list[bytes] = []
        function = delta.function or ChatFunction()
        item = self.calls.get(index)
        if item is None:
            item = _CallItem(len(self.items), delta.id or new_id("call_"), function.name or "")
            self.calls[index] = item
            events += self._open(item)
        elif function.name and function.name != item.name:
            item.name += function.name  # a provider that streams the name in pieces
        if function.arguments:
            item.chunks.append(function.arguments)
            events.append(
                self._item_event(
                    "response.function_call_arguments.delta",
                    item,
                    delta=function.arguments,
                )
            )
        return events

    def _open(self, item: _MessageItem | _CallItem) -> list[bytes]:
        """Close the open item and add ``item``: OpenAI's items follow one another."""
        events = self._close_current()
        self.items.append(item)
        self.current = item
        added = self._event(
            "response.output_item.added", output_index=item.output_index, item=item.snapshot()
        )
        return [*events, added]

    def _close_part(self, item: _MessageItem) -> list[bytes]:
        part = item.parts[-1]
        where = {
            "item_id": item.id,
            "output_index": item.output_index,
            "content_index": len(item.parts) - 1,
        }
        if part.kind == "output_text":
            done = self._event("response.output_text.done", **where, text=part.text(), logprobs=[])
        else:
            done = self._event("response.refusal.done", **where, refusal=part.text())
        return [done, self._event("response.content_part.done", **where, part=part.snapshot())]

    def _close_current(self, status: str = "completed") -> list[bytes]:
        item, self.current = self.current, None
        if item is None:
            return []
        events: list[bytes] = []
        if isinstance(item, _MessageItem):
            if item.parts:
                events += self._close_part(item)
        else:
            events.append(
                self._item_event(
                    "response.function_call_arguments.done",
                    item,
                    name=item.name,
                    arguments="".join(item.chunks),
                )
            )
        item.status = status
        events.append(
            self._event(
                "response.output_item.done", output_index=item.output_index, item=item.snapshot()
            )
        )
        return events

    def finish(self) -> list[bytes]:
        """Close what is open and end with response.completed (or .incomplete)."""
        status = "incomplete" if self.finish_reason in ("length", "content_filter") else "completed"
        events: list[bytes] = []
        if not self.items:  # an empty answer is still a message, as OpenAI sends it
            events += self._content("output_text", "")
        events += self._close_current("incomplete" if status == "incomplete" else "completed")
        self.final = self.response(status)
        final = "response.completed" if status == "completed" else "response.incomplete"
        return [*events, self._event(final, response=self.final)]

    def fail(self, error: ProxyError) -> list[bytes]:
        """End with an ``error`` event and ``response.failed``."""
        for item in self.items:
            if item.status == "in_progress":
                item.status = "incomplete"
        self.current = None
        self.error = error
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        self.final = self.response("failed", {"code": code, "message": error.message})
        return [
            self._event("error", code=error.code, message=error.message, param=error.param),
            self._event("response.failed", response=self.final),
        ]

    # -- objects ---------------------------------------------------------------------------

    def response(self, status: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        incomplete = None
        if status == "incomplete":
            reason = (
                "content_filter" if self.finish_reason == "content_filter" else "max_output_tokens"
            )
            incomplete = {"reason": reason}
        response: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": [item.snapshot() for item in self.items],
            **self.echoed,
        }
        # OpenAI sends "usage": null until the end; its schema allows no null: leave it out.
        if self.usage is not None and status != "in_progress":
            response["usage"] = response_usage(self.usage)
        return response

    def chat_message(self) -> dict[str, Any]:
        """The answer as one assistant chat message, for the stored conversation."""
        texts = [
            part.text()
            for item in self.items
            if isinstance(item, _MessageItem)
            for part in item.parts
        ]
        calls = [
            {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": "".join(item.chunks)},
            }
            for item in self.items
            if isinstance(item, _CallItem)
        ]
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
        if calls:
            message["tool_calls"] = calls
        elif message["content"] is None:
            message["content"] = ""
        return message


def response_from_chat(
    completion: dict[str, Any] | bytes, body: dict[str, Any], model: str, *, store: bool = False
) -> dict[str, Any]:
    """The Response for a whole chat completion (answering the Responses request ``body``)."""
    builder = ResponseBuilder(body, model, store=store)
    raw = completion if isinstance(completion, bytes) else _encode(completion)
    builder.feed(decode_chat_answer(raw))
    builder.finish()
    assert builder.final is not None
    return builder.final
