"""A Responses API request as a chat-completions request: input items, tools, text format."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from ..errors import BadRequest
from .common import unsupported

__all__ = ["ChatRequest", "chat_request", "input_messages"]


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


def chat_request(body: dict[str, Any], history: Sequence[dict[str, Any]] = ()) -> ChatRequest:
    """The chat-completions body for a Responses request ``body``, after ``history``."""
    for name, what in _REFUSED.items():
        if body.get(name):
            raise unsupported(what.capitalize() + " are", name)

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
    tools = _tools(body["tools"]) if body.get("tools") is not None else []
    if tools:
        chat["tools"] = tools
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
            raise unsupported(f"Input items of type '{kind}' are", where)
    return messages


def _required(item: dict[str, Any], name: str, where: str, kind: type = str) -> Any:
    value = item.get(name)
    if not isinstance(value, kind):
        raise BadRequest(
            f"Missing or invalid '{where}.{name}'", param=f"{where}.{name}", code="invalid_value"
        )
    return value


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    role = _ROLES.get(role) if isinstance(role, str) else None
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
                raise unsupported(
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
            raise unsupported(
                "Images by 'file_id' are (send 'image_url', a URL or data: URL)", where
            )
        image: dict[str, Any] = {"url": url}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        if part.get("file_url") is not None:
            raise unsupported("Files by 'file_url' are (send 'file_id' or 'file_data')", where)
        file = {k: part[k] for k in ("file_id", "file_data", "filename") if part.get(k) is not None}
        return {"type": "file", "file": file}
    if kind == "input_audio":
        return {"type": "input_audio", "input_audio": _required(part, "input_audio", where, dict)}
    raise unsupported(f"Content parts of type '{kind}' are", where)


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
                raise unsupported(
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
            raise unsupported(f"Tools of type '{kind}' are", where)
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
                    raise unsupported("Allowed tools other than functions are", "tool_choice")
                allowed.append({"type": "function", "function": {"name": tool.get("name")}})
            mode = choice.get("mode", "auto")
            return {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": allowed}}
    kind = choice.get("type") if isinstance(choice, dict) else choice
    raise unsupported(f"tool_choice '{kind}' is", "tool_choice")


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
    raise unsupported(f"text.format '{kind}' is", "text.format")
