"""OpenAI chat completions <-> Anthropic Messages, as pure functions of decoded JSON.

Nothing here does I/O. A request the Messages API cannot express raises :class:`BadRequest`
naming the offending parameter; everything else OpenAI-only is left out, because Anthropic
refuses unknown fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import msgspec

from aioproxy import BadRequest

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_MAX_TOKENS",
    "StreamTranslator",
    "content_blocks",
    "finish_reason",
    "image_block",
    "messages_url",
    "parse_event",
    "split_messages",
    "to_anthropic",
    "to_chat_completion",
    "to_usage",
    "tool_choice",
    "tool_definition",
]

DEFAULT_API_BASE = "https://api.anthropic.com"
DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; OpenAI clients usually send none

# Anthropic's stop_reason -> OpenAI's finish_reason. pause_turn (a server tool paused a long
# turn) ends this answer as a normal stop; refusal is the nearest thing to a content filter.
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_SYSTEM_ROLES = ("system", "developer")

_encode = msgspec.json.Encoder().encode
_decode_event = msgspec.json.Decoder(dict[str, Any]).decode


def messages_url(api_base: str | None) -> str:
    """``{api_base}/v1/messages``, whether or not ``api_base`` already ends in ``/v1``."""
    base = (api_base or DEFAULT_API_BASE).rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + "/v1/messages"


# -- request ---------------------------------------------------------------------------------


def to_anthropic(
    body: Mapping[str, Any], *, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """A chat completions request body as a Messages API request body.

    Built from an allowlist: only fields with a Messages equivalent are carried over.
    """
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest("Anthropic models answer with one choice; 'n' must be 1", param="n")
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise BadRequest(
                f"'{legacy}' is deprecated and not translated for Anthropic; use 'tools'",
                param=legacy,
            )
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be an array of messages", param="messages")
    system, turns = split_messages(messages)

    out: dict[str, Any] = {"model": body["model"]}
    if system:
        out["system"] = system
    out["messages"] = turns
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    out["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    stop = body.get("stop")
    if stop is not None:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    # top_k is not OpenAI's, but clients written for vLLM & co. send it and Anthropic takes it.
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    # OpenAI's newer name for the end user comes first; Anthropic uses it for abuse detection.
    end_user = body.get("safety_identifier") or body.get("user")
    if isinstance(end_user, str) and end_user:
        out["metadata"] = {"user_id": end_user}
    tools = body.get("tools")
    if tools:
        out["tools"] = [tool_definition(tool, i) for i, tool in enumerate(tools)]
        choice = tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    if body.get("stream") is True:
        out["stream"] = True
    return out


def split_messages(messages: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    """The joined system prompt, and the other messages as alternating Anthropic turns.

    Anthropic has no system role: every system/developer message, wherever it stands, joins the
    top-level ``system``. Same-role neighbours are merged, tool results included, so that user
    and assistant alternate as the Messages API requires.
    """
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role in _SYSTEM_ROLES:
            text = _plain_text(message.get("content"), f"messages[{i}].content")
            if text:
                system.append(text)
            continue
        if role == "user":
            blocks = content_blocks(message.get("content"), f"messages[{i}].content")
            turn_role = "user"
        elif role == "assistant":
            blocks = _assistant_blocks(message, i)
            turn_role = "assistant"
        elif role == "tool":
            blocks = [_tool_result(message, i)]
            turn_role = "user"
        else:
            raise BadRequest(
                f"Role {role!r} of 'messages[{i}]' cannot be sent to Anthropic; use system, "
                "developer, user, assistant or tool",
                param=f"messages[{i}].role",
            )
        if not blocks:
            continue  # Anthropic refuses empty turns; an empty message says nothing anyway
        if turns and turns[-1]["role"] == turn_role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": turn_role, "content": blocks})
    for turn in turns:
        turn["content"] = _compact(turn["content"])
    return "\n\n".join(system), turns


def _compact(blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A lone text block as a plain string, the form Anthropic's own examples use."""
    if len(blocks) == 1 and blocks[0]["type"] == "text":
        return str(blocks[0]["text"])
    return blocks


def content_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI message content (a string or parts) as Anthropic content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise BadRequest(f"'{where}' must be a string or an array of parts", param=where)
    blocks = []
    for j, part in enumerate(content):
        block = _part_block(part, f"{where}[{j}]")
        if block is not None:
            blocks.append(block)
    return blocks


