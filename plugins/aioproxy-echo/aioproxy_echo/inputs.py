"""Reading the request body: each field the echo uses, checked, with a 400 that names the field.

Only the fields the echo needs are decoded (``call.get``); everything else is accepted and ignored.
"""

from __future__ import annotations

from typing import Any, TypeGuard

from aioproxy import BadRequest, Call

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

# Content parts whose text the echo reads; any other part (images, audio, files) is skipped.
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}

TokenIds = list[int]


def missing(param: str) -> BadRequest:
    return BadRequest(
        f"Missing required parameter: '{param}'", param=param, code="missing_required_parameter"
    )


def invalid(param: str, expected: str, code: str = "invalid_type") -> BadRequest:
    return BadRequest(f"'{param}' must be {expected}", param=param, code=code)


def _is_int(value: object) -> TypeGuard[int]:
    # JSON true/false decode to bool, which is an int subclass; they are not numbers here.
    return isinstance(value, int) and not isinstance(value, bool)


def _bounded_int(call: Call, name: str, low: int, high: int | None = None) -> int | None:
    value = call.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid(name, "an integer")
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
    options = call.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid("stream_options", "an object")
    value = options.get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise invalid("stream_options.include_usage", "a boolean")
    return bool(value)


def content_text(content: Any, param: str) -> str:
    """The text of a message's ``content``: a string, null, or parts (their text, one per line)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(param, "a string or an array of content parts")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(f"{param}[{i}]", "a content part object with a 'type'")
        key = _TEXT_PARTS.get(part["type"])
        if key is None:
            continue
        text = part.get(key)
        if not isinstance(text, str):
            raise invalid(f"{param}[{i}].{key}", "a string")
        texts.append(text)
    return "\n".join(texts)


def _message(item: Any, param: str) -> tuple[str, str]:
    """A message's role and text."""
    if not isinstance(item, dict):
        raise invalid(param, "an object")
    role = item.get("role")
    if role is None:
        raise missing(f"{param}.role")
    if not isinstance(role, str):
        raise invalid(f"{param}.role", "a string")
    return role, content_text(item.get("content"), f"{param}.content")


def chat_input(call: Call) -> tuple[str, int]:
    """The last user message's text, and the words in every message (the prompt tokens)."""
    messages = call.get("messages")
    if messages is None:
        raise missing("messages")
    if not isinstance(messages, list) or not messages:
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
    instructions = call.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("instructions", "a string")
    words = count_words(instructions or "")
    value = call.get("input")
    if value is None:
        raise missing("input")
    if isinstance(value, str):
        return value, words + count_words(value)
    if not isinstance(value, list):
        raise invalid("input", "a string or an array of input items")
    last_user = ""
    for i, item in enumerate(value):
        if isinstance(item, dict) and item.get("type", "message") != "message":
            continue
        role, text = _message(item, f"input[{i}]")
        words += count_words(text)
        if role == "user":
            last_user = text
    return last_user, words


def _token_ids(value: Any) -> TokenIds | None:
    """``value`` as a non-empty list of token ids, or ``None`` if it is not one."""
    if isinstance(value, list) and value and all(_is_int(token) for token in value):
        return value
    return None


def _texts_or_token_lists(value: Any, param: str, what: str) -> list[str | TokenIds]:
    """A string, a list of strings, a list of token ids or a list of token-id lists, as a list."""
    if isinstance(value, str):
        return [value]
    ids = _token_ids(value)
    if ids is not None:
        return [ids]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return list(value)
        lists: list[str | TokenIds] = [ids for item in value if (ids := _token_ids(item))]
        if len(lists) == len(value):
            return lists
    raise invalid(
        param,
        f"{what}: a string, a non-empty array of strings, of token ids, or of token-id arrays",
    )


def completion_prompts(call: Call) -> list[str]:
    """Every prompt as text; token ids are echoed as their numbers, one word per token."""
    prompt = call.get("prompt")
    if prompt is None:
        raise missing("prompt")
    pieces = _texts_or_token_lists(prompt, "prompt", "the prompt")
    return [p if isinstance(p, str) else " ".join(map(str, p)) for p in pieces]


def embedding_inputs(call: Call) -> list[str | TokenIds]:
    """Every input to embed, as a string or a list of token ids."""
    value = call.get("input")
    if value is None:
        raise missing("input")
    return _texts_or_token_lists(value, "input", "the input to embed")


def embedding_dimensions(call: Call) -> int | None:
    return _bounded_int(call, "dimensions", 1, MAX_DIMENSIONS)


def wants_base64(call: Call) -> bool:
    """``encoding_format``: "float" (the default) or "base64"."""
    value = call.get("encoding_format")
    if value is None or value == "float":
        return False
    if value == "base64":
        return True
    raise invalid("encoding_format", "'float' or 'base64'", code="invalid_value")
