"""OpenAI chat completions -> Gemini ``generateContent`` requests, as pure functions.

Nothing here does I/O. The request is read field by field from the client's bytes (``Call.fields``)
into Structs; a request Gemini cannot express raises :class:`BadRequest` naming the parameter.
Everything OpenAI-only that Gemini has no field for is left out (Gemini refuses unknown fields).
"""

from __future__ import annotations

import mimetypes
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgspec

from aioproxy import (
    ABSENT,
    FLOAT,
    INT,
    JSON_OBJECT,
    NULL,
    RESPONSE_FORMAT,
    STR,
    TOOL_CHOICE,
    TOOLS,
    AnyMessage,
    BadRequest,
    ContentPart,
    InputFile,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolChoice,
    TurnTranslator,
    chat_messages,
    decode_field,
    function_tool,
    get_field,
    is_empty_schema,
    json_object,
    max_tokens_of,
    split_data_url,
    stop_sequences,
)

from .schema import to_gemini_schema

__all__ = [
    "SIGNATURE_MARK",
    "Schemas",
    "Thinking",
    "contents_of",
    "part_of",
    "thinking_config",
    "to_gemini",
    "tool_call_id",
    "tool_config",
]

Schemas = Literal["openapi", "json_schema"]
Thinking = Literal["level", "budget"]
# A Gemini function call's thoughtSignature rides in the OpenAI tool call id after this mark, so
# that it goes back with the call in the next turn (thinking models refuse a call without it).
SIGNATURE_MARK = "~sig~"
_URL_SCHEMES = ("https://", "gs://")  # what Gemini fetches itself as fileData
_AUDIO_TYPES = {"wav": "audio/wav", "mp3": "audio/mp3"}  # OpenAI's input_audio formats


def tool_call_id(signature: str | None) -> str:
    """A fresh OpenAI tool call id, carrying Gemini's ``thoughtSignature`` if there is one."""
    base = f"call_{uuid.uuid4().hex[:24]}"
    return f"{base}{SIGNATURE_MARK}{signature}" if signature else base


# -- what is read of the request: aioproxy's typed views (MESSAGES, TOOLS...) ----------------

_OBJECT_CHECK = "as Gemini takes function args"
_ANY = msgspec.json.Decoder()

# reasoning_effort as a thinking budget in tokens, for Gemini 2.5 models (which have no levels);
# "none" turns thinking off where the model allows it.
_BUDGETS = {"none": 0, "minimal": 1024, "low": 1024, "medium": 8192, "high": 24576}

# OpenAI sampling fields and their generationConfig names.
_SAMPLING: dict[str, tuple[str, msgspec.json.Decoder[Any]]] = {
    "temperature": ("temperature", FLOAT),
    "top_p": ("topP", FLOAT),
    "top_k": ("topK", INT),  # not OpenAI's, but clients written for vLLM & co. send it
    "seed": ("seed", INT),
    "presence_penalty": ("presencePenalty", FLOAT),
    "frequency_penalty": ("frequencyPenalty", FLOAT),
}


# -- request ---------------------------------------------------------------------------------


def to_gemini(
    fields: Mapping[str, msgspec.Raw],
    *,
    schemas: Schemas = "openapi",
    thinking: Thinking = "level",
    safety_settings: Sequence[object] = (),
) -> dict[str, Any]:
    """A chat completions request (its raw top-level fields) as a generateContent body."""
    messages = chat_messages(fields, "Gemini")
    system, contents = contents_of(messages)
    if not contents:
        raise BadRequest(
            "Gemini needs at least one user or assistant message beside the system prompt",
            param="messages",
        )
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    tools = TOOLS.decode(fields.get("tools", ABSENT), "tools")
    if tools:
        declarations = [_declaration(tool, i, schemas) for i, tool in enumerate(tools)]
        out["tools"] = [{"functionDeclarations": declarations}]
        config = tool_config(get_field(fields, "tool_choice", TOOL_CHOICE))
        if config is not None:
            out["toolConfig"] = config
    generation = _generation_config(fields, schemas, thinking)
    if generation:
        out["generationConfig"] = generation
    if safety_settings:
        out["safetySettings"] = safety_settings  # the deployment's, encoded as they are
    return out


