"""A cached answer in the form the request asks for: a stream's events as they were sent, a
JSON body as one stream (``json_as_sse``), or a stream put together as the JSON answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from ..providers import JSONReply, Reply, StreamReply
from ..routes import Kind
from ..streaming import json_as_sse

__all__ = ["Recorder", "replay"]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def replay(kind: Kind, form: str, body: bytes, stream: bool) -> Reply:
    if stream:
        return StreamReply(_once(body if form == "stream" else json_as_sse(kind.value, body)))
    return JSONReply(body if form == "json" else stream_as_json(kind, body))


async def _once(events: bytes) -> AsyncIterator[bytes]:
    yield events


def _payloads(events: bytes) -> list[Any]:
    found = []
    for event in events.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data:") and (data := line[5:].strip()) != b"[DONE]":
                found.append(_decode(data))
    return found


def stream_as_json(kind: Kind, events: bytes) -> bytes:
    """The JSON answer a stream adds up to (chat, legacy completions, responses)."""
    payloads = _payloads(events)
    if kind is Kind.RESPONSES:
        for payload in reversed(payloads):
            if isinstance(payload, dict) and payload.get("type") == "response.completed":
                return _encode(payload["response"])
        return _encode(payloads[-1] if payloads else {})
    chat = kind is Kind.CHAT_COMPLETIONS
    answer: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    for chunk in payloads:
        if not isinstance(chunk, dict):
            continue
        for name in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if name in chunk and name not in answer:
                answer[name] = chunk[name]
        if chunk.get("usage"):
            answer["usage"] = chunk["usage"]
        for part in chunk.get("choices") or ():
            index = part.get("index", 0)
            choice = choices.setdefault(index, _empty_choice(index, chat))
            if part.get("finish_reason") is not None:
                choice["finish_reason"] = part["finish_reason"]
            if chat:
                _add_delta(choice["message"], part.get("delta") or {})
            else:
                choice["text"] += part.get("text") or ""
    answer["object"] = "chat.completion" if chat else "text_completion"
    answer["choices"] = [choices[index] for index in sorted(choices)]
    return _encode(answer)


def _empty_choice(index: int, chat: bool) -> dict[str, Any]:
    if chat:
        message = {"role": "assistant", "content": None}
        return {"index": index, "message": message, "finish_reason": None, "logprobs": None}
    return {"index": index, "text": "", "finish_reason": None, "logprobs": None}


def _add_delta(message: dict[str, Any], delta: dict[str, Any]) -> None:
    if delta.get("role"):
        message["role"] = delta["role"]
    if delta.get("content") is not None:
        message["content"] = (message["content"] or "") + delta["content"]
    if delta.get("refusal") is not None:
        message["refusal"] = (message.get("refusal") or "") + delta["refusal"]
    for call in delta.get("tool_calls") or ():
        calls = message.setdefault("tool_calls", [])
        index = call.get("index", len(calls))
        while len(calls) <= index:
            calls.append(
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
        into = calls[index]
        if call.get("id"):
            into["id"] = call["id"]
        function = call.get("function") or {}
        into["function"]["name"] += function.get("name") or ""
        into["function"]["arguments"] += function.get("arguments") or ""


class Recorder:
    """Wraps the stream the client gets, keeping a copy of its events for the cache."""

    __slots__ = ("blocks", "limit", "overflowed")

    def __init__(self, limit: int) -> None:
        self.blocks: list[bytes] = []
        self.limit = limit  # bytes beyond which the answer is not kept
        self.overflowed = False

    def __call__(self, reply: StreamReply) -> StreamReply:
        # Closing it closes the inner reply whole (its events, then its own close).
        return StreamReply(self._copy(reply.events), reply.aclose, reply.headers, reply.finished)

    async def _copy(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        size = 0
        async for block in events:
            if not self.overflowed:
                size += len(block)
                if size > self.limit:
                    self.overflowed, self.blocks = True, []
                else:
                    self.blocks.append(block)
            yield block

    def events(self) -> bytes | None:
        return None if self.overflowed else b"".join(self.blocks)
