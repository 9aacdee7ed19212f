"""A translating provider's kit: an OpenAI chat completions request read as typed views, and the
checks of an upstream's answer that every translation needs.

A translator (``aioproxy-anthropic``, ``-gemini``, ``-bedrock``) reads the fields it needs from
``Call.fields`` straight into these Structs: keys it does not name are skipped, never built, and
the arrays inside a large item stay raw until counted (``ArrayOf``). Every Struct here takes any
value a field may lack as absent, so a translator decides what is missing, naming the field.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol, TypeVar

import msgspec
from multidict import CIMultiDict

from .context import Call, Deployment
from .errors import BadGateway, BadRequest
from .fields import (
    ABSENT,
    INT,
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_STOP,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    NULL,
    ArrayOf,
    get_field,
    text_or_array,
)
from .replies import StreamReply
from .transport import UpstreamResponse
from .upstream import Upstream

__all__ = [
    "CONTENT_PARTS",
    "JSON_OBJECT",
    "MESSAGES",
    "RESPONSE_FORMAT",
    "STOP",
    "SYSTEM_ROLES",
    "TOOLS",
    "TOOL_CALLS",
    "TOOL_CHOICE",
    "AnyMessage",
    "ChunkMaker",
    "ContentPart",
    "Finishing",
    "FunctionCall",
    "FunctionDefinition",
    "ImageURL",
    "InputAudio",
    "InputFile",
    "JSONSchemaFormat",
    "Message",
    "NamedFunction",
    "RawMessage",
    "ResponseFormat",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "TurnTranslator",
    "add_turn",
    "assistant_choice",
    "chat_completion",
    "chat_messages",
    "completion_usage",
    "decode_upstream",
    "error_text",
    "expect_content_type",
    "function_tool",
    "image_url_of",
    "include_usage",
    "inline_file",
    "invalid_answer",
    "is_empty_schema",
    "json_object",
    "max_tokens_of",
    "part_text",
    "split_data_url",
    "sse_translation",
    "stop_sequences",
    "stream_incomplete",
    "token_count",
    "tool_call",
    "upstream_headers",
    "usage_with_cache",
]

T = TypeVar("T")

SYSTEM_ROLES = ("system", "developer")  # the roles a provider without one folds into its system


# -- the request's views ---------------------------------------------------------------------


class FunctionCall(msgspec.Struct):
    """An assistant message's tool call's ``function``: ``arguments`` is a JSON string."""

    name: str | None = None
    arguments: str | None = None


class ToolCall(msgspec.Struct):
    """One of an assistant message's ``tool_calls``."""

    id: str | None = None
    type: str = "function"
    function: FunctionCall | None = None


class RawMessage(msgspec.Struct):
    """A message in a large array: the arrays in it (``content``, ``tool_calls``) stay raw, to
    be counted in turn (``CONTENT_PARTS``, ``TOOL_CALLS``)."""

    role: str | None = None
    content: msgspec.Raw = ABSENT  # a string, null or parts
    tool_calls: msgspec.Raw = ABSENT
    tool_call_id: str | None = None


class ImageURL(msgspec.Struct):
    url: str


class InputFile(msgspec.Struct):
    """A ``file`` part: inline ``file_data`` (a data URL or bare base64), or an uploaded id."""

    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class InputAudio(msgspec.Struct):
    data: str | None = None  # base64
    format: str = "wav"


class ContentPart(msgspec.Struct):
    """One part of a message's content; ``type`` says which of the other fields it fills."""

    type: str | None = None
    text: str | None = None
    refusal: str | None = None
    image_url: ImageURL | str | None = None
    file: InputFile | None = None
    input_audio: InputAudio | None = None


class Message(msgspec.Struct):
    """A message in a small array (see ArrayOf): decoded whole, its arrays typed too."""

    role: str | None = None
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


AnyMessage = RawMessage | Message  # what MESSAGES gives: content via text_or_array either way


class FunctionDefinition(msgspec.Struct):
    name: str | None = None
    description: str | None = None
    parameters: msgspec.Raw = ABSENT  # a JSON schema, as the client wrote it


