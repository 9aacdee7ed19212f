"""OpenAI chat completions <-> Anthropic Messages, as pure functions of decoded JSON.

Nothing here does I/O. A request the Messages API cannot express raises :class:`BadRequest`
naming the offending parameter; everything else OpenAI-only is left out, because Anthropic
refuses unknown fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from aioproxy import (
    ABSENT,
    BOOL,
    CONTENT_PARTS,
    FLOAT,
    INT,
    STR,
    TOOL_CHOICE,
    TOOLS,
    AnyMessage,
    BadRequest,
    ChunkMaker,
    InputFile,
    Tool,
    ToolCall,
    ToolChoice,
    TurnTranslator,
    assistant_choice,
    chat_completion,
    chat_messages,
    get_field,
    inline_file,
    is_empty_schema,
    json_object,
    max_tokens_of,
    split_data_url,
    stop_sequences,
    text_or_array,
    tool_call,
    usage_with_cache,
)

from .errors import ErrorDetail

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_MAX_TOKENS",
    "Answer",
    "Block",
    "Event",
    "StreamTranslator",
    "Usage",
    "decode_answer",
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


def messages_url(api_base: str | None) -> str:
    """``{api_base}/v1/messages``, whether or not ``api_base`` already ends in ``/v1``."""
    base = (api_base or DEFAULT_API_BASE).rstrip("/")
    base = base.removesuffix("/v1")
    return base + "/v1/messages"


# -- request ---------------------------------------------------------------------------------
# What the translation reads of a request: aioproxy's typed views (MESSAGES, TOOLS...), decoded
# from each field's bytes; other keys are skipped, never built.

# Sampling fields Anthropic takes under the same name. top_k is not OpenAI's, but clients
# written for vLLM & co. send it and Anthropic takes it.
_SAMPLING: dict[str, msgspec.json.Decoder[Any]] = {
    "temperature": FLOAT,
    "top_p": FLOAT,
    "top_k": INT,
}


def to_anthropic(
    fields: Mapping[str, msgspec.Raw], *, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """A chat completions request (its raw top-level fields) as a Messages API request body.

    Built from an allowlist: only fields with a Messages equivalent are carried over.
    """
    n = get_field(fields, "n", INT)
    if n is not None and n != 1:
        raise BadRequest("Anthropic models answer with one choice; 'n' must be 1", param="n")
    messages = chat_messages(fields, "Anthropic")
    system, turns = split_messages(messages)

    out: dict[str, Any] = {"model": fields["model"]}
    if system:
        out["system"] = system
    out["messages"] = turns
    max_tokens = max_tokens_of(fields)
    out["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    stop = stop_sequences(fields)
    if stop is not None:
        out["stop_sequences"] = stop
    for name, decoder in _SAMPLING.items():
        value = get_field(fields, name, decoder)
        if value is not None:
            out[name] = value
    # OpenAI's newer name for the end user comes first; Anthropic uses it for abuse detection.
    end_user = get_field(fields, "safety_identifier", STR) or get_field(fields, "user", STR)
    if end_user:
        out["metadata"] = {"user_id": end_user}
    tools = TOOLS.decode(fields.get("tools", ABSENT), "tools")
    if tools:
        out["tools"] = [tool_definition(tool, i) for i, tool in enumerate(tools)]
        choice = tool_choice(
            get_field(fields, "tool_choice", TOOL_CHOICE),
            get_field(fields, "parallel_tool_calls", BOOL),
        )
        if choice is not None:
            out["tool_choice"] = choice
    if get_field(fields, "stream", BOOL) is True:
        out["stream"] = True
    return out


def split_messages(messages: list[AnyMessage]) -> tuple[str, list[dict[str, Any]]]:
    """The joined system prompt, and the other messages as alternating Anthropic turns.

    Anthropic has no system role: every system/developer message, wherever it stands, joins the
    top-level ``system``. Same-role neighbours are merged, tool results included, so that user
    and assistant alternate as the Messages API requires.
    """
    system, turns = _TURNS.split(messages)
    for turn in turns:
        turn["content"] = _compact(turn["content"])
    return "\n\n".join(block["text"] for block in system), turns


def _compact(blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A lone text block as a plain string, the form Anthropic's own examples use."""
    if len(blocks) == 1 and blocks[0]["type"] == "text":
        return str(blocks[0]["text"])
    return blocks