def _part_block(part: Any, where: str) -> dict[str, Any] | None:
    if not isinstance(part, dict):
        raise BadRequest(f"'{where}' must be an object", param=where)
    kind = part.get("type")
    if kind in ("text", "refusal"):  # a refusal the model gave earlier is text to the next turn
        text = part.get(kind)
        if not isinstance(text, str):
            raise BadRequest(f"'{where}.{kind}' must be a string", param=f"{where}.{kind}")
        return {"type": "text", "text": text} if text else None
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            where = f"{where}.image_url"
            raise BadRequest(f"'{where}.url' must be a string", param=where)
        return image_block(url, f"{where}.image_url.url")
    if kind == "file":
        return _document_block(part.get("file"), f"{where}.file")
    if kind == "input_audio":
        raise BadRequest("Anthropic models do not take audio input", param=where)
    raise BadRequest(
        f"Content part type {kind!r} cannot be sent to Anthropic", param=f"{where}.type"
    )


def image_block(url: str, where: str = "image_url") -> dict[str, Any]:
    """An ``image_url`` as an Anthropic image block: data URLs inline, http(s) URLs by reference."""
    if url.startswith("data:"):
        media_type, data = _split_data_url(url, where)
        return {"type": "image", "source": _base64(media_type, data)}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise BadRequest(f"'{where}' must be an http(s) URL or a base64 data URL", param=where)


def _document_block(file: Any, where: str) -> dict[str, Any]:
    """An OpenAI ``file`` part with inline data (a PDF, say) as an Anthropic document block."""
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str):
        raise BadRequest(
            f"'{where}' must carry 'file_data'; uploaded file ids mean nothing to Anthropic",
            param=where,
        )
    if data.startswith("data:"):
        media_type, data = _split_data_url(data, f"{where}.file_data")
    else:  # OpenAI also takes bare base64 here, and its file parts are PDFs
        media_type = "application/pdf"
    return {"type": "document", "source": _base64(media_type, data)}


def _base64(media_type: str, data: str) -> dict[str, str]:
    return {"type": "base64", "media_type": media_type, "data": data}


def _split_data_url(url: str, where: str) -> tuple[str, str]:
    header, comma, data = url.partition(",")
    params = header[len("data:") :].split(";")
    if not comma or "base64" not in params[1:] or not params[0]:
        raise BadRequest(
            f"'{where}' must be a base64 data URL (data:<media type>;base64,<data>)", param=where
        )
    return params[0], data


def _plain_text(content: Any, where: str) -> str:
    """The text of system content: a string, or text parts joined by blank lines."""
    blocks = content_blocks(content, where)
    if any(block["type"] != "text" for block in blocks):
        raise BadRequest(f"'{where}' of a system message may only hold text", param=where)
    return "\n\n".join(block["text"] for block in blocks)


def _assistant_blocks(message: Mapping[str, Any], i: int) -> list[dict[str, Any]]:
    blocks = content_blocks(message.get("content"), f"messages[{i}].content")
    for j, call in enumerate(message.get("tool_calls") or ()):
        blocks.append(_tool_use(call, f"messages[{i}].tool_calls[{j}]"))
    return blocks


def _tool_use(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or call.get("type", "function") != "function":
        raise BadRequest(f"'{where}' must be a function tool call", param=where)
    arguments = function.get("arguments") or "{}"  # "" is how some clients say "no arguments"
    try:
        tool_input = json.loads(arguments)
    except (TypeError, ValueError):
        tool_input = None
    if not isinstance(tool_input, dict):
        raise BadRequest(
            f"'{where}.function.arguments' must be a JSON object, as Anthropic takes tool input",
            param=f"{where}.function.arguments",
        )
    return {
        "type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": tool_input,
    }


def _tool_result(message: Mapping[str, Any], i: int) -> dict[str, Any]:
    where = f"messages[{i}].content"
    content = message.get("content")
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.get("tool_call_id")}
    if isinstance(content, str):
        result["content"] = content
    else:
        blocks = content_blocks(content, where)
        if blocks:
            result["content"] = blocks
    return result


def tool_definition(tool: Any, i: int) -> dict[str, Any]:
    """An OpenAI function tool as an Anthropic custom tool."""
    where = f"tools[{i}]"
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or tool.get("type") != "function":
        raise BadRequest(f"'{where}' must be a function tool for Anthropic", param=where)
    out: dict[str, Any] = {"name": function.get("name")}
    if function.get("description"):
        out["description"] = function["description"]
    # input_schema is required by Anthropic; OpenAI lets a tool without parameters omit it.
    out["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    return out


def tool_choice(choice: Any, parallel_tool_calls: Any = None) -> dict[str, Any] | None:
    """OpenAI's ``tool_choice`` (and ``parallel_tool_calls``) as Anthropic's ``tool_choice``."""
    if choice is None or choice == "auto":
        out: dict[str, Any] = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}  # tools stay defined: earlier tool_use blocks refer to them
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise BadRequest("'tool_choice.function.name' must be a string", param="tool_choice")
        out = {"type": "tool", "name": name}
    else:
        raise BadRequest(
            "'tool_choice' must be auto, required, none or a function for Anthropic",
            param="tool_choice",
        )
    if parallel_tool_calls is False:
        out["disable_parallel_tool_use"] = True
    elif choice is None:
        return None  # nothing asked: Anthropic's default is auto already
    return out


