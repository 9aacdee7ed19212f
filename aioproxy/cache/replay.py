"""A cached answer in the form the request asks for: a stream's events as they were sent, a
JSON body as one stream (``json_as_sse``), or a stream put together as the JSON answer.

A chat or legacy completions stream's usage-only chunk (``"choices": []``) is kept apart from
its events and sent only to a request that asks for it (``stream_options.include_usage``),
whatever the request that filled the entry asked: ``stream_options`` is not part of the key,
and a client that did not ask breaks on a chunk without choices (``chunk.choices[0]``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from ..providers import JSONReply, Reply, StreamReply
from ..routes import Kind
from ..streaming import DONE, json_as_sse, sse_event
from .stores import Entry

__all__ = ["Recorder", "replay", "split_usage"]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
_USAGE_KINDS = frozenset({Kind.CHAT_COMPLETIONS, Kind.COMPLETIONS})  # with a usage-only chunk
_MARKERS = (b'"usage":{', b'"usage": {')


def replay(kind: Kind, entry: Entry, stream: bool, usage: bool) -> Reply:
    """``entry`` as a stream or JSON; ``usage``: the request asks for the usage chunk."""
    if entry.form == "stream":
        events = _with_usage(entry.body, entry.usage) if usage or not stream else entry.body
        return StreamReply(_once(events)) if stream else JSONReply(stream_as_json(kind, events))
    if not stream:
        return JSONReply(entry.body)
    if kind is Kind.RESPONSES:
        return StreamReply(_once(response_as_events(entry.body)))
    events = json_as_sse(kind.value, entry.body)
    if not usage and kind in _USAGE_KINDS:
        events = split_usage(events)[0]
    return StreamReply(_once(events))


def response_as_events(body: bytes) -> bytes:
    """A Response object as the events of its stream, in OpenAI's order: created, in_progress,
    per output item its added, its parts' or arguments' deltas and dones, its done, then the
    final event (completed, incomplete or failed). Clients rebuild the Response from them: the
    SDK's stream helper refuses a stream that does not begin with ``response.created``."""
    response = _decode(body)
    if not isinstance(response, dict):
        return json_as_sse(Kind.RESPONSES.value, body)
    events: list[bytes] = []

    def add(kind: str, **fields: Any) -> None:
        events.append(sse_event(kind, {"type": kind, "sequence_number": len(events), **fields}))

    started = {**response, "status": "in_progress", "output": [], "usage": None}
    add("response.created", response=started)
    add("response.in_progress", response=started)
    for index, item in enumerate(response.get("output") or ()):
        add("response.output_item.added", output_index=index, item=_item_opened(item))
        where = {"item_id": item.get("id"), "output_index": index}
        if item.get("type") == "function_call":
            arguments = item.get("arguments", "")
            add("response.function_call_arguments.delta", **where, delta=arguments)
            add("response.function_call_arguments.done", **where, arguments=arguments)
        for part_index, part in enumerate(item.get("content") or ()):
            _add_part(add, {**where, "content_index": part_index}, part)
        add("response.output_item.done", output_index=index, item=item)
    status = response.get("status")
    final = status if status in ("incomplete", "failed") else "completed"
    add(f"response.{final}", response=response)
    return b"".join(events)


def _item_opened(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as its ``added`` event shows it: in progress, nothing in it yet."""
    opened = {**item, "status": "in_progress"}
    if item.get("type") == "message":
        opened["content"] = []
    elif item.get("type") == "function_call":
        opened["arguments"] = ""
    return opened


def _add_part(add: Callable[..., None], where: dict[str, Any], part: dict[str, Any]) -> None:
    """A message's content part: added empty, its text (or refusal) as one delta, done."""
    kind = part.get("type")
    field = "text" if kind == "output_text" else "refusal" if kind == "refusal" else None
    if field is None:  # nothing streamed for it: added whole
        add("response.content_part.added", **where, part=part)
    else:
        event = "response.output_text" if field == "text" else "response.refusal"
        text = part.get(field, "")
        add("response.content_part.added", **where, part={**part, field: ""})
        extra: dict[str, Any] = {"logprobs": []} if field == "text" else {}
        add(f"{event}.delta", **where, delta=text, **extra)
        add(f"{event}.done", **where, **{field: text}, **extra)
    add("response.content_part.done", **where, part=part)


def _with_usage(events: bytes, usage: bytes) -> bytes:
    """The usage chunk back in its place: last before ``[DONE]``."""
    if not usage:
        return events
    if events.endswith(DONE):
        return events[: -len(DONE)] + usage + DONE
    return events + usage


def split_usage(events: bytes) -> tuple[bytes, bytes]:
    """A stream's events without their usage-only chunk, and that chunk (b"": none). It is
    among the last events (OpenAI sends it just before ``[DONE]``): only those are read."""
    parts = events.split(b"\n\n")
    for index in range(len(parts) - 1, max(-1, len(parts) - 5), -1):
        part = parts[index]
        if any(marker in part for marker in _MARKERS) and _usage_only(part):
            chunk = part + b"\n\n"
            return b"\n\n".join(parts[:index] + parts[index + 1 :]), chunk
    return events, b""


def _usage_only(event: bytes) -> bool:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                chunk = _decode(line[5:])
            except msgspec.DecodeError:
                return False
            return isinstance(chunk, dict) and bool(chunk.get("usage")) and not chunk.get("choices")
    return False


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
