"""Chat completions answers as Anthropic Messages (the Messages bridge's way out): a whole
answer as a Message, a chat stream as Anthropic's event sequence, chunk by chunk as it comes.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec

from ..errors import BadGateway
from ..streaming import sse_event
from .common import ChatChoice, ChatFunction, ChatMessage, ChatToolCall, text_of

_encode = msgspec.json.Encoder().encode

__all__ = ["MessageStream", "decode_chunk", "message_events", "message_from_chat"]

# chat's finish_reason -> Anthropic's stop_reason.
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _Details | None = None


class ChatAnswer(msgspec.Struct):
    """A chat completion or chunk, as far as a Message needs it."""

    choices: list[ChatChoice] = []
    usage: _Usage | None = None
    error: Any = None


_decode = msgspec.json.Decoder(ChatAnswer).decode


def decode_chunk(data: bytes) -> ChatAnswer:
    """A chat completion or chunk; a 502 if it is not one."""
    try:
        return _decode(data)
    except (msgspec.DecodeError, RecursionError):
        raise BadGateway(
            "The chat provider sent an answer the Messages bridge cannot read",
            code="upstream_invalid_response",
        ) from None


def _message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def _usage(usage: _Usage | None) -> dict[str, int]:
    """Chat usage in Anthropic's terms: ``input_tokens`` leave out cache reads, as there."""
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    cached = (usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens) or 0
    return {
        "input_tokens": max(0, (usage.prompt_tokens or 0) - cached),
        "output_tokens": usage.completion_tokens or 0,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def _tool_input(arguments: str | None) -> Any:
    try:
        value = msgspec.json.decode(arguments or "{}")
    except msgspec.DecodeError:
        value = None
    if not isinstance(value, dict):
        raise BadGateway(
            "The model called a tool with arguments that are not a JSON object",
            code="upstream_invalid_response",
        )
    return value


def message_from_chat(answer: ChatAnswer, model: str) -> dict[str, Any]:
    """A whole chat completion as a Message (its first choice: a Message has one)."""
    content: list[dict[str, Any]] = []
    stop_reason = "end_turn"
    if answer.choices:
        choice = answer.choices[0]
        message = choice.message or choice.delta or ChatMessage()
        text = text_of(message.content) or message.refusal or ""
        if text:
            content.append({"type": "text", "text": text})
        for call in message.tool_calls or ():
            function = call.function or ChatFunction()
            content.append(
                {
                    "type": "tool_use",
                    "id": call.id or "toolu_" + secrets.token_hex(12),
                    "name": function.name or "",
                    "input": _tool_input(function.arguments),
                }
            )
        stop_reason = _STOP_REASONS.get(choice.finish_reason or "stop", "end_turn")
        if message.refusal and not message.content:
            stop_reason = "refusal"
    return {
        "id": _message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _usage(answer.usage),
    }


def message_events(message: dict[str, Any]) -> bytes:
    """A whole Message as the event sequence a stream of it would have been."""
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    usage = message.get("usage") or {}
    start["usage"] = {**usage, "output_tokens": 0}
    events = [sse_event("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message.get("content") or ()):
        if block.get("type") == "tool_use":
            opening = {**block, "input": {}}
            delta = {
                "type": "input_json_delta",
                "partial_json": msgspec.json.encode(block["input"]).decode(),
            }
        else:
            opening = {**block, "text": ""}
            delta = {"type": "text_delta", "text": block.get("text", "")}
        events.append(_block_start(index, opening))
        events.append(_block_delta(index, delta))
        events.append(_block_stop(index))
    final = {
        "stop_reason": message.get("stop_reason"),
        "stop_sequence": message.get("stop_sequence"),
    }
    events.append(_message_delta(final, usage))
    events.append(_MESSAGE_STOP)
    return b"".join(events)


def _block_start(index: int, block: dict[str, Any]) -> bytes:
    return sse_event(
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )


def _block_delta(index: int, delta: dict[str, Any]) -> bytes:
    return sse_event(
        "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    )


# The delta events (one per token) spliced from constant bytes around the encoded piece: the
# hot path of a translated stream, about a third of the cost of encoding the event's dict.
_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_TEXT_DELTA = b',"delta":{"type":"text_delta","text":'
_JSON_DELTA = b',"delta":{"type":"input_json_delta","partial_json":'
_DELTA_END = b"}}\n\n"


def _delta_event(head: bytes, kind: bytes, piece: str) -> bytes:
    """``head``: _DELTA_HEAD and the block's index, made once per block (``MessageStream._open``)."""
    return b"".join((head, kind, _encode(piece), _DELTA_END))


def _block_stop(index: int) -> bytes:
    return sse_event("content_block_stop", {"type": "content_block_stop", "index": index})


def _message_delta(delta: dict[str, Any], usage: dict[str, Any]) -> bytes:
    return sse_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})


_PING = sse_event("ping", {"type": "ping"})
_MESSAGE_STOP = sse_event("message_stop", {"type": "message_stop"})


class MessageStream:
    """Chat chunks in, Anthropic events out: ``start`` once, ``feed`` each chunk, ``finish``.

    A block is open at a time: text deltas go to a text block, each tool call's argument
    pieces to its tool_use block; a change of kind (or of tool call) closes the block open.
    """

    __slots__ = (
        "_block",
        "_head",
        "_index",
        "_tool",
        "_tool_id",
        "finished",
        "model",
        "stop_reason",
        "usage",
    )

    def __init__(self, model: str) -> None:
        self.model = model
        self._index = -1  # the open block's index (-1: none opened yet)
        self._head = b""  # its delta events' first bytes (_delta_event)
        self._block: str | None = None  # "text", "tool_use" or None (none open)
        self._tool = -1  # the chat index of the tool call whose block is open
        self._tool_id: str | None = None  # and its id
        self.stop_reason: str | None = None
        self.usage: _Usage | None = None
        self.finished = False

    def start(self) -> bytes:
        message: dict[str, Any] = {
            "id": _message_id(),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return sse_event("message_start", {"type": "message_start", "message": message}) + _PING

    def feed(self, chunk: ChatAnswer, out: list[bytes]) -> None:
        """Append the events ``chunk`` gives to ``out``."""
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices:
            if choice.index:
                continue  # a Message has one choice
            delta = choice.delta or choice.message
            if delta is not None:
                text = text_of(delta.content) or delta.refusal
                if text:
                    if self._block != "text":
                        self._open(out, {"type": "text", "text": ""}, "text")
                    out.append(_delta_event(self._head, _TEXT_DELTA, text))
                for call in delta.tool_calls or ():
                    self._tool_piece(call, out)
            if choice.finish_reason is not None:
                self.stop_reason = _STOP_REASONS.get(choice.finish_reason, "end_turn")

    def _tool_piece(self, call: ChatToolCall, out: list[bytes]) -> None:
        """A tool call's piece: a new call (another index, or another id at the same index, as
        some servers number them) opens its tool_use block; arguments are its JSON deltas."""
        function = call.function or ChatFunction()
        if (
            self._block != "tool_use"
            or call.index != self._tool
            or (call.id is not None and call.id != self._tool_id)
        ):
            self._tool, self._tool_id = call.index, call.id
            block = {
                "type": "tool_use",
                "id": call.id or "toolu_" + secrets.token_hex(12),
                "name": function.name or "",
                "input": {},
            }
            self._open(out, block, "tool_use")
        if function.arguments:
            out.append(_delta_event(self._head, _JSON_DELTA, function.arguments))

    def _open(self, out: list[bytes], block: dict[str, Any], kind: str) -> None:
        if self._block is not None:
            out.append(_block_stop(self._index))
        self._index += 1
        self._head = _DELTA_HEAD + str(self._index).encode()
        self._block = kind
        out.append(_block_start(self._index, block))

    def finish(self) -> bytes:
        """The closing events: the open block's stop, message_delta (with usage), message_stop."""
        self.finished = True
        events = [_block_stop(self._index)] if self._block is not None else []
        self._block = None
        final = {"stop_reason": self.stop_reason or "end_turn", "stop_sequence": None}
        events.append(_message_delta(final, _usage(self.usage)))
        events.append(_MESSAGE_STOP)
        return b"".join(events)
