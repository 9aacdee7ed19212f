"""The Responses API (``/v1/responses``) served by a provider that only has chat completions.

The request becomes a chat request (``chat_request``), the chat answer becomes a Response
(``ResponseBuilder``), and a chat stream becomes the Responses event sequence, one event per chat
delta as it arrives. With a store, each response is kept with its conversation as chat messages,
so that ``previous_response_id`` prepends it to the next request.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import msgspec

from ..context import Call
from ..errors import BadGateway, BadRequest, NotFound, ProxyError
from ..providers import JSONReply, ProviderMethod, Reply, StreamReply
from ..streaming import sse_event
from ..upstream import failure_from
from .common import chat_call, data_of, events_of, first_event, once, text_of
from .store import ResponseStore

__all__ = [
    "ChatRequest",
    "ResponseBuilder",
    "chat_request",
    "input_messages",
    "make_responses_bridge",
    "response_from_chat",
]

log = logging.getLogger("aioproxy")

_encode = msgspec.json.Encoder().encode


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(24)


# -- request: Responses -> chat ------------------------------------------------------------


class ChatRequest(NamedTuple):
    """A Responses request as chat: the chat body (no ``model``), and what to store of it."""

    body: dict[str, Any]
    history: list[dict[str, Any]]  # the previous response's conversation, as chat messages
    inputs: list[dict[str, Any]]  # this request's ``input``, as chat messages


# Fields chat takes under the same name and meaning.
_SAME_NAME = (
    "temperature",
    "top_p",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
)

# Requests the bridge cannot honour; refused rather than silently answered otherwise.
_REFUSED: dict[str, str] = {
    "background": "background responses",
    "conversation": "conversations",
    "prompt": "prompt templates",
}

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def _unsupported(what: str, param: str) -> BadRequest:
    return BadRequest(
        f"{what} not supported by this model: its provider only serves chat completions",
        param=param,
        code="unsupported_parameter",
    )


def chat_request(body: dict[str, Any], history: Sequence[dict[str, Any]] = ()) -> ChatRequest:
    """The chat-completions body for a Responses request ``body``, after ``history``."""
    for name, what in _REFUSED.items():
        if body.get(name):
            raise _unsupported(what.capitalize() + " are", name)

    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        if instructions:
            messages.append({"role": "system", "content": instructions})
    elif isinstance(instructions, list):
        messages.extend(input_messages(instructions, "instructions"))
    elif instructions is not None:
        raise BadRequest(
            "'instructions' must be a string", param="instructions", code="invalid_type"
        )
    messages.extend(history)
    inputs = input_messages(body.get("input"))
    messages.extend(inputs)
    if not history and not inputs:
        raise BadRequest(
            "Missing required parameter: 'input'", param="input", code="missing_required_parameter"
        )

    chat: dict[str, Any] = {"messages": messages}
    for name in _SAME_NAME:
        value = body.get(name)
        if value is not None:
            chat[name] = value
    max_output_tokens = body.get("max_output_tokens")
    if max_output_tokens is not None:
        chat["max_completion_tokens"] = max_output_tokens
    tools = body.get("tools")
    if tools:
        chat["tools"] = _tools(tools)
        if body.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = _tool_choice(body["tool_choice"])
    elif body.get("tool_choice") not in (None, "auto", "none"):
        raise BadRequest("'tool_choice' needs 'tools'", param="tool_choice", code="invalid_value")
    text = body.get("text")
    if isinstance(text, dict):
        response_format = _response_format(text.get("format"))
        if response_format is not None:
            chat["response_format"] = response_format
        if text.get("verbosity") is not None:
            chat["verbosity"] = text["verbosity"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return ChatRequest(chat, list(history), inputs)


def input_messages(value: Any, param: str = "input") -> list[dict[str, Any]]:
    """Responses input (a string, or a list of items) as chat messages."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise BadRequest(
            f"'{param}' must be a string or an array of items", param=param, code="invalid_type"
        )
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"'{where}' must be an object", param=where, code="invalid_type")
        kind = item.get("type") or ("message" if "role" in item else "item_reference")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            _add_tool_call(messages, item, where)
        elif kind == "function_call_output":
            messages.append(_tool_message(item, where))
        elif kind == "reasoning":
            continue  # chat has no way to take reasoning back; the model reasons afresh
        else:
            raise _unsupported(f"Input items of type '{kind}' are", where)
    return messages


