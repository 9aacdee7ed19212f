"""OpenAI chat completions <-> Bedrock Converse, as pure functions of decoded JSON.

Nothing here does I/O. A request Converse cannot express raises :class:`BadRequest` naming the
offending parameter; OpenAI-only fields with no Converse meaning (``user``, ``seed``...) are
left out, because Converse refuses unknown fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

from aioproxy import (
    ABSENT,
    CONTENT_PARTS,
    FLOAT,
    INT,
    RESPONSE_FORMAT,
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
    function_tool,
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

__all__ = [
    "Answer",
    "Event",
    "StreamTranslator",
    "Usage",
    "decode_answer",
    "decode_event",
    "finish_reason",
    "image_block",
    "split_messages",
    "to_chat_completion",
    "to_converse",
    "to_usage",
    "tool_choice",
]

# Converse's stopReason -> OpenAI's finish_reason.
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}

# The media types Converse takes, as its ``format`` names them.
_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}
_DOCUMENT_FORMATS = {
    "application/pdf": "pdf",
    "text/csv": "csv",
    "application/msword": "doc",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/vnd.ms-excel": "xls",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
    "text/html": "html",
    "text/plain": "txt",
    "text/markdown": "md",
}
# A document's name may hold letters, digits, single spaces, hyphens, parentheses and brackets.
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9\-()\[\] ]+|(?<= ) +")


# -- request ---------------------------------------------------------------------------------
# What the translation reads of a request: aioproxy's typed views (MESSAGES, TOOLS...), decoded
# from each field's bytes; other keys are skipped, never built.

_EMPTY_SCHEMA = {"type": "object", "properties": {}}


def to_converse(fields: Mapping[str, msgspec.Raw]) -> dict[str, Any]:
    """A chat completions request (its raw top-level fields) as a Converse request body.

    Built from an allowlist: only fields with a Converse equivalent are carried over. The model
    is not in the body: it is the URL's ``/model/{modelId}``.
    """
    n = get_field(fields, "n", INT)
    if n is not None and n != 1:
        raise BadRequest("Bedrock Converse answers with one choice; 'n' must be 1", param="n")
    response_format = get_field(fields, "response_format", RESPONSE_FORMAT)
    if response_format is not None and response_format.type not in (None, "text"):
        raise BadRequest(
            "Bedrock Converse has no structured output; 'response_format' must be text",
            param="response_format",
        )
    system, turns = split_messages(chat_messages(fields, "Bedrock"))

    out: dict[str, Any] = {"messages": turns}
    if system:
        out["system"] = system
    inference = _inference_config(fields)
    if inference:
        out["inferenceConfig"] = inference
    tools = TOOLS.decode(fields.get("tools", ABSENT), "tools")
    if tools:
        choice = tool_choice(get_field(fields, "tool_choice", TOOL_CHOICE))
        # "none": Converse cannot forbid calls, so the tools are left out; they must stay when
        # earlier turns used them (Converse refuses toolUse blocks without a toolConfig).
        if choice is not None or not _none_allowed(turns):
            config: dict[str, Any] = {
                "tools": [_tool_spec(tool, i) for i, tool in enumerate(tools)]
            }
            if choice:
                config["toolChoice"] = choice
            out["toolConfig"] = config
    return out


def _inference_config(fields: Mapping[str, msgspec.Raw]) -> dict[str, Any]:
    inference: dict[str, Any] = {}
    max_tokens = max_tokens_of(fields)
    if max_tokens is not None:
        inference["maxTokens"] = max_tokens
    temperature = get_field(fields, "temperature", FLOAT)
    if temperature is not None:
        inference["temperature"] = temperature
    top_p = get_field(fields, "top_p", FLOAT)
    if top_p is not None:
        inference["topP"] = top_p
    stop = stop_sequences(fields)
    if stop:
        inference["stopSequences"] = stop
    return inference


def _none_allowed(turns: list[dict[str, Any]]) -> bool:
    """Whether no turn holds a tool block, so that the tools can be left out."""
    return not any(
        "toolUse" in block or "toolResult" in block for turn in turns for block in turn["content"]
    )


def split_messages(
    messages: list[AnyMessage],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The system blocks, and the other messages as alternating Converse turns.

    Converse has no system role: every system/developer message joins the top-level
    ``system``. Same-role neighbours are merged, tool results included, so that user and
    assistant alternate as Converse requires.
    """
    return _TURNS.split(messages)


