"""Reading the request body: each field the echo uses, checked, with a 400 that names the field.

Only the fields the echo needs are decoded, from their bytes straight into typed values (arrays
counted before they are built: ``aioproxy.fields``); everything else is accepted and ignored.
"""

from __future__ import annotations

import msgspec

from aioproxy import (
    ABSENT,
    INT,
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    STR,
    ArrayOf,
    BadRequest,
    Call,
    decode_field,
    get_field,
    text_or_array,
)

from .text import count_words

__all__ = [
    "MAX_CHOICES",
    "MAX_DIMENSIONS",
    "chat_input",
    "choice_count",
    "completion_prompts",
    "content_text",
    "embedding_dimensions",
    "embedding_inputs",
    "include_usage",
    "response_input",
    "token_cap",
    "wants_base64",
]

MAX_CHOICES = 128  # OpenAI's own limit on ``n``
MAX_DIMENSIONS = 65536  # far beyond any real model; only guards memory
MAX_INPUTS = 2048  # prompts or inputs to embed: OpenAI's own limit
MAX_TOKEN_IDS = 65536  # in one prompt or input given as token ids; only guards memory

# Content parts whose text the echo reads; any other part (images, audio, files) is skipped.
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}

TokenIds = list[int]


def missing(param: str) -> BadRequest:
    return BadRequest(
        f"Missing required parameter: '{param}'", param=param, code="missing_required_parameter"
    )


def invalid(param: str, expected: str, code: str = "invalid_type") -> BadRequest:
    return BadRequest(f"'{param}' must be {expected}", param=param, code=code)


class _Part(msgspec.Struct):
    type: str
    text: str | None = None
    refusal: str | None = None


class _Message(msgspec.Struct):
    type: str = "message"  # Responses input items: only messages are read
    role: str | None = None
    content: msgspec.Raw = ABSENT  # a string, null or parts


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


_MESSAGES: ArrayOf[_Message] = ArrayOf(_Message, MAX_MESSAGES)
_PARTS: ArrayOf[_Part] = ArrayOf(_Part, MAX_CONTENT_PARTS)
_PIECES: ArrayOf[msgspec.Raw] = ArrayOf(msgspec.Raw, MAX_INPUTS)
_TOKEN_IDS: ArrayOf[int] = ArrayOf(int, MAX_TOKEN_IDS)
_STREAM_OPTIONS = msgspec.json.Decoder(_StreamOptions | None)
_TEXT_OR_ID = msgspec.json.Decoder(str | int)
_ARRAY = ord("[")


def _bounded_int(call: Call, name: str, low: int, high: int | None = None) -> int | None:
    value = get_field(call.fields, name, INT)
    if value is None:
        return None
    if value < low or (high is not None and value > high):
        limit = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise invalid(name, f"an integer {limit}, got {value}", code="invalid_value")
    return value


def token_cap(call: Call, *names: str) -> int | None:
    """The reply's token budget: the first of ``names`` the client set (``None``: no cap)."""
    for name in names:
        cap = _bounded_int(call, name, 1)
        if cap is not None:
            return cap
    return None


def choice_count(call: Call) -> int:
    """``n``: how many choices to answer with per prompt."""
    n = _bounded_int(call, "n", 1, MAX_CHOICES)
    return 1 if n is None else n


def include_usage(call: Call) -> bool:
    """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
    options = get_field(call.fields, "stream_options", _STREAM_OPTIONS)
    return options is not None and bool(options.include_usage)


def content_text(content: msgspec.Raw, param: str) -> str:
    """The text of a message's ``content`` (as sent): a string, null, or parts (their text, one
    per line)."""
    value = text_or_array(content, _PARTS, param)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    texts = []
    for i, part in enumerate(value):
        key = _TEXT_PARTS.get(part.type)
        if key is None:
            continue
        text = part.text if key == "text" else part.refusal
        if text is None:
            raise invalid(f"{param}[{i}].{key}", "a string")
        texts.append(text)
    return "\n".join(texts)


def _message(item: _Message, param: str) -> tuple[str, str]:
    """A message's role and text."""
    if item.role is None:
        raise missing(f"{param}.role")
    return item.role, content_text(item.content, f"{param}.content")


def chat_input(call: Call) -> tuple[str, int]:
    """The last user message's text, and the words in every message (the prompt tokens)."""
    messages = _MESSAGES.decode(call.fields.get("messages", ABSENT), "messages")
    if messages is None:
        raise missing("messages")
    if not messages:
        raise invalid("messages", "a non-empty array of messages")
    last_user, words = "", 0
    for i, message in enumerate(messages):
        role, text = _message(message, f"messages[{i}]")
        words += count_words(text)
        if role == "user":
            last_user = text
    return last_user, words


def response_input(call: Call) -> tuple[str, int]:
    """The text to echo from ``input``, and the words in it and in ``instructions``.

    ``input`` is a string (a user message) or a list of items; the last user message item is
    echoed. Items that are not messages (tool calls and outputs, reasoning) count for nothing.
    """
    instructions = get_field(call.fields, "instructions", STR)
    words = count_words(instructions or "")
    value = text_or_array(call.fields.get("input", ABSENT), _MESSAGES, "input")
    if value is None:
        raise missing("input")
    if isinstance(value, str):
        return value, words + count_words(value)
    last_user = ""
    for i, item in enumerate(value):
        if item.type != "message":
            continue
        role, text = _message(item, f"input[{i}]")
        words += count_words(text)
        if role == "user":
            last_user = text
    return last_user, words


def _texts_or_token_lists(call: Call, param: str, what: str) -> list[str | TokenIds]:
    """A string, a list of strings, a list of token ids or a list of token-id lists, as a list."""
    raw = call.fields.get(param)
    if raw is None:
        raise missing(param)
    expected = (
        f"{what}: a string, a non-empty array of strings, of token ids, or of token-id arrays"
    )
    if memoryview(raw)[0] != _ARRAY:
        text = decode_field(raw, STR, param)
        if text is None:
            raise missing(param)
        return [text]
    pieces = _PIECES.decode(raw, param) or []
    values = [_piece(piece, f"{param}[{i}]") for i, piece in enumerate(pieces)]
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [values]  # type: ignore[list-item]  # one prompt, as token ids
    if values and all(isinstance(v, str) for v in values):
        return values  # type: ignore[return-value]
    if values and all(isinstance(v, list) and v for v in values):
        return values  # type: ignore[return-value]
    raise invalid(param, expected)


def _piece(raw: msgspec.Raw, param: str) -> str | int | TokenIds:
    if memoryview(raw)[0] == _ARRAY:
        return _TOKEN_IDS.decode(raw, param) or []
    return decode_field(raw, _TEXT_OR_ID, param)


def completion_prompts(call: Call) -> list[str]:
    """Every prompt as text; token ids are echoed as their numbers, one word per token."""
    pieces = _texts_or_token_lists(call, "prompt", "the prompt")
    return [p if isinstance(p, str) else " ".join(map(str, p)) for p in pieces]


def embedding_inputs(call: Call) -> list[str | TokenIds]:
    """Every input to embed, as a string or a list of token ids."""
    return _texts_or_token_lists(call, "input", "the input to embed")


def embedding_dimensions(call: Call) -> int | None:
    return _bounded_int(call, "dimensions", 1, MAX_DIMENSIONS)


def wants_base64(call: Call) -> bool:
    """``encoding_format``: "float" (the default) or "base64"."""
    value = get_field(call.fields, "encoding_format", STR)
    if value is None or value == "float":
        return False
    if value == "base64":
        return True
    raise invalid("encoding_format", "'float' or 'base64'", code="invalid_value")