def _required(item: dict[str, Any], name: str, where: str, kind: type = str) -> Any:
    value = item.get(name)
    if not isinstance(value, kind):
        raise BadRequest(
            f"Missing or invalid '{where}.{name}'", param=f"{where}.{name}", code="invalid_value"
        )
    return value


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise BadRequest(
            f"'{where}.role' must be one of user, assistant, system, developer",
            param=f"{where}.role",
            code="invalid_value",
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise BadRequest(
            f"'{where}.content' must be a string or an array of parts",
            param=f"{where}.content",
            code="invalid_type",
        )
    parts = [_part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]
    if role != "user":  # chat takes only text from these roles; a string is the safest form
        texts = []
        for j, part in enumerate(parts):
            if part["type"] != "text":
                raise _unsupported(
                    f"'{part['type']}' parts in {role} messages are", f"{where}.content[{j}]"
                )
            texts.append(part["text"])
        return {"role": role, "content": "".join(texts)}
    return {"role": role, "content": parts}


def _part(part: Any, where: str) -> dict[str, Any]:
    """One content part of an input message, as a chat content part."""
    if not isinstance(part, dict):
        raise BadRequest(f"'{where}' must be an object", param=where, code="invalid_type")
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": _required(part, "text", where)}
    if kind == "refusal":
        return {"type": "text", "text": _required(part, "refusal", where)}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            # An image by file_id: chat's image parts take URLs (data: URLs included) only.
            raise _unsupported(
                "Images by 'file_id' are (send 'image_url', a URL or data: URL)", where
            )
        image: dict[str, Any] = {"url": url}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        if part.get("file_url") is not None:
            raise _unsupported("Files by 'file_url' are (send 'file_id' or 'file_data')", where)
        file = {k: part[k] for k in ("file_id", "file_data", "filename") if part.get(k) is not None}
        return {"type": "file", "file": file}
    if kind == "input_audio":
        return {"type": "input_audio", "input_audio": _required(part, "input_audio", where, dict)}
    raise _unsupported(f"Content parts of type '{kind}' are", where)


def _add_tool_call(messages: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    """A function_call item joins the assistant message before it, as chat wants them."""
    call = {
        "id": _required(item, "call_id", where),
        "type": "function",
        "function": {
            "name": _required(item, "name", where),
            "arguments": item.get("arguments") or "",
        },
    }
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
        if last.get("content") == "":
            last["content"] = None
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _tool_message(item: dict[str, Any], where: str) -> dict[str, Any]:
    output = item.get("output")
    if isinstance(output, list):
        texts = []
        for j, part in enumerate(output):
            converted = _part(part, f"{where}.output[{j}]")
            if converted["type"] != "text":
                raise _unsupported(
                    f"'{converted['type']}' parts in function_call_output are",
                    f"{where}.output[{j}]",
                )
            texts.append(converted["text"])
        output = "".join(texts)
    elif not isinstance(output, str):
        raise BadRequest(
            f"'{where}.output' must be a string or an array of parts",
            param=f"{where}.output",
            code="invalid_type",
        )
    return {"role": "tool", "tool_call_id": _required(item, "call_id", where), "content": output}


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array", param="tools", code="invalid_type")
    converted = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise _unsupported(f"Tools of type '{kind}' are", where)
        function = {"name": _required(tool, "name", where)}
        for name in ("description", "parameters", "strict"):
            if tool.get(name) is not None:
                function[name] = tool[name]
        converted.append({"type": "function", "function": function})
    return converted


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function":
            return {
                "type": "function",
                "function": {"name": _required(choice, "name", "tool_choice")},
            }
        if kind == "allowed_tools":
            allowed = []
            for tool in choice.get("tools") or []:
                if not isinstance(tool, dict) or tool.get("type") != "function":
                    raise _unsupported("Allowed tools other than functions are", "tool_choice")
                allowed.append({"type": "function", "function": {"name": tool.get("name")}})
            mode = choice.get("mode", "auto")
            return {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": allowed}}
    kind = choice.get("type") if isinstance(choice, dict) else choice
    raise _unsupported(f"tool_choice '{kind}' is", "tool_choice")


def _response_format(fmt: Any) -> dict[str, Any] | None:
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    kind = fmt["type"]
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {"name": _required(fmt, "name", "text.format")}
        for name in ("schema", "strict", "description"):
            if fmt.get(name) is not None:
                schema[name] = fmt[name]
        return {"type": "json_schema", "json_schema": schema}
    raise _unsupported(f"text.format '{kind}' is", "text.format")


# -- answer: chat -> Responses -------------------------------------------------------------


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Message(msgspec.Struct):
    content: Any = None  # a string; some providers send a list of parts
    refusal: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    message: _Message | None = None  # a whole answer
    delta: _Message | None = None  # a stream chunk
    finish_reason: str | None = None


class _ChatAnswer(msgspec.Struct):
    """A chat completion or one of its stream chunks (or an error event): what the bridge reads."""

    choices: list[_Choice] = []
    usage: dict[str, Any] | None = None
    error: Any = None


_decode_answer = msgspec.json.Decoder(_ChatAnswer).decode


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
    __slots__ = ("kind", "chunks")

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "output_text" or "refusal"
        self.chunks: list[str] = []

    def text(self) -> str:
        return "".join(self.chunks)

    def snapshot(self) -> dict[str, Any]:
        if self.kind == "refusal":
            return {"type": "refusal", "refusal": self.text()}
        return {"type": "output_text", "text": self.text(), "annotations": [], "logprobs": []}


class _MessageItem:
    __slots__ = ("id", "output_index", "parts", "status")

    def __init__(self, output_index: int) -> None:
        self.id = new_id("msg_")
        self.output_index = output_index
        self.parts: list[_Part] = []
        self.status = "in_progress"

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "status": self.status,
            "role": "assistant",
            "content": [part.snapshot() for part in self.parts],
        }


class _CallItem:
    __slots__ = ("id", "output_index", "call_id", "name", "chunks", "status")

    def __init__(self, output_index: int, call_id: str, name: str) -> None:
        self.id = new_id("fc_")
        self.output_index = output_index
        self.call_id = call_id
        self.name = name
        self.chunks: list[str] = []
        self.status = "in_progress"

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function_call",
            "status": self.status,
            "call_id": self.call_id,
            "name": self.name,
            "arguments": "".join(self.chunks),
        }


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

    def start(self) -> list[bytes]:
        response = self.response("in_progress")
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def feed(self, answer: _ChatAnswer) -> list[bytes]:
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
            events += self._close_current()
            item = _MessageItem(len(self.items))
            self.items.append(item)
            self.current = item
            events.append(
                self._event(
                    "response.output_item.added",
                    output_index=item.output_index,
                    item=item.snapshot(),
                )
            )
        part = item.parts[-1] if item.parts else None
        if part is None or part.kind != kind:
            if part is not None:
                events += self._close_part(item)
            part = _Part(kind)
            item.parts.append(part)
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.id,
                    output_index=item.output_index,
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
                self._event(
                    "response.refusal.delta",
                    item_id=item.id,
                    output_index=item.output_index,
                    content_index=content_index,
                    delta=delta,
                )
            )
        return events

    def _tool_call(self, index: int, delta: _ToolCall) -> list[bytes]:
        events: list[bytes] = []
        function = delta.function or _Function()
        item = self.calls.get(index)
        if item is None:
            events += self._close_current()
            item = _CallItem(len(self.items), delta.id or new_id("call_"), function.name or "")
            self.items.append(item)
            self.calls[index] = item
            self.current = item
            events.append(
                self._event(
                    "response.output_item.added",
                    output_index=item.output_index,
                    item=item.snapshot(),
                )
            )
        elif function.name and function.name != item.name:
            item.name += function.name  # a provider that streams the name in pieces
        if function.arguments:
            item.chunks.append(function.arguments)
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.id,
                    output_index=item.output_index,
                    delta=function.arguments,
                )
            )
        return events

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
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=item.output_index,
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
    builder.feed(_decode_answer(raw))
    builder.finish()
    assert builder.final is not None
    return builder.final