def _generation_config(
    fields: Mapping[str, msgspec.Raw], schemas: Schemas, thinking: Thinking
) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name, (gemini_name, decoder) in _SAMPLING.items():
        value = get_field(fields, name, decoder)
        if value is not None:
            config[gemini_name] = value
    max_tokens = max_tokens_of(fields)
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    stop = stop_sequences(fields)
    if stop:
        config["stopSequences"] = stop
    n = get_field(fields, "n", INT)
    if n is not None and n != 1:
        if n < 1:
            raise BadRequest("'n' must be at least 1", param="n")
        config["candidateCount"] = n
    config.update(_response_format(get_field(fields, "response_format", RESPONSE_FORMAT), schemas))
    effort = get_field(fields, "reasoning_effort", STR)
    if effort is not None:
        config["thinkingConfig"] = thinking_config(effort, thinking)
    return config


def thinking_config(effort: str, thinking: Thinking) -> dict[str, Any]:
    """``reasoning_effort`` as Gemini's thinkingConfig: a thinkingLevel (Gemini 3 and later, the
    effort's own name; "none" is their least, "minimal"), or a thinkingBudget (Gemini 2.5)."""
    if thinking == "budget":
        budget = _BUDGETS.get(effort)
        if budget is None:
            raise BadRequest(
                f"'reasoning_effort' must be one of {', '.join(_BUDGETS)}", param="reasoning_effort"
            )
        return {"thinkingBudget": budget}
    if not effort or not effort.isascii() or not effort.isalpha():
        raise BadRequest("'reasoning_effort' must be a word such as low", param="reasoning_effort")
    return {"thinkingLevel": "minimal" if effort == "none" else effort.lower()}


def _response_format(fmt: ResponseFormat | None, schemas: Schemas) -> dict[str, Any]:
    """``response_format`` as responseMimeType and a schema."""
    if fmt is None or fmt.type == "text":  # a type-less format: refused below, naming ''
        return {}
    if fmt.type == "json_object":
        return {"responseMimeType": "application/json"}
    if fmt.type != "json_schema":
        raise BadRequest(
            f"response_format type {fmt.type or ''!r} cannot be sent to Gemini; use text, "
            "json_object or json_schema",
            param="response_format.type",
        )
    raw = fmt.json_schema.schema if fmt.json_schema is not None else ABSENT
    if not raw or raw == NULL:
        raise BadRequest(
            "'response_format.json_schema.schema' is required", param="response_format.json_schema"
        )
    out: dict[str, Any] = {"responseMimeType": "application/json"}
    param = "response_format.json_schema.schema"
    if schemas == "json_schema":
        decode_field(raw, JSON_OBJECT, param)  # an object, passed on as the client wrote it
        out["responseJsonSchema"] = raw
    else:
        out["responseSchema"] = to_gemini_schema(decode_field(raw, _ANY, param), param)
    return out