# -- response --------------------------------------------------------------------------------


def finish_reason(stop_reason: str | None) -> str:
    return _FINISH_REASONS.get(stop_reason or "", "stop")


def to_usage(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """Anthropic usage in OpenAI terms: cache reads and writes are prompt tokens too.

    Anthropic's ``input_tokens`` counts only the uncached tokens after the last cache breakpoint,
    so the prompt is all three added up.
    """
    usage = usage or {}
    cache_read = _count(usage.get("cache_read_input_tokens"))
    cache_write = _count(usage.get("cache_creation_input_tokens"))
    prompt = _count(usage.get("input_tokens")) + cache_read + cache_write
    completion = _count(usage.get("output_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read, "cache_write_tokens": cache_write},
    }


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def to_chat_completion(message: Mapping[str, Any], *, model: str, created: int) -> dict[str, Any]:
    """An Anthropic ``message`` as a ``chat.completion``; ``model`` is the client's model name."""
    blocks = [b for b in message.get("content") or () if isinstance(b, dict)]
    text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
    tool_calls = [_tool_call(b) for b in blocks if b.get("type") == "tool_use"]
    reply: dict[str, Any] = {
        "role": "assistant",
        # OpenAI sends null content beside tool calls when the model said nothing.
        "content": text if text or not tool_calls else None,
        "refusal": None,
        "annotations": [],
    }
    if tool_calls:
        reply["tool_calls"] = tool_calls
    choice = {
        "index": 0,
        "message": reply,
        "logprobs": None,
        "finish_reason": finish_reason(message.get("stop_reason")),
    }
    return {
        "id": "chatcmpl-" + str(message.get("id", "")),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": to_usage(message.get("usage")),
    }


def _tool_call(block: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": block.get("id"),
        "type": "function",
        "function": {"name": block.get("name"), "arguments": _arguments(block.get("input"))},
    }


def _arguments(tool_input: Any) -> str:
    return _encode(tool_input if tool_input is not None else {}).decode()


# -- stream ----------------------------------------------------------------------------------


class StreamTranslator:
    """Turns Anthropic stream events, one at a time, into ``chat.completion.chunk`` objects.

    Keeps what later chunks need: the message id, which content blocks are tool calls (OpenAI
    numbers tool calls on their own, Anthropic numbers all blocks), and the usage so far.
    ``error`` events are not handled here: they end the stream, which is the caller's business.
    """

    def __init__(self, *, model: str, created: int, include_usage: bool = False) -> None:
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.id = "chatcmpl-"
        self.usage: dict[str, Any] = {}
        self.finished = False  # message_stop seen: the stream is complete
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index

    def feed(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The chunks one event gives (often none: ping, block stops, thinking)."""
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self.id = "chatcmpl-" + str(message.get("id", ""))
            self.usage.update(message.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(event.get("index"), event.get("content_block") or {})
        if kind == "content_block_delta":
            return self._block_delta(event.get("index"), event.get("delta") or {})
        if kind == "message_delta":
            # Its usage is cumulative: output_tokens is the total so far, not an increment.
            self.usage.update(event.get("usage") or {})
            reason = finish_reason((event.get("delta") or {}).get("stop_reason"))
            return [self._chunk({}, reason)]
        if kind == "message_stop":
            self.finished = True
            if self.include_usage:
                return [{**self._chunk({}), "choices": [], "usage": to_usage(self.usage)}]
        return []  # ping, content_block_stop, and event types added after this was written

    def _block_start(self, index: Any, block: Mapping[str, Any]) -> list[dict[str, Any]]:
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if block.get("type") == "tool_use":
            position = self._tools[index] = len(self._tools)
            call = {
                "index": position,
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": ""},
            }
            return [self._chunk({"tool_calls": [call]})]
        return []

    def _block_delta(self, index: Any, delta: Mapping[str, Any]) -> list[dict[str, Any]]:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if kind == "input_json_delta" and delta.get("partial_json") and index in self._tools:
            call = {"index": self._tools[index], "function": {"arguments": delta["partial_json"]}}
            return [self._chunk({"tool_calls": [call]})]
        return []  # thinking, signature and citation deltas have no chat completions form

    def _chunk(self, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
        }
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: null on every chunk but the extra last one
        return chunk


def parse_event(raw: bytes) -> dict[str, Any] | None:
    """The JSON ``data`` of one SSE event (the ``event:`` line repeats its ``type``); None if none.

    Raises msgspec.DecodeError when the data is not a JSON object.
    """
    lines = [line[5:].lstrip() for line in raw.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None  # a comment or a bare event line
    return _decode_event(b"\n".join(lines))