class _Turns(TurnTranslator):
    """OpenAI messages as Converse content blocks."""

    service = "Bedrock"

    def text_block(self, text: str) -> dict[str, Any]:
        return {"text": text}

    def image_block(self, url: str, where: str) -> dict[str, Any]:
        return image_block(url, where)

    def file_block(self, file: InputFile | None, where: str, j: int) -> dict[str, Any]:
        """An OpenAI ``file`` part with inline data as a Converse document block."""
        media_type, data = inline_file(file, where, "Bedrock")
        document_format = _DOCUMENT_FORMATS.get(media_type.lower())
        if document_format is None:
            raise BadRequest(f"'{where}': Bedrock takes no {media_type} document", param=where)
        name = document_name(file.filename if file is not None else None, j)
        return {"document": {"format": document_format, "name": name, "source": {"bytes": data}}}

    def audio_block(self, part: object, where: str) -> dict[str, Any]:
        raise BadRequest("Bedrock Converse does not take audio input", param=where)

    def tool_use(self, call: ToolCall, where: str) -> dict[str, Any]:
        function = call.function
        if function is None or call.type != "function" or not call.id or not function.name:
            raise BadRequest(
                f"'{where}' must be a function tool call with an id and a name", param=where
            )
        tool_input = json_object(
            function.arguments, f"{where}.function.arguments", "as Bedrock takes tool input"
        )
        return {"toolUse": {"toolUseId": call.id, "name": function.name, "input": tool_input}}

    def tool_result(self, message: AnyMessage, where: str) -> dict[str, Any]:
        if not message.tool_call_id:
            raise BadRequest(
                f"'{where}.tool_call_id' must be a string", param=f"{where}.tool_call_id"
            )
        where = f"{where}.content"
        content = text_or_array(message.content, CONTENT_PARTS, where)
        if isinstance(content, str) or content is None:
            blocks = [{"text": content or ""}]
        else:
            blocks = self.parts_blocks(content, where) or [{"text": ""}]
        return {"toolResult": {"toolUseId": message.tool_call_id, "content": blocks}}


_TURNS = _Turns()


def image_block(url: str, where: str = "image_url") -> dict[str, Any]:
    """An ``image_url`` as a Converse image block: data URLs inline, ``s3://`` by location.

    Converse fetches no http(s) URL, and neither does the proxy (it would fetch whatever a
    client names, from inside the network).
    """
    if url.startswith("data:"):
        media_type, data = split_data_url(url, where)
        image_format = _IMAGE_FORMATS.get(media_type.lower())
        if image_format is None:
            raise BadRequest(
                f"'{where}': Bedrock takes png, jpeg, gif or webp images, not {media_type}",
                param=where,
            )
        return {"image": {"format": image_format, "source": {"bytes": data}}}
    if url.startswith("s3://"):
        image_format = _IMAGE_FORMATS.get(_media_type_of_name(url), "png")
        return {"image": {"format": image_format, "source": {"s3Location": {"uri": url}}}}
    raise BadRequest(
        f"'{where}' must be a base64 data URL or an s3:// URL: Bedrock fetches no http(s) URL",
        param=where,
    )


def _media_type_of_name(name: str) -> str:
    extension = name.rpartition(".")[2].lower()
    return {"jpg": "image/jpeg", "jpeg": "image/jpeg"}.get(extension, f"image/{extension}")


def document_name(filename: str | None, j: int) -> str:
    """A name Converse accepts for a document: the file's, without its extension or the
    characters Converse refuses; ``document-<j>`` when nothing is left."""
    stem = (filename or "").rpartition(".")[0] or (filename or "")
    name = _NOT_IN_NAME.sub("-", stem).strip(" -")
    return name[:200] or f"document-{j}"


def _tool_spec(tool: Tool, i: int) -> dict[str, Any]:
    """An OpenAI function tool as a Converse ``toolSpec``."""
    spec, schema = function_tool(tool, i, "Bedrock")
    # inputSchema is required by Converse; OpenAI lets a tool without parameters omit it.
    spec["inputSchema"] = {"json": _EMPTY_SCHEMA if is_empty_schema(schema) else schema}
    return {"toolSpec": spec}


def tool_choice(choice: str | ToolChoice | None) -> dict[str, Any] | None:
    """OpenAI's ``tool_choice`` as Converse's ``toolChoice``: ``{}`` for none given (Converse's
    default, auto), ``None`` for "none"."""
    if choice is None:
        return {}
    if choice == "auto":
        return {"auto": {}}
    if choice == "required":
        return {"any": {}}
    if choice == "none":
        return None
    if isinstance(choice, ToolChoice) and choice.type == "function":
        if choice.function is None:
            raise BadRequest("'tool_choice.function.name' must be a string", param="tool_choice")
        return {"tool": {"name": choice.function.name}}
    raise BadRequest(
        "'tool_choice' must be auto, required, none or a function for Bedrock",
        param="tool_choice",
    )


# -- response --------------------------------------------------------------------------------
# What is read of Converse's answers, typed: an answer of another shape is the upstream's fault
# (a 502), never a crash of ours. Fields a newer API version may add are skipped.


class Usage(msgspec.Struct):
    inputTokens: int | None = None  # noqa: N815 - Converse's names
    outputTokens: int | None = None  # noqa: N815
    cacheReadInputTokens: int | None = None  # noqa: N815
    cacheWriteInputTokens: int | None = None  # noqa: N815


class _ToolUse(msgspec.Struct):
    toolUseId: str | None = None  # noqa: N815
    name: str | None = None
    input: msgspec.Raw = ABSENT  # the call's arguments, as Bedrock wrote them