def contents_of(
    messages: list[AnyMessage],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The system instruction's parts, and the other messages as Gemini contents.

    Every system/developer message joins the system instruction. Tool results become user turns
    of functionResponse parts, named after the call they answer (Gemini pairs them by name; an
    OpenAI tool message has only the call's id). Same-role neighbours are merged, so that the
    responses to parallel calls share one turn, as Gemini requires.
    """
    return _Contents().split(messages)


class _Contents(TurnTranslator):
    """OpenAI messages as Gemini parts; made per request, for the names of its tool calls."""

    service = "Gemini"
    assistant_role = "model"
    turn_key = "parts"
    assistant_text_only = True

    def __init__(self) -> None:
        self.names: dict[str, str] = {}  # tool call id -> function name, from the assistant turns

    def text_block(self, text: str) -> dict[str, Any]:
        return {"text": text}

    def image_block(self, url: str, where: str) -> dict[str, Any]:
        return _media(url, where, None)

    def file_block(self, file: InputFile | None, where: str, j: int) -> dict[str, Any]:
        return _file_part(file, where)

    def audio_block(self, part: ContentPart, where: str) -> dict[str, Any]:
        audio = part.input_audio
        mime = _AUDIO_TYPES.get(audio.format) if audio is not None else None
        if audio is None or mime is None or audio.data is None:
            raise BadRequest(
                f"'{where}.input_audio' must carry base64 'data' of format wav or mp3",
                param=f"{where}.input_audio",
            )
        return {"inlineData": {"mimeType": mime, "data": audio.data}}

    def tool_use(self, call: ToolCall, where: str) -> dict[str, Any]:
        function = call.function
        if function is None or call.type != "function" or not function.name:
            raise BadRequest(f"'{where}' must be a function tool call with a name", param=where)
        args = json_object(function.arguments, f"{where}.function.arguments", _OBJECT_CHECK)
        part: dict[str, Any] = {"functionCall": {"name": function.name, "args": args}}
        if call.id:
            self.names[call.id] = function.name
            _, mark, signature = call.id.partition(SIGNATURE_MARK)
            if mark and signature:
                part["thoughtSignature"] = signature
        return part

    def tool_result(self, message: AnyMessage, where: str) -> dict[str, Any]:
        name = self.names.get(message.tool_call_id or "")
        if name is None:
            raise BadRequest(
                f"'{where}.tool_call_id' answers no tool call of an earlier assistant message; "
                "Gemini needs the function's name, which only that call gives",
                param=f"{where}.tool_call_id",
            )
        content = f"{where}.content"
        parts = self.text_only(self.blocks(message.content, content), content, "a tool")
        text = "".join(part["text"] for part in parts)
        try:  # a JSON object is the response itself; anything else is its output
            JSON_OBJECT.decode(text)
            response: Any = msgspec.Raw(text.encode())
        except (msgspec.DecodeError, RecursionError):
            response = {"output": text}
        return {"functionResponse": {"name": name, "response": response}}


def part_of(part: ContentPart, where: str) -> dict[str, Any] | None:
    """One OpenAI content part as a Gemini part (None for empty text)."""
    block: dict[str, Any] | None = _Contents().part_block(part, where, 0)
    return block


def _media(url: str, where: str, filename: str | None) -> dict[str, Any]:
    """A data URL inline; an https:// (public or signed) or gs:// URL as fileData, which Gemini
    fetches itself. Anything else (plain http, a local path) Gemini cannot read: a 400."""
    if url.startswith("data:"):
        mime, data = split_data_url(url, where)
        return {"inlineData": {"mimeType": mime, "data": data}}
    if url.startswith(_URL_SCHEMES):
        file_data = {"fileUri": url}
        guessed = mimetypes.guess_type(filename or url.split("?", 1)[0], strict=False)[0]
        if guessed:  # Gemini needs it for a URL it fetches; its Files API URIs know their own
            file_data = {"mimeType": guessed, **file_data}
        return {"fileData": file_data}
    raise BadRequest(
        f"'{where}' must be a base64 data URL or an https:// or gs:// URL that Gemini can fetch",
        param=where,
    )


def _file_part(file: InputFile | None, where: str) -> dict[str, Any]:
    """An OpenAI ``file`` part: inline data (a PDF, say), or a Gemini file URI as its id."""
    if file is not None and file.file_data is not None:
        if file.file_data.startswith("data:"):
            return _media(file.file_data, f"{where}.file_data", None)
        # OpenAI also takes bare base64 here, and its file parts are PDFs
        return {"inlineData": {"mimeType": "application/pdf", "data": file.file_data}}
    if file is not None and file.file_id is not None:
        return _media(file.file_id, f"{where}.file_id", file.filename)
    raise BadRequest(
        f"'{where}' must carry 'file_data', or a Gemini file URI (https://...) as 'file_id'",
        param=where,
    )


def _declaration(tool: Tool, i: int, schemas: Schemas) -> dict[str, Any]:
    """An OpenAI function tool as a Gemini function declaration."""
    out, schema = function_tool(tool, i, "Gemini")
    # A tool without parameters: Gemini takes a declaration without any.
    if not is_empty_schema(schema):
        param = f"tools[{i}].function.parameters"
        if schemas == "json_schema":
            decode_field(schema, JSON_OBJECT, param)
            out["parametersJsonSchema"] = schema
        else:
            out["parameters"] = to_gemini_schema(decode_field(schema, _ANY, param), param)
    return out


def tool_config(choice: str | ToolChoice | None) -> dict[str, Any] | None:
    """OpenAI's ``tool_choice`` as Gemini's ``toolConfig`` (None: Gemini's default, AUTO)."""
    if choice is None:
        return None
    if choice in ("auto", "none", "required"):
        mode = {"auto": "AUTO", "none": "NONE", "required": "ANY"}[str(choice)]
        return {"functionCallingConfig": {"mode": mode}}
    if isinstance(choice, ToolChoice) and choice.type == "function" and choice.function:
        allowed = {"mode": "ANY", "allowedFunctionNames": [choice.function.name]}
        return {"functionCallingConfig": allowed}
    raise BadRequest(
        "'tool_choice' must be auto, required, none or a function for Gemini", param="tool_choice"
    )