# -- the bridge ----------------------------------------------------------------------------


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
        body = call.json()
        history: list[dict[str, Any]] = []
        previous_id = body.get("previous_response_id")
        if previous_id is not None:
            history = await _history(store, call, previous_id)
        request = chat_request(body, history)
        keep = store is not None and body.get("store") is not False
        builder = ResponseBuilder(body, call.model, store=keep)
        reply = await chat(chat_call(call, request.body))

        async def save() -> None:
            if keep and store is not None:
                await _save(store, call, builder, request)

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
        await save()
        assert builder.final is not None
        return JSONReply.of(builder.final)

    return responses


async def _history(
    store: ResponseStore | None, call: Call, previous_id: Any
) -> list[dict[str, Any]]:
    if not isinstance(previous_id, str):
        raise BadRequest(
            "'previous_response_id' must be a string",
            param="previous_response_id",
            code="invalid_type",
        )
    if store is None:
        raise BadRequest(
            "'previous_response_id' needs the response store, which is disabled on this proxy",
            param="previous_response_id",
            code="unsupported_parameter",
        )
    found = await store.get(previous_id, call.principal.name)
    if found is None:
        raise NotFound(
            f"Previous response with id '{previous_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return found[1]


async def _save(
    store: ResponseStore, call: Call, builder: ResponseBuilder, request: ChatRequest
) -> None:
    assert builder.final is not None
    conversation = [*request.history, *request.inputs, builder.chat_message()]
    try:
        await store.save(builder.id, call.principal.name, builder.final, conversation)
    except Exception:  # the answer is still good; only chaining onto it will fail
        log.exception("could not store response %s", builder.id)


def _decode(data: bytes, call: Call) -> _ChatAnswer:
    try:
        return _decode_answer(data)
    except msgspec.DecodeError:
        where = call.deployment.describe() if call.deployment else "the upstream"
        raise BadGateway(
            f"Deployment {where} sent a chat completion the bridge cannot read",
            code="upstream_invalid_response",
        ) from None


def _whole_answer(data: bytes, call: Call) -> _ChatAnswer:
    answer = _decode(data, call)
    if answer.error is not None:
        raise _error_from(answer.error, call)
    return answer


async def _translate(
    builder: ResponseBuilder,
    reply: StreamReply,
    first: bytes | None,
    call: Call,
    save: Callable[[], Awaitable[None]] | None,
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
                where = call.deployment.describe() if call.deployment else "the upstream"
                raise BadGateway(
                    f"Deployment {where} ended its stream before it was complete",
                    code="upstream_stream_incomplete",
                )
        except Exception as exc:
            if not isinstance(exc, ProxyError):
                log.warning("the chat stream of a bridged response failed: %r", exc)
            for out in builder.fail(failure_from(exc, call.deployment)):
                yield out
            return
        final = builder.finish()
        await close()  # release the chat stream's connection before the disk write
        if save is not None:
            await save()
        for out in final:
            yield out
    finally:
        await close()


async def _whole(
    builder: ResponseBuilder, reply: JSONReply, call: Call, save: Callable[[], Awaitable[None]]
) -> AsyncIterator[bytes]:
    """The event sequence for a whole chat answer (a provider that did not stream)."""
    answer = _whole_answer(reply.body, call)
    events = builder.start()
    events += builder.feed(answer)
    events += builder.finish()
    await save()
    for event in events:
        yield event