class _Turns(TurnTranslator):
    """OpenAI messages as Anthropic content blocks."""

    service = "Anthropic"

    def text_block(self, text: str) -> dict[str, Any]:
        return {"type": "text", "text": text}

    def is_text(self, block: dict[str, Any]) -> bool:
        return bool(block["type"] == "text")

    def image_block(self, url: str, where: str) -> dict[str, Any]:
        return image_block(url, where)

    def file_block(self, file: InputFile | None, where: str, j: int) -> dict[str, Any]:
        """An OpenAI ``file`` part with inline data (a PDF, say) as a document block."""
        media_type, data = inline_file(file, where, "Anthropic")
        return {"type": "document", "source": _base64(media_type, data)}

    def audio_block(self, part: object, where: str) -> dict[str, Any]:
        raise BadRequest("Anthropic models do not take audio input", param=where)

    def tool_use(self, call: ToolCall, where: str) -> dict[str, Any]:
        function = call.function
        if function is None or call.type != "function":
            raise BadRequest(f"'{where}' must be a function tool call", param=where)
        tool_input = json_object(
            function.arguments, f"{where}.function.arguments", "as Anthropic takes tool input"
        )
        return {"type": "tool_use", "id": call.id, "name": function.name, "input": tool_input}

    def tool_result(self, message: AnyMessage, where: str) -> dict[str, Any]:
        where = f"{where}.content"
        content = text_or_array(message.content, CONTENT_PARTS, where)
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
        if isinstance(content, str):
            result["content"] = content
        else:
            blocks = self.parts_blocks(content, where)
            if blocks:
                result["content"] = blocks
        return result


_TURNS = _Turns()


def image_block(url: str, where: str = "image_url") -> dict[str, Any]:
    """An ``image_url`` as an Anthropic image block: data URLs inline, http(s) URLs by reference."""
    if url.startswith("data:"):
        media_type, data = split_data_url(url, where)
        return {"type": "image", "source": _base64(media_type, data)}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise BadRequest(f"'{where}' must be an http(s) URL or a base64 data URL", param=where)


def _base64(media_type: str, data: str) -> dict[str, str]:
    return {"type": "base64", "media_type": media_type, "data": data}


def tool_definition(tool: Tool, i: int) -> dict[str, Any]:
    """An OpenAI function tool as an Anthropic custom tool."""
    where = f"tools[{i}]"
    function = tool.function
    if function is None or tool.type != "function":
        raise BadRequest(f"'{where}' must be a function tool for Anthropic", param=where)
    out: dict[str, Any] = {"name": function.name}
    if function.description:
        out["description"] = function.description
    # input_schema is required by Anthropic; OpenAI lets a tool without parameters omit it.
    schema = function.parameters
    empty = is_empty_schema(schema)
    out["input_schema"] = {"type": "object", "properties": {}} if empty else schema
    return out


def tool_choice(
    choice: str | ToolChoice | None, parallel_tool_calls: bool | None = None
) -> dict[str, Any] | None:
    """OpenAI's ``tool_choice`` (and ``parallel_tool_calls``) as Anthropic's ``tool_choice``."""
    if choice is None or choice == "auto":
        out: dict[str, Any] = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}  # tools stay defined: earlier tool_use blocks refer to them
    elif isinstance(choice, ToolChoice) and choice.type == "function":
        if choice.function is None:
            raise BadRequest("'tool_choice.function.name' must be a string", param="tool_choice")
        out = {"type": "tool", "name": choice.function.name}
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
# What is read of Anthropic's answers, typed: an answer of another shape is the upstream's
# fault (a 502), never a crash of ours. Fields a newer API version may add are skipped.


class Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None

    def updated(self, other: Usage | None) -> Usage:
        """These counts, with those ``other`` gives (a stream's later, cumulative ones) instead."""
        if other is None:
            return self
        changes = {f: v for f in other.__struct_fields__ if (v := getattr(other, f)) is not None}
        return msgspec.structs.replace(self, **changes)


class Block(msgspec.Struct):
    """A content block (text, tool_use; thinking and others are skipped)."""

    type: str = ""
    text: str = ""
    id: str | None = None
    name: str | None = None
    input: msgspec.Raw = ABSENT  # a tool's input: the call's arguments, as Anthropic wrote them


class Answer(msgspec.Struct):
    """A ``message``: the whole answer, or a stream's message_start (with no content yet)."""

    type: str = ""
    id: str = ""
    content: list[Block] = []
    stop_reason: str | None = None
    usage: Usage | None = None


class Delta(msgspec.Struct):
    type: str = ""
    text: str = ""
    partial_json: str = ""
    stop_reason: str | None = None


class Event(msgspec.Struct):
    """One stream event, whatever its type: each type fills the fields it has."""

    type: str = ""
    index: int | None = None
    message: Answer | None = None
    content_block: Block | None = None
    delta: Delta | None = None
    usage: Usage | None = None
    error: ErrorDetail | None = None


