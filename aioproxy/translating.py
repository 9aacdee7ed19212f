"""A translating provider's kit: an OpenAI chat completions request read as typed views, and the
checks of an upstream's answer that every translation needs.

A translator (``aioproxy-anthropic``, ``-gemini``, ``-bedrock``) reads the fields it needs from
``Call.fields`` straight into these Structs: keys it does not name are skipped, never built, and
the arrays inside a large item stay raw until counted (``ArrayOf``). Every Struct here takes any
value a field may lack as absent, so a translator decides what is missing, naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgspec

from .context import Deployment
from .errors import BadGateway, BadRequest
from .fields import (
    ABSENT,
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_STOP,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    NULL,
    ArrayOf,
    get_field,
)
from .transport import UpstreamResponse

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
    "add_turn",
    "assistant_choice",
    "chat_completion",
    "completion_usage",
    "decode_upstream",
    "expect_content_type",
    "function_tool",
    "image_url_of",
    "include_usage",
    "invalid_answer",
    "is_empty_schema",
    "json_object",
    "part_text",
    "split_data_url",
    "token_count",
    "tool_call",
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


def add_turn(turns: list[dict[str, Any]], role: str, blocks: list[Any]) -> None:
    """``blocks`` as ``role``'s next turn, for an upstream whose turns alternate (Anthropic's,
    Converse): merged into the last turn when it is the same role's; nothing when empty (such
    upstreams refuse empty turns, and an empty message says nothing anyway)."""
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


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


# -- the upstream's answer -------------------------------------------------------------------


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