class Tool(msgspec.Struct):
    """One of ``tools``: a function tool when ``type`` is ``function``."""

    type: str | None = None
    function: FunctionDefinition | None = None


class NamedFunction(msgspec.Struct):
    name: str


class ToolChoice(msgspec.Struct):
    """``tool_choice`` as an object (``{"type": "function", "function": {"name": ...}}``)."""

    type: str | None = None
    function: NamedFunction | None = None


class JSONSchemaFormat(msgspec.Struct):
    name: str | None = None
    schema: msgspec.Raw = ABSENT


class ResponseFormat(msgspec.Struct):
    """``response_format``: ``text``, ``json_object`` or ``json_schema`` (with its schema)."""

    type: str | None = None
    json_schema: JSONSchemaFormat | None = None


class _AnyObject(msgspec.Struct):
    """Any JSON object, its members skipped: checks one without building it."""


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


# Decoders of the arrays, each counted before it is built (a 400 past OpenAI's limits).
MESSAGES: ArrayOf[AnyMessage] = ArrayOf(RawMessage, MAX_MESSAGES, Message)
CONTENT_PARTS: ArrayOf[ContentPart] = ArrayOf(ContentPart, MAX_CONTENT_PARTS)
TOOL_CALLS: ArrayOf[ToolCall] = ArrayOf(ToolCall, MAX_TOOL_CALLS)
TOOLS: ArrayOf[Tool] = ArrayOf(Tool, MAX_TOOLS)
STOP: ArrayOf[str] = ArrayOf(str, MAX_STOP)
# Decoders for get_field: "auto", "none", "required" or a ToolChoice; a ResponseFormat.
TOOL_CHOICE = msgspec.json.Decoder(str | ToolChoice | None)
RESPONSE_FORMAT = msgspec.json.Decoder(ResponseFormat | None)
# Checks that a value is one JSON object (decode_field(raw, JSON_OBJECT, param)), building nothing.
JSON_OBJECT = msgspec.json.Decoder(_AnyObject)
_STREAM_OPTIONS = msgspec.json.Decoder(_StreamOptions | None)
_EMPTY_OBJECT = msgspec.Raw(b"{}")


def chat_messages(fields: Mapping[str, msgspec.Raw], service: str) -> list[AnyMessage]:
    """The request's ``messages``, decoded (a 400 unless an array of messages), after refusing
    the deprecated ``functions`` / ``function_call``, which no translation carries to
    ``service``."""
    for legacy in ("functions", "function_call"):
        if fields.get(legacy, NULL) != NULL:
            raise BadRequest(
                f"'{legacy}' is deprecated and not translated for {service}; use 'tools'",
                param=legacy,
            )
    messages = MESSAGES.decode(fields.get("messages", ABSENT), "messages")
    if messages is None:
        raise BadRequest("'messages' must be an array of messages", param="messages")
    return messages


def max_tokens_of(fields: Mapping[str, msgspec.Raw]) -> int | None:
    """The answer's token cap: ``max_completion_tokens``, else the older ``max_tokens``."""
    max_tokens = get_field(fields, "max_completion_tokens", INT)
    return get_field(fields, "max_tokens", INT) if max_tokens is None else max_tokens


def stop_sequences(fields: Mapping[str, msgspec.Raw]) -> list[str] | None:
    """``stop`` (a string or an array of them) as a list; None when absent or null."""
    stop = text_or_array(fields.get("stop", ABSENT), STOP, "stop")
    return [stop] if isinstance(stop, str) else stop


def include_usage(fields: Mapping[str, msgspec.Raw]) -> bool:
    """Whether a stream must end with a usage chunk (``stream_options.include_usage``)."""
    options = get_field(fields, "stream_options", _STREAM_OPTIONS)
    return options is not None and options.include_usage is True


def part_text(part: ContentPart, where: str) -> str:
    """A ``text`` or ``refusal`` part's text (a refusal the model gave earlier is text to the
    next turn); a 400 naming it if it has none."""
    kind = part.type
    text = part.text if kind == "text" else part.refusal
    if text is None:
        raise BadRequest(f"'{where}.{kind}' must be a string", param=f"{where}.{kind}")
    return text


