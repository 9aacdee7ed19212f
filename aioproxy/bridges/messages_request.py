"""Anthropic Messages requests as chat completions requests (the Messages bridge's way in).

Content is carried over or refused with a 400 that names its field (``messages.0.content.1``),
never dropped: text, images (base64 and URL), PDF and text documents, tool uses and results,
tool definitions and ``tool_choice``. Hints that only tune the call are mapped where chat has
an equivalent (``thinking`` -> ``reasoning_effort`` on a ``reasoning`` deployment,
``disable_parallel_tool_use`` -> ``parallel_tool_calls``) and otherwise ignored
(``cache_control``, ``top_k``, ``service_tier``, ``anthropic-beta``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..context import Call
from ..errors import BadRequest

__all__ = ["chat_request", "untranslatable"]

_encode = msgspec.json.Encoder().encode

# Content blocks that only tune a call or replay the model's own reasoning: skipped.
_SKIPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
# Anthropic's thinking budget -> chat's reasoning effort (the budget's upper bound, exclusive).
_EFFORTS = ((4096, "low"), (16384, "medium"))


def untranslatable(field: str, what: str) -> BadRequest:
    """The 400 for content a chat model cannot be given: it names the field."""
    return BadRequest(
        f"{field}: {what} cannot be translated for this model, which is served through chat "
        "completions",
        param=field,
        code="unsupported_content",
    )


def _invalid(field: str, expected: str) -> BadRequest:
    return BadRequest(f"{field}: {expected}", param=field, code="invalid_value")


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(field, "must be an object")
    return value


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _invalid(field, "must be a string")
    return value


def _blocks(content: Any, field: str) -> list[dict[str, Any]]:
    """Content as blocks: a string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _invalid(field, "must be a string or an array of content blocks")
    return [_object(block, f"{field}.{j}") for j, block in enumerate(content)]


def chat_request(call: Call, counting: bool = False) -> dict[str, Any]:
    """The chat completions body for a Messages request (``call``'s fields); a 400 for what a
    chat model cannot be given. ``counting``: a count_tokens request, which has no
    ``max_tokens``."""
    reasoning = call.deployment.reasoning
    messages: list[dict[str, Any]] = []
    system = call.get("system")
    if system is not None:
        text = _text_of(_blocks(system, "system"), "system")
        if text:
            messages.append({"role": "system", "content": text})
    turns = call.get("messages")
    if not isinstance(turns, list) or not turns:
        raise _invalid("messages", "must be a non-empty array of messages")
    for i, turn in enumerate(turns):
        field = f"messages.{i}"
        turn = _object(turn, field)
        role = turn.get("role")
        blocks = _blocks(turn.get("content"), f"{field}.content")
        if role == "user":
            messages += _user_turn(blocks, f"{field}.content")
        elif role == "assistant":
            messages.append(_assistant_turn(blocks, f"{field}.content"))
        else:
            raise _invalid(f"{field}.role", "must be 'user' or 'assistant'")
    body: dict[str, Any] = {"messages": messages}
    max_tokens = call.get("max_tokens")
    if max_tokens is not None or not counting:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _invalid("max_tokens", "is required: a positive integer")
        body["max_completion_tokens" if reasoning else "max_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        value = call.get(name)
        if value is not None:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise _invalid(name, "must be a number")
            body[name] = value
    stop = call.get("stop_sequences")
    if stop:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _invalid("stop_sequences", "must be an array of strings")
        body["stop"] = stop
    metadata = call.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        body["user"] = metadata["user_id"]
    if call.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # usage for message_delta
    _add_tools(call, body)
    if reasoning:
        effort = _effort(call.get("thinking"))
        if effort is not None:
            body["reasoning_effort"] = effort
    for name in ("mcp_servers", "container"):
        if call.get(name):
            raise untranslatable(name, "a server-side feature")
    return body


def _text_of(blocks: list[dict[str, Any]], field: str) -> str:
    """The text of blocks that may only be text (system prompts, tool results)."""
    texts = []
    for j, block in enumerate(blocks):
        if block.get("type") != "text":
            raise untranslatable(f"{field}.{j}", f"a '{block.get('type')}' block here")
        texts.append(_string(block.get("text"), f"{field}.{j}.text"))
    return "\n".join(texts)


def _user_turn(blocks: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    """A user turn: its tool results as tool messages (which must follow the assistant's
    tool calls), then the rest as one user message."""
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        where = f"{field}.{j}"
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _string(block.get("text"), f"{where}.text")})
        elif kind == "image":
            parts.append(_image(block, where))
        elif kind == "document":
            parts.append(_document(block, where))
        elif kind == "tool_result":
            results.append(_tool_result(block, where))
        elif kind in _SKIPPED_BLOCKS:
            continue
        else:
            raise untranslatable(f"{where}.type", f"a '{kind}' block")
    if not parts:
        return results
    if len(parts) == 1 and parts[0]["type"] == "text":
        return [*results, {"role": "user", "content": parts[0]["text"]}]
    return [*results, {"role": "user", "content": parts}]