class _EventType(msgspec.Struct):
    type: str = ""


decode_answer = msgspec.json.Decoder(Answer).decode
_decode_event = msgspec.json.Decoder(Event).decode
_decode_event_type = msgspec.json.Decoder(_EventType).decode

# The event types the translation reads; one of these in another shape is a broken answer.
# Others (ping, content_block_stop, types added after this was written) are skipped unread.
_READ_EVENTS = frozenset(
    {
        "message_start",
        "content_block_start",
        "content_block_delta",
        "message_delta",
        "message_stop",
        "error",
    }
)


def finish_reason(stop_reason: str | None) -> str:
    return _FINISH_REASONS.get(stop_reason or "", "stop")


def to_usage(usage: Usage | None) -> dict[str, Any]:
    """Anthropic usage in OpenAI terms: cache reads and writes are prompt tokens too.

    Anthropic's ``input_tokens`` counts only the uncached tokens after the last cache breakpoint,
    so the prompt is all three added up.
    """
    usage = usage or Usage()
    return usage_with_cache(
        usage.input_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
        usage.output_tokens,
    )


def to_chat_completion(message: Answer, *, model: str, created: int) -> dict[str, Any]:
    """An Anthropic ``message`` as a ``chat.completion``; ``model`` is the client's model name."""
    text = "".join(b.text for b in message.content if b.type == "text")
    tool_calls = [tool_call(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"]
    choice = assistant_choice(0, text, tool_calls, finish_reason(message.stop_reason))
    return chat_completion(
        "chatcmpl-" + message.id,
        model=model,
        created=created,
        choices=[choice],
        usage=to_usage(message.usage),
    )


# -- stream ----------------------------------------------------------------------------------


class StreamTranslator(ChunkMaker):
    """Turns Anthropic stream events, one at a time, into ``chat.completion.chunk`` objects.

    Keeps what later chunks need: the message id, which content blocks are tool calls (OpenAI
    numbers tool calls on their own, Anthropic numbers all blocks), and the usage so far.
    ``error`` events are not handled here: they end the stream, which is the caller's business.
    """

    def __init__(self, *, model: str, created: int, include_usage: bool = False) -> None:
        super().__init__("chatcmpl-", model=model, created=created, include_usage=include_usage)
        self.usage = Usage()
        self.finished = False  # message_stop seen: the stream is complete

    def feed(self, event: Event) -> list[dict[str, Any]]:
        """The chunks one event gives (often none: ping, block stops, thinking)."""
        kind = event.type
        if kind == "message_start":
            message = event.message or Answer()
            self.id = "chatcmpl-" + message.id
            self.usage = self.usage.updated(message.usage)
            return [self.chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(event.index, event.content_block or Block())
        if kind == "content_block_delta":
            return self._block_delta(event.index, event.delta or Delta())
        if kind == "message_delta":
            # Its usage is cumulative: output_tokens is the total so far, not an increment.
            self.usage = self.usage.updated(event.usage)
            reason = finish_reason(event.delta.stop_reason if event.delta else None)
            return [self.chunk({}, reason)]
        if kind == "message_stop":
            self.finished = True
            if self.include_usage:
                return [self.usage_chunk_of(to_usage(self.usage))]
        return []  # ping, content_block_stop, and event types added after this was written

    def _block_start(self, index: int | None, block: Block) -> list[dict[str, Any]]:
        if block.type == "text" and block.text:
            return [self.chunk({"content": block.text})]
        if block.type == "tool_use":
            return [self.tool_call_start(index, block.id, block.name)]
        return []

    def _block_delta(self, index: int | None, delta: Delta) -> list[dict[str, Any]]:
        kind = delta.type
        if kind == "text_delta" and delta.text:
            return [self.chunk({"content": delta.text})]
        if kind == "input_json_delta" and delta.partial_json:
            chunk = self.tool_call_arguments(index, delta.partial_json)
            return [chunk] if chunk is not None else []
        return []  # thinking, signature and citation deltas have no chat completions form


def parse_event(raw: bytes) -> Event | None:
    """The JSON ``data`` of one SSE event (the ``event:`` line repeats its ``type``); None if it
    has none, or is of a type the translation does not read.

    Raises msgspec.DecodeError when the data is not JSON, or an event read is not of its shape.
    """
    lines = [line[5:].lstrip() for line in raw.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None  # a comment or a bare event line
    data = b"\n".join(lines)
    try:
        return _decode_event(data)
    except msgspec.ValidationError:
        if _decode_event_type(data).type in _READ_EVENTS:
            raise
        return None  # a type added after this was written, in a shape of its own