def image_url_of(part: ContentPart, where: str) -> str:
    """An ``image_url`` part's URL (the object's ``url``, or a bare string); a 400 if none."""
    image = part.image_url
    url = image.url if isinstance(image, ImageURL) else image
    if url is None:
        raise BadRequest(f"'{where}.image_url.url' must be a string", param=f"{where}.image_url")
    return url


def add_turn(
    turns: list[dict[str, Any]], role: str, blocks: list[Any], key: str = "content"
) -> None:
    """``blocks`` as ``role``'s next turn (its ``key``: Gemini's is ``parts``), for an upstream
    whose turns alternate (Anthropic's, Converse, Gemini's): merged into the last turn when it
    is the same role's; nothing when empty (such upstreams refuse empty turns, and an empty
    message says nothing anyway)."""
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1][key].extend(blocks)
    else:
        turns.append({"role": role, key: blocks})


class TurnTranslator:
    """OpenAI chat ``messages`` as an upstream's system blocks and alternating turns (Anthropic's
    Messages, Converse, Gemini's contents). The walk, the roles, the content parts and the 400s
    naming each field are here; a subclass says what each piece becomes upstream.

    Set ``service`` (named in 400s) and give ``text_block``, ``image_block``, ``file_block``,
    ``tool_use`` and ``tool_result``; ``audio_block`` refuses audio unless given too. An
    instance may keep one request's state (Gemini's tool call names): make one per request then.
    """

    service: ClassVar[str] = "this upstream"
    assistant_role: ClassVar[str] = "assistant"  # the upstream's name for it (Gemini: model)
    turn_key: ClassVar[str] = "content"  # where a turn holds its blocks (Gemini: parts)
    assistant_text_only: ClassVar[bool] = False  # an assistant's content may hold text only

    def split(self, messages: list[AnyMessage]) -> tuple[list[Any], list[dict[str, Any]]]:
        """The system and developer messages' blocks (text only), wherever they stand, and the
        others as turns: tool results are the user's, same-role neighbours merged so that user
        and assistant alternate, empty messages left out."""
        system: list[Any] = []
        turns: list[dict[str, Any]] = []
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            role = message.role
            if role in SYSTEM_ROLES:
                content = f"{where}.content"
                system.extend(self.text_only(self.blocks(message.content, content), content))
                continue
            if role == "user":
                blocks, turn_role = self.blocks(message.content, f"{where}.content"), "user"
            elif role == "assistant":
                blocks, turn_role = self.assistant_blocks(message, where), self.assistant_role
            elif role == "tool":
                blocks, turn_role = [self.tool_result(message, where)], "user"
            else:
                raise BadRequest(
                    f"Role {role!r} of '{where}' cannot be sent to {self.service}; use system, "
                    "developer, user, assistant or tool",
                    param=f"{where}.role",
                )
            add_turn(turns, turn_role, blocks, self.turn_key)
        return system, turns

    def blocks(
        self, content: msgspec.Raw | str | list[ContentPart] | None, where: str
    ) -> list[Any]:
        """A message's ``content`` (raw, a string or parts) as blocks; empty text gives none."""
        return self.parts_blocks(text_or_array(content, CONTENT_PARTS, where), where)

    def parts_blocks(self, content: str | list[ContentPart] | None, where: str) -> list[Any]:
        """Decoded content (a string or parts) as blocks."""
        if content is None:
            return []
        if isinstance(content, str):
            return [self.text_block(content)] if content else []
        blocks = []
        for j, part in enumerate(content):
            block = self.part_block(part, f"{where}[{j}]", j)
            if block is not None:
                blocks.append(block)
        return blocks

    def part_block(self, part: ContentPart, where: str, j: int) -> Any:
        """One content part (the ``j``-th) as a block; None for empty text."""
        kind = part.type
        if kind in ("text", "refusal"):
            text = part_text(part, where)
            return self.text_block(text) if text else None
        if kind == "image_url":
            return self.image_block(image_url_of(part, where), f"{where}.image_url.url")
        if kind == "file":
            return self.file_block(part.file, f"{where}.file", j)
        if kind == "input_audio":
            return self.audio_block(part, where)
        raise BadRequest(
            f"Content part type {kind!r} cannot be sent to {self.service}", param=f"{where}.type"
        )

    def text_only(self, blocks: list[Any], where: str, message: str = "a system") -> list[Any]:
        """``blocks``, if all are text; else a 400: ``where`` of ``message`` may hold only text."""
        if not all(self.is_text(block) for block in blocks):
            raise BadRequest(f"'{where}' of {message} message may only hold text", param=where)
        return blocks

    def assistant_blocks(self, message: AnyMessage, where: str) -> list[Any]:
        """An assistant message's content, then its tool calls, as blocks."""
        blocks = self.blocks(message.content, f"{where}.content")
        if self.assistant_text_only:
            self.text_only(blocks, f"{where}.content", "an assistant")
        calls = TOOL_CALLS.decode(message.tool_calls, f"{where}.tool_calls")
        for j, call in enumerate(calls or ()):
            blocks.append(self.tool_use(call, f"{where}.tool_calls[{j}]"))
        return blocks

    # -- what a subclass gives --

    def text_block(self, text: str) -> Any:
        raise NotImplementedError

    def is_text(self, block: Any) -> bool:
        """Whether a block is text (what ``text_block`` made): by default, one with ``text``."""
        return "text" in block

    def image_block(self, url: str, where: str) -> Any:
        raise NotImplementedError

    def file_block(self, file: InputFile | None, where: str, j: int) -> Any:
        raise NotImplementedError

    def audio_block(self, part: ContentPart, where: str) -> Any:
        raise BadRequest(f"{self.service} does not take audio input", param=where)

    def tool_use(self, call: ToolCall, where: str) -> Any:
        raise NotImplementedError

    def tool_result(self, message: AnyMessage, where: str) -> Any:
        raise NotImplementedError