def _source(block: dict[str, Any], where: str) -> dict[str, Any]:
    return _object(block.get("source"), f"{where}.source")


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = _source(block, where)
    kind = source.get("type")
    if kind == "base64":
        media = _string(source.get("media_type"), f"{where}.source.media_type")
        data = _string(source.get("data"), f"{where}.source.data")
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        url = _string(source.get("url"), f"{where}.source.url")
    else:
        raise untranslatable(f"{where}.source", f"an image of source type '{kind}'")
    return {"type": "image_url", "image_url": {"url": url}}


def _document(block: dict[str, Any], where: str) -> dict[str, Any]:
    """A PDF as chat's file part, text as a text part; a URL or a file id is refused (the
    gateway does not fetch, and the target cannot read Anthropic's files)."""
    source = _source(block, where)
    kind = source.get("type")
    title = block.get("title")
    if kind == "base64":
        media = _string(source.get("media_type"), f"{where}.source.media_type")
        if media != "application/pdf":
            raise untranslatable(f"{where}.source.media_type", f"a '{media}' document")
        data = _string(source.get("data"), f"{where}.source.data")
        name = title if isinstance(title, str) and title else "document.pdf"
        return {
            "type": "file",
            "file": {"filename": name, "file_data": f"data:{media};base64,{data}"},
        }
    if kind == "text":
        text = _string(source.get("data"), f"{where}.source.data")
    elif kind == "content":
        text = _text_of(_blocks(source.get("content"), f"{where}.source.content"), where)
    else:
        raise untranslatable(f"{where}.source", f"a document of source type '{kind}'")
    if isinstance(title, str) and title:
        text = f"{title}\n\n{text}"
    return {"type": "text", "text": text}


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    content = block.get("content")
    text = (
        ""
        if content is None
        else _text_of(_blocks(content, f"{where}.content"), f"{where}.content")
    )
    if block.get("is_error") is True:
        text = "Error: " + text  # chat has no flag for it: the model reads it
    tool_use_id = _string(block.get("tool_use_id"), f"{where}.tool_use_id")
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}


def _assistant_turn(blocks: list[dict[str, Any]], field: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        where = f"{field}.{j}"
        kind = block.get("type")
        if kind == "text":
            texts.append(_string(block.get("text"), f"{where}.text"))
        elif kind == "tool_use":
            arguments = _encode(_object(block.get("input", {}), f"{where}.input")).decode()
            calls.append(
                {
                    "id": _string(block.get("id"), f"{where}.id"),
                    "type": "function",
                    "function": {
                        "name": _string(block.get("name"), f"{where}.name"),
                        "arguments": arguments,
                    },
                }
            )
        elif kind in _SKIPPED_BLOCKS:
            continue
        else:
            raise untranslatable(f"{where}.type", f"a '{kind}' block")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
        if not texts:
            message["content"] = None
    return message


def _add_tools(call: Call, body: dict[str, Any]) -> None:
    tools = call.get("tools")
    choice = call.get("tool_choice")
    if tools:
        if not isinstance(tools, list):
            raise _invalid("tools", "must be an array of tools")
        body["tools"] = [_tool(tool, f"tools.{i}") for i, tool in enumerate(tools)]
    if choice is None:
        return
    choice = _object(choice, "tool_choice")
    kind = choice.get("type")
    if kind == "auto":
        body["tool_choice"] = "auto"
    elif kind == "any":
        body["tool_choice"] = "required"
    elif kind == "none":
        body["tool_choice"] = "none"
    elif kind == "tool":
        name = _string(choice.get("name"), "tool_choice.name")
        body["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise _invalid("tool_choice.type", "must be 'auto', 'any', 'tool' or 'none'")
    if not tools:
        del body["tool_choice"]  # chat refuses a choice without tools; nothing to choose from
    elif choice.get("disable_parallel_tool_use") is True and kind != "none":
        body["parallel_tool_calls"] = False


def _tool(tool: Any, where: str) -> dict[str, Any]:
    tool = _object(tool, where)
    kind = tool.get("type")
    if kind not in (None, "custom"):  # web_search_*, bash_*, text_editor_*, computer_*, ...
        raise untranslatable(f"{where}.type", f"the Anthropic-defined tool '{kind}'")
    function: dict[str, Any] = {"name": _string(tool.get("name"), f"{where}.name")}
    description = tool.get("description")
    if isinstance(description, str):
        function["description"] = description
    function["parameters"] = _object(tool.get("input_schema"), f"{where}.input_schema")
    return {"type": "function", "function": function}


def _effort(thinking: Any) -> str | None:
    """Anthropic's ``thinking`` as chat's ``reasoning_effort`` (None: not asked for)."""
    if not isinstance(thinking, dict) or thinking.get("type") == "disabled":
        return None
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int):
        return "medium"  # adaptive thinking, or a budget left to the model
    for bound, effort in _EFFORTS:
        if budget < bound:
            return effort
    return "high"