class Block(msgspec.Struct):
    """A content block of an answer: text or toolUse (reasoning and others are skipped)."""

    text: str | None = None
    toolUse: _ToolUse | None = None  # noqa: N815


class _AnswerMessage(msgspec.Struct):
    role: str | None = None
    content: list[Block] = []


class _Output(msgspec.Struct):
    message: _AnswerMessage | None = None


class Answer(msgspec.Struct):
    """A Converse answer: ``output.message``, ``stopReason`` and ``usage``."""

    output: _Output
    stopReason: str | None = None  # noqa: N815
    usage: Usage | None = None


class _Start(msgspec.Struct):
    toolUse: _ToolUse | None = None  # noqa: N815


class _ToolUseDelta(msgspec.Struct):
    input: str = ""


class _Delta(msgspec.Struct):
    text: str | None = None
    toolUse: _ToolUseDelta | None = None  # noqa: N815


class Event(msgspec.Struct):
    """The payload of one stream event, whatever its type: each fills the fields it has."""

    role: str | None = None  # messageStart
    contentBlockIndex: int | None = None  # noqa: N815
    start: _Start | None = None  # contentBlockStart
    delta: _Delta | None = None  # contentBlockDelta
    stopReason: str | None = None  # noqa: N815 - messageStop
    usage: Usage | None = None  # metadata


decode_answer = msgspec.json.Decoder(Answer).decode
decode_event = msgspec.json.Decoder(Event).decode


def finish_reason(stop_reason: str | None) -> str:
    return _FINISH_REASONS.get(stop_reason or "", "stop")


def to_usage(usage: Usage | None) -> dict[str, Any]:
    """Converse usage in OpenAI terms: cache reads and writes are prompt tokens too (Converse's
    ``inputTokens`` counts only the uncached ones)."""
    usage = usage or Usage()
    return usage_with_cache(
        usage.inputTokens,
        usage.cacheReadInputTokens,
        usage.cacheWriteInputTokens,
        usage.outputTokens,
    )


def to_chat_completion(answer: Answer, *, id: str, model: str, created: int) -> dict[str, Any]:
    """A Converse answer as a ``chat.completion``; ``model`` is the client's model name."""
    blocks = answer.output.message.content if answer.output.message else []
    text = "".join(b.text for b in blocks if b.text is not None)
    tool_calls = [
        tool_call(b.toolUse.toolUseId, b.toolUse.name, b.toolUse.input)
        for b in blocks
        if b.toolUse is not None
    ]
    choice = assistant_choice(0, text, tool_calls, finish_reason(answer.stopReason))
    usage = to_usage(answer.usage)
    return chat_completion(id, model=model, created=created, choices=[choice], usage=usage)


# -- stream ----------------------------------------------------------------------------------


class StreamTranslator(ChunkMaker):
    """Turns Converse stream events, one at a time, into ``chat.completion.chunk`` objects.

    Keeps what later chunks need: which content blocks are tool calls (OpenAI numbers tool calls
    on their own, Converse numbers all blocks). ``messageStop`` gives the finish reason and
    ``metadata``, the last event, the usage. Exception events are the caller's business.
    """

    def __init__(self, *, id: str, model: str, created: int, include_usage: bool = False) -> None:
        super().__init__(id, model=model, created=created, include_usage=include_usage)
        self.stopped = False  # messageStop seen: the answer is complete
        self.finished = False  # metadata seen too: nothing more will come

    def feed(self, kind: str, event: Event) -> list[dict[str, Any]]:
        """The chunks one event of type ``kind`` gives (often none: block stops, reasoning)."""
        if kind == "messageStart":
            return [self.chunk({"role": "assistant", "content": ""})]
        if kind == "contentBlockStart":
            tool_use = event.start.toolUse if event.start else None
            if tool_use is None:
                return []
            return [
                self.tool_call_start(event.contentBlockIndex, tool_use.toolUseId, tool_use.name)
            ]
        if kind == "contentBlockDelta":
            return self._delta(event.contentBlockIndex, event.delta or _Delta())
        if kind == "messageStop":
            self.stopped = True
            return [self.chunk({}, finish_reason(event.stopReason))]
        if kind == "metadata":
            self.finished = True
            return [self.usage_chunk(event.usage)] if self.include_usage else []
        return []  # contentBlockStop, and event types added after this was written

    def usage_chunk(self, usage: Usage | None) -> dict[str, Any]:
        """The extra last chunk of ``include_usage``: no choices, the usage."""
        return self.usage_chunk_of(to_usage(usage))

    def _delta(self, index: int | None, delta: _Delta) -> list[dict[str, Any]]:
        if delta.text:
            return [self.chunk({"content": delta.text})]
        if delta.toolUse is not None and delta.toolUse.input:
            chunk = self.tool_call_arguments(index, delta.toolUse.input)
            return [chunk] if chunk is not None else []
        return []  # reasoning and citation deltas have no chat completions form