def split_data_url(url: str, where: str) -> tuple[str, str]:
    """A base64 data URL as (media type, base64 data); a 400 naming ``where`` if it is not one."""
    header, comma, data = url.partition(",")
    params = header[len("data:") :].split(";")
    if not url.startswith("data:") or not comma or "base64" not in params[1:] or not params[0]:
        raise BadRequest(
            f"'{where}' must be a base64 data URL (data:<media type>;base64,<data>)", param=where
        )
    return params[0], data


def json_object(text: str | None, where: str, why: str) -> msgspec.Raw:
    """``text`` (a tool call's ``arguments``; empty or None: ``{}``) checked to be one JSON
    object and kept as the client wrote it, never built; else a 400 naming ``where`` and
    saying ``why`` it must be one."""
    text = text or "{}"  # "" is how some clients say "no arguments"
    try:
        JSON_OBJECT.decode(text)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        raise BadRequest(f"'{where}' must be a JSON object, {why}", param=where) from None
    return msgspec.Raw(text.encode())


def inline_file(file: InputFile | None, where: str, service: str) -> tuple[str, str]:
    """A ``file`` part's inline data as (media type, base64 data): a data URL's own type, or a
    PDF for bare base64 (OpenAI's file parts are PDFs); a 400 naming ``where`` for a part with
    no ``file_data`` (an uploaded file's id means nothing to ``service``)."""
    data = file.file_data if file is not None else None
    if data is None:
        raise BadRequest(
            f"'{where}' must carry 'file_data'; uploaded file ids mean nothing to {service}",
            param=where,
        )
    if data.startswith("data:"):
        return split_data_url(data, f"{where}.file_data")
    return "application/pdf", data


def is_empty_schema(schema: msgspec.Raw) -> bool:
    """Whether a tool's ``parameters`` say nothing: absent, null or ``{}``."""
    return not schema or schema == NULL or schema == _EMPTY_OBJECT


def function_tool(tool: Tool, i: int, service: str) -> tuple[dict[str, Any], msgspec.Raw]:
    """``tools[i]`` checked to be a function tool with a name (what ``service`` takes, a 400
    else): its ``name`` and ``description`` (if any) as the upstream's declaration starts, and
    its ``parameters``, raw, for the translator to put in its upstream's terms."""
    function = tool.function
    if function is None or tool.type != "function" or not function.name:
        where = f"tools[{i}]"
        raise BadRequest(
            f"'{where}' must be a function tool with a name for {service}", param=where
        )
    declaration: dict[str, Any] = {"name": function.name}
    if function.description:
        declaration["description"] = function.description
    return declaration, function.parameters


