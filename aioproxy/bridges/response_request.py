"""A Responses API request as a chat-completions request: input items, tools, text format.

What the bridge reads of the request is decoded from each field's bytes straight into the
Structs below (other keys are skipped, never built; arrays are counted before they are built),
so that a value of the wrong type is a 400 naming its path. Fields chat takes as they are go on
as the client's bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

from ..errors import BadRequest
from ..fields import (
    ABSENT,
    BOOL,
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_TOOLS,
    NULL,
    ArrayOf,
    get_field,
    text_or_array,
)
from .common import unsupported

__all__ = ["ChatRequest", "chat_request", "input_messages"]


class ChatRequest(NamedTuple):
    """A Responses request as chat: the chat body (no ``model``), and what to store of it."""

    body: dict[str, Any]
    history: list[dict[str, Any]]  # the previous response's conversation, as chat messages
    inputs: list[dict[str, Any]]  # this request's ``input``, as chat messages
    echo: dict[str, Any]  # the request fields a Response repeats, as read


_FALSE = msgspec.Raw(b"false")


class _Part(msgspec.Struct):
    type: str | None = None
    text: str | None = None
    refusal: str | None = None
    image_url: str | None = None
    detail: str | None = None
    file_id: str | None = None
    file_data: str | None = None
    filename: str | None = None
    file_url: str | None = None
    input_audio: msgspec.Raw = ABSENT  # passed on to chat as sent


class _Item(msgspec.Struct):
    """An input item in a large array: the arrays in it stay raw, to be counted in turn."""

    type: str | None = None
    role: str | None = None
    content: msgspec.Raw = ABSENT  # a string or parts
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: msgspec.Raw = ABSENT  # a string or parts


class _SmallItem(msgspec.Struct):
    """An input item in a small array (see ArrayOf): decoded whole."""

    type: str | None = None
    role: str | None = None
    content: str | list[_Part] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[_Part] | None = None


class _Named(msgspec.Struct):
    """A type and a name: an allowed tool (allowed_tools' ``tools``), and the start of a tool,
    a tool choice and a text format."""

    type: str | None = None
    name: str | None = None


class _Tool(_Named):
    description: str | None = None
    parameters: msgspec.Raw = ABSENT  # a JSON schema, passed on as sent
    strict: bool | None = None


class _ToolChoice(_Named):
    mode: str = "auto"
    tools: msgspec.Raw = ABSENT  # allowed_tools' tools


class _Format(_Named):
    description: str | None = None
    schema: msgspec.Raw = ABSENT  # passed on as sent
    strict: bool | None = None


class _Text(msgspec.Struct):
    format: _Format | None = None
    verbosity: str | None = None


class _Reasoning(msgspec.Struct):
    effort: str | None = None


_ITEMS: ArrayOf[_Item | _SmallItem] = ArrayOf(_Item, MAX_MESSAGES, _SmallItem)
_PARTS: ArrayOf[_Part] = ArrayOf(_Part, MAX_CONTENT_PARTS)
_TOOLS: ArrayOf[_Tool] = ArrayOf(_Tool, MAX_TOOLS)
_ALLOWED_TOOLS: ArrayOf[_Named] = ArrayOf(_Named, MAX_TOOLS)
_CHOICE = msgspec.json.Decoder(str | _ToolChoice | None)
_TEXT = msgspec.json.Decoder(_Text | None)
_REASONING = msgspec.json.Decoder(_Reasoning | None)

# Fields chat takes under the same name and meaning: passed on as sent, for chat to check.
_SAME_NAME = (
    "temperature",
    "top_p",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
)

# Request fields a Response repeats, as sent (``tools`` and ``text`` are repeated as read).
_ECHOED = (
    "instructions",
    "max_output_tokens",
    "max_tool_calls",
    "metadata",
    "parallel_tool_calls",
    "previous_response_id",
    "reasoning",
    "service_tier",
    "temperature",
    "tool_choice",
    "top_p",
    "truncation",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "top_logprobs",
)

# Requests the bridge cannot honour; refused rather than silently answered otherwise.
_REFUSED: dict[str, str] = {
    "background": "background responses",
    "conversation": "conversations",
    "prompt": "prompt templates",
}

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def chat_request(
    fields: Mapping[str, msgspec.Raw], history: Sequence[dict[str, Any]] = ()
) -> ChatRequest:
    """The chat-completions body for a Responses request (its raw top-level ``fields``), after
    ``history``."""
    for name, what in _REFUSED.items():
        if fields.get(name, NULL) not in (NULL, _FALSE):
            raise unsupported(what.capitalize() + " are", name)

    messages: list[dict[str, Any]] = []
    instructions = text_or_array(fields.get("instructions", ABSENT), _ITEMS, "instructions")
    if isinstance(instructions, str):
        if instructions:
            messages.append({"role": "system", "content": instructions})
    elif instructions is not None:
        messages.extend(_messages(instructions, "instructions"))
    messages.extend(history)
    inputs = input_messages(fields.get("input", ABSENT))
    messages.extend(inputs)
    if history and len(messages) > MAX_MESSAGES:  # the input is bounded alone; with it too
        raise BadRequest(
            f"The conversation is too long to continue: with 'previous_response_id' it comes to"
            f" {len(messages)} messages, more than the {MAX_MESSAGES} allowed",
            param="previous_response_id",
            code="array_above_max_length",
        )
    if not history and not inputs:
        raise BadRequest(
            "Missing required parameter: 'input'", param="input", code="missing_required_parameter"
        )

    chat: dict[str, Any] = {"messages": messages}
    # Absent and null alike are not sent.
    sent = {name: raw for name, raw in fields.items() if raw != NULL}
    echo: dict[str, Any] = {name: sent[name] for name in _ECHOED if name in sent}
    chat.update((name, sent[name]) for name in _SAME_NAME if name in sent)
    if "max_output_tokens" in sent:
        chat["max_completion_tokens"] = sent["max_output_tokens"]
    tools = _tools(_TOOLS.decode(fields.get("tools", ABSENT), "tools") or [])
    echo["tools"] = [_echoed_tool(tool) for tool in tools]
    choice = get_field(fields, "tool_choice", _CHOICE)
    if tools:
        chat["tools"] = tools
        parallel = get_field(fields, "parallel_tool_calls", BOOL)
        if parallel is not None:
            chat["parallel_tool_calls"] = parallel
        if choice is not None:
            chat["tool_choice"] = _tool_choice(choice)
    elif choice not in (None, "auto", "none"):
        raise BadRequest("'tool_choice' needs 'tools'", param="tool_choice", code="invalid_value")
    text = get_field(fields, "text", _TEXT)
    if text is not None:
        response_format = _response_format(text.format)
        if response_format is not None:
            chat["response_format"] = response_format
        if text.verbosity is not None:
            chat["verbosity"] = text.verbosity
        echo["text"] = _echoed_text(text)
    reasoning = get_field(fields, "reasoning", _REASONING)
    if reasoning is not None and reasoning.effort is not None:
        chat["reasoning_effort"] = reasoning.effort
    if get_field(fields, "stream", BOOL):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return ChatRequest(chat, list(history), inputs, echo)


def input_messages(value: msgspec.Raw | bytes, param: str = "input") -> list[dict[str, Any]]:
    """Responses input (its JSON: a string, or a list of items) as chat messages."""
    items = text_or_array(value, _ITEMS, param)
    if items is None:
        return []
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    return _messages(items, param)


def _messages(items: list[_Item | _SmallItem], param: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        kind = item.type or ("message" if item.role is not None else "item_reference")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            _add_tool_call(messages, item, where)
        elif kind == "function_call_output":
            messages.append(_tool_message(item, where))
        elif kind == "reasoning":
            continue  # chat has no way to take reasoning back; the model reasons afresh
        else:
            raise unsupported(f"Input items of type '{kind}' are", where)
    return messages


def _required(value: Any, name: str, where: str) -> Any:
    if value is None:
        raise BadRequest(
            f"Missing or invalid '{where}.{name}'", param=f"{where}.{name}", code="invalid_value"
        )
    return value


def _message(item: _Item | _SmallItem, where: str) -> dict[str, Any]:
    role = _ROLES.get(item.role or "")
    if role is None:
        raise BadRequest(
            f"'{where}.role' must be one of user, assistant, system, developer",
            param=f"{where}.role",
            code="invalid_value",
        )
    content = text_or_array(item.content, _PARTS, f"{where}.content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if content is None:
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
                raise unsupported(
                    f"'{part['type']}' parts in {role} messages are", f"{where}.content[{j}]"
                )
            texts.append(part["text"])
        return {"role": role, "content": "".join(texts)}
    return {"role": role, "content": parts}


def _part(part: _Part, where: str) -> dict[str, Any]:
    """One content part of an input message, as a chat content part."""
    kind = part.type
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": _required(part.text, "text", where)}
    if kind == "refusal":
        return {"type": "text", "text": _required(part.refusal, "refusal", where)}
    if kind == "input_image":
        if part.image_url is None:
            # An image by file_id: chat's image parts take URLs (data: URLs included) only.
            raise unsupported(
                "Images by 'file_id' are (send 'image_url', a URL or data: URL)", where
            )
        image: dict[str, Any] = {"url": part.image_url}
        if part.detail is not None:
            image["detail"] = part.detail
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        if part.file_url is not None:
            raise unsupported("Files by 'file_url' are (send 'file_id' or 'file_data')", where)
        file = {"file_id": part.file_id, "file_data": part.file_data, "filename": part.filename}
        return {"type": "file", "file": {k: v for k, v in file.items() if v is not None}}
    if kind == "input_audio":
        if not part.input_audio or memoryview(part.input_audio)[0] != ord("{"):
            raise BadRequest(
                f"Missing or invalid '{where}.input_audio'",
                param=f"{where}.input_audio",
                code="invalid_value",
            )
        return {"type": "input_audio", "input_audio": part.input_audio}
    raise unsupported(f"Content parts of type '{kind}' are", where)


def _add_tool_call(messages: list[dict[str, Any]], item: _Item | _SmallItem, where: str) -> None:
    """A function_call item joins the assistant message before it, as chat wants them."""
    call = {
        "id": _required(item.call_id, "call_id", where),
        "type": "function",
        "function": {
            "name": _required(item.name, "name", where),
            "arguments": item.arguments or "",
        },
    }
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
        if last.get("content") == "":
            last["content"] = None
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _tool_message(item: _Item | _SmallItem, where: str) -> dict[str, Any]:
    output = text_or_array(item.output, _PARTS, f"{where}.output")
    if isinstance(output, list):
        texts = []
        for j, part in enumerate(output):
            converted = _part(part, f"{where}.output[{j}]")
            if converted["type"] != "text":
                raise unsupported(
                    f"'{converted['type']}' parts in function_call_output are",
                    f"{where}.output[{j}]",
                )
            texts.append(converted["text"])
        output = "".join(texts)
    elif output is None:
        raise BadRequest(
            f"'{where}.output' must be a string or an array of parts",
            param=f"{where}.output",
            code="invalid_type",
        )
    call_id = _required(item.call_id, "call_id", where)
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _tools(tools: list[_Tool]) -> list[dict[str, Any]]:
    converted = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if tool.type != "function":
            raise unsupported(f"Tools of type '{tool.type}' are", where)
        function: dict[str, Any] = {"name": _required(tool.name, "name", where)}
        if tool.description is not None:
            function["description"] = tool.description
        if tool.parameters and tool.parameters != NULL:
            function["parameters"] = tool.parameters
        if tool.strict is not None:
            function["strict"] = tool.strict
        converted.append({"type": "function", "function": function})
    return converted


def _echoed_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A chat tool as a Response lists it: ``parameters`` and ``strict`` always there (null: not
    sent, and so not enforced, as chat does not by default)."""
    return {"type": "function", "parameters": None, "strict": None, **tool["function"]}


def _echoed_text(text: _Text) -> dict[str, Any]:
    fmt = text.format
    echoed: dict[str, Any] = {"format": {"type": "text"}}
    if fmt is not None and fmt.type not in (None, "text"):
        sent = msgspec.structs.asdict(fmt).items()
        echoed["format"] = {k: v for k, v in sent if v is not None and v != ABSENT}
    if text.verbosity is not None:
        echoed["verbosity"] = text.verbosity
    return echoed


def _tool_choice(choice: str | _ToolChoice) -> Any:
    if isinstance(choice, str):
        return choice
    if choice.type == "function":
        return {
            "type": "function",
            "function": {"name": _required(choice.name, "name", "tool_choice")},
        }
    if choice.type == "allowed_tools":
        allowed = []
        tools = _ALLOWED_TOOLS.decode(choice.tools, "tool_choice.tools") or []
        for tool in tools:
            if tool.type != "function":
                raise unsupported("Allowed tools other than functions are", "tool_choice")
            allowed.append({"type": "function", "function": {"name": tool.name}})
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice.mode, "tools": allowed}}
    raise unsupported(f"tool_choice '{choice.type}' is", "tool_choice")


def _response_format(fmt: _Format | None) -> dict[str, Any] | None:
    if fmt is None or fmt.type in (None, "text"):
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.type == "json_schema":
        schema: dict[str, Any] = {"name": _required(fmt.name, "name", "text.format")}
        if fmt.schema and fmt.schema != NULL:
            schema["schema"] = fmt.schema
        if fmt.strict is not None:
            schema["strict"] = fmt.strict
        if fmt.description is not None:
            schema["description"] = fmt.description
        return {"type": "json_schema", "json_schema": schema}
    raise unsupported(f"text.format '{fmt.type}' is", "text.format")