def upstream_headers(call: Call, fixed: Mapping[str, str]) -> CIMultiDict[str]:
    """A translated call's headers, built afresh for each call so that the client's own key
    and headers never travel upstream: the gateway's own for the call (its request id, a
    traceparent), then the deployment's extra ``headers``, then ``fixed`` (the content type,
    the key, a version), which neither of those may replace, whatever their case."""
    headers: CIMultiDict[str] = CIMultiDict(call.upstream_headers)
    headers.update(call.deployment.headers)
    headers.update(fixed)
    return headers


# -- the upstream's answer -------------------------------------------------------------------

_PREVIEW = 300  # characters of an error body that is not the upstream's JSON worth showing


def error_text(body: bytes) -> str | None:
    """The start of an error body that is not the upstream's JSON (a proxy or load balancer in
    front of it said this), as text; None when blank. Scrub it before showing it."""
    return body[:_PREVIEW].decode("utf-8", "replace").strip() or None


def invalid_answer(deployment: Deployment, what: str) -> BadGateway:
    """The client's 502 ``upstream_invalid_response``: the deployment sent ``what``."""
    return BadGateway(
        f"Deployment {deployment.describe()} sent {what}", code="upstream_invalid_response"
    )


def expect_content_type(
    response: UpstreamResponse, content_type: str, deployment: Deployment
) -> None:
    """A 502 ``upstream_invalid_response`` unless the answer is of ``content_type`` (a stream
    asked for, answered as JSON, say)."""
    if response.content_type != content_type:
        raise BadGateway(
            f"Deployment {deployment.describe()} answered {response.content_type or 'no body'}"
            f", not {content_type}",
            code="upstream_invalid_response",
        )


def stream_incomplete(deployment: Deployment, before: str) -> BadGateway:
    """The client's 502 ``upstream_stream_incomplete``: the deployment's stream ended before
    ``before`` (the event that ends a whole answer: ``message_stop``, say)."""
    return BadGateway(
        f"Deployment {deployment.describe()} ended its stream before {before}",
        code="upstream_stream_incomplete",
    )


class Finishing(Protocol):
    """A stream translator's state, as ``sse_translation`` reads it."""

    @property
    def finished(self) -> bool:
        """Whether the whole answer has been translated (its last event seen)."""
        ...


S = TypeVar("S", bound=Finishing)


def sse_translation(
    upstream: Upstream,
    call: Call,
    response: UpstreamResponse,
    translator: S,
    translate: Callable[[S, Deployment, bytes], Iterable[bytes]],
    *,
    last_event: str,
    finished: Callable[[], bool] | None = None,
    trailer: Callable[[S], Iterable[bytes]] | None = None,
) -> StreamReply:
    """The reply of an upstream's SSE stream translated event by event (Anthropic's, Gemini's):
    a 502 unless ``response`` is a stream (``expect_content_type``).

    Each event of it (``upstream.events``: transport errors, stalls and oversized events
    already mapped) is sent on as the SSE events ``translate(translator, deployment, event)``
    makes of it (``sse_data(chunk)``s, ``DONE``), as it arrives. Once the body has ended, a
    stream whose ``translator`` has not ``finished`` is a 502 (``stream_incomplete(deployment,
    last_event)``); a finished one gives its connection back to the pool, then sends what
    ``trailer(translator)`` makes (a usage chunk and ``DONE``, for an upstream that ends its
    stream by ending its body). A client leaving mid-stream closes the answer, not releases it:
    the upstream must not go on writing. The proxy takes the answer as whole once ``finished()``
    (by default: the translator finished, and the body ended).
    """

    deployment = call.deployment
    expect_content_type(response, "text/event-stream", deployment)
    events = upstream.events(response, call)

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                for data in translate(translator, deployment, event):
                    yield data
        finally:
            await events.aclose()  # now, also when the client left: see iter_sse
        if not translator.finished:
            raise stream_incomplete(deployment, last_event)
        response.release()
        for data in trailer(translator) if trailer is not None else ():
            yield data

    if finished is None:
        finished = lambda: translator.finished and response.content.is_eof()
    return StreamReply(relay(), close=response.close, finished=finished)


def decode_upstream(
    decode: Callable[[bytes], T], raw: bytes, deployment: Deployment, what: str
) -> T:
    """``raw`` decoded by ``decode`` (a typed msgspec decoder's); an answer that is not JSON of
    its shape is the upstream's fault: a 502 saying the deployment sent ``what``
    (``"an answer that is not Gemini's"``), never a crash of ours."""
    try:
        return decode(raw)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        raise invalid_answer(deployment, what) from None


# -- the client's answer ---------------------------------------------------------------------
# OpenAI's shapes, built from what a translator read of its upstream's answer.


def token_count(value: int | None) -> int:
    """A count an upstream reported, as usage reports it: missing or negative is 0."""
    return value if value is not None and value > 0 else 0


def completion_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """Chat and legacy completions usage, with the zero details OpenAI always sends."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def usage_with_cache(
    uncached: int | None, cache_read: int | None, cache_write: int | None, completion: int | None
) -> dict[str, Any]:
    """Chat completions usage of an upstream that counts cached prompt tokens apart (Anthropic,
    Converse): the prompt is the uncached tokens, the cache reads and the cache writes added up."""
    read, written = token_count(cache_read), token_count(cache_write)
    prompt = token_count(uncached) + read + written
    completed = token_count(completion)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completed,
        "total_tokens": prompt + completed,
        "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": written},
    }


def tool_call(id: str | None, name: str | None, arguments: msgspec.Raw) -> dict[str, Any]:
    """A tool call of an answer: its arguments the JSON the upstream wrote (``{}`` if none)."""
    text = "{}" if not arguments or arguments == NULL else bytes(arguments).decode()
    return {"id": id, "type": "function", "function": {"name": name, "arguments": text}}


def assistant_choice(
    index: int, text: str, tool_calls: list[dict[str, Any]], finish_reason: str
) -> dict[str, Any]:
    """One choice of a ``chat.completion``: the assistant's text and tool calls."""
    message: dict[str, Any] = {
        "role": "assistant",
        # OpenAI sends null content beside tool calls when the model said nothing.
        "content": text if text or not tool_calls else None,
        "refusal": None,
        "annotations": [],
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}


def chat_completion(
    id: str, *, model: str, created: int, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    """A ``chat.completion``; ``model`` is the client's model name."""
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


class ChunkMaker:
    """A stream's ``chat.completion.chunk``s, all of one ``id``, ``model`` (the client's name)
    and ``created``. With ``include_usage``, each has ``usage`` null, as OpenAI's has on every
    chunk but the extra last one. A translator's stream state may subclass it."""

    def __init__(self, id: str, *, model: str, created: int, include_usage: bool = False) -> None:
        self.id = id
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self._tool_calls: dict[Any, int] = {}  # upstream block -> OpenAI tool call index

    def chunk(
        self, delta: dict[str, Any], finish_reason: str | None = None, index: int = 0
    ) -> dict[str, Any]:
        """A chunk of choice ``index``'s ``delta`` (and its finish reason, at its end)."""
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk_of(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The extra last chunk of ``include_usage``: no choices, the ``usage``."""
        return {**self.chunk({}), "choices": [], "usage": usage}

    def tool_call_start(self, block: Any, id: str | None, name: str | None) -> dict[str, Any]:
        """The chunk that opens a tool call: upstream ``block`` (its index, say) becomes the
        next OpenAI tool call, numbered apart from the upstream's other blocks."""
        index = self._tool_calls[block] = len(self._tool_calls)
        function = {"name": name, "arguments": ""}
        return self.chunk(
            {"tool_calls": [{"index": index, "id": id, "type": "function", "function": function}]}
        )

    def tool_call_arguments(self, block: Any, arguments: str) -> dict[str, Any] | None:
        """The chunk of more ``arguments`` for the tool call that ``block`` opened; None when
        it opened none."""
        index = self._tool_calls.get(block)
        if index is None:
            return None
        return self.chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
