"""Typed decoding of request body fields, for code that translates a request: a 400 that names the
field (its JSON path) for a value of the wrong type, and arrays counted before they are built.

The body reaches providers as its top-level fields, each the raw bytes the client sent
(``Call.fields``). A translator decodes the fields it reads straight into Structs (unknown keys
ignored, never built), never the whole body into dicts: a long array of tiny items (``[{},{},...]``)
costs dozens of times its size as Python objects.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Generic, NoReturn, TypeVar

import msgspec

from .errors import BadRequest

__all__ = [
    "ABSENT",
    "BOOL",
    "FLOAT",
    "INT",
    "MAX_CONTENT_PARTS",
    "MAX_MESSAGES",
    "MAX_STOP",
    "MAX_TOOLS",
    "MAX_TOOL_CALLS",
    "NULL",
    "STR",
    "ArrayOf",
    "decode_field",
    "get_field",
    "raw_fields",
    "text_or_array",
]

# Counts a translated request may hold. They bound the objects a request can make the proxy
# build, not what a model may be sent: MAX_MESSAGES, MAX_TOOLS and MAX_STOP are OpenAI's own
# limits, so no request OpenAI takes is refused; the others are far beyond any real request.
# Constants, not config: there is little reason to raise them, and the bridges that read
# them are made without the config.
MAX_MESSAGES = 2048  # chat messages; also Responses input items
MAX_CONTENT_PARTS = 1024  # content parts of one message or item
MAX_TOOL_CALLS = 1024  # tool calls of one assistant message
MAX_TOOLS = 128  # tools (and allowed tools)
MAX_STOP = 4  # stop sequences

T = TypeVar("T")

ABSENT = msgspec.Raw()  # the default of a Struct's Raw field: the key was not sent
NULL = msgspec.Raw(b"null")
# Scalars, null allowed (a field sent as null is one not sent).
BOOL = msgspec.json.Decoder(bool | None)
INT = msgspec.json.Decoder(int | None)
FLOAT = msgspec.json.Decoder(float | None)
STR = msgspec.json.Decoder(str | None)

_encode = msgspec.json.Encoder().encode
_ARRAY = ord("[")
_SHORT = 32  # items in most arrays: counted first with a counter that size
# Bytes of an array decoded before it is counted, nested arrays included: as tiny items
# (``{},``) it makes ~2 MiB of objects at most. Most requests' arrays are smaller.
_SMALL = 64 * 1024
# Text, or what text_or_array hands an array to: this decoder never sees one, but its type
# says what was expected in the error message ("Expected `str | array | null`").
_TEXT = msgspec.json.Decoder(str | list[Any] | None)


def raw_fields(body: Mapping[str, Any]) -> dict[str, msgspec.Raw]:
    """``body`` as ``Call.fields`` holds a body: each top-level value as its JSON bytes."""
    return {name: msgspec.Raw(_encode(value)) for name, value in body.items()}


def _path(param: str, exc: msgspec.ValidationError) -> tuple[str, str]:
    """msgspec's ``Expected `str`, got `int` - at `$[2].role``` as (``param[2].role``, reason)."""
    reason, at, where = str(exc).partition(" - at `$")
    return (param + where.rstrip("`") if at else param), reason


def decode_field(raw: msgspec.Raw | bytes, decoder: msgspec.json.Decoder[T], param: str) -> T:
    """``raw`` decoded by ``decoder``; a 400 naming ``param`` (and the path within it) if it
    cannot be: a wrong type, a number out of range, nesting too deep."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        where, reason = _path(param, exc)
        raise BadRequest(f"Invalid '{where}': {reason}", param=where, code="invalid_type") from None
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        deep = isinstance(exc, RecursionError)
        problem = "is nested too deeply" if deep else f"cannot be read: {exc}"
        raise BadRequest(f"'{param}' {problem}", param=param, code="invalid_value") from None


def get_field(
    fields: Mapping[str, msgspec.Raw], name: str, decoder: msgspec.json.Decoder[T]
) -> T | None:
    """The top-level body field ``name`` decoded by ``decoder`` (which takes null); None when
    absent."""
    raw = fields.get(name)
    return None if raw is None else decode_field(raw, decoder, name)


@functools.cache
def _counter(limit: int) -> msgspec.json.Decoder[Any]:
    """Decodes any JSON array of at most ``limit`` items, building nothing but ``limit`` views.

    msgspec checks a list's ``max_length`` only once the list is built; an array-like Struct
    with ``limit`` fields that forbids more refuses a longer array as it reads it, skipping
    (not building) the rest.
    """
    fields = [(f"_{i}", msgspec.Raw, msgspec.Raw()) for i in range(limit)]
    counter = msgspec.defstruct(
        f"AtMost{limit}", fields, array_like=True, forbid_unknown_fields=True, gc=False
    )
    return msgspec.json.Decoder(counter)


class ArrayOf(Generic[T]):
    """Decodes a JSON array of ``item`` (a type msgspec decodes), refusing one of more than
    ``limit`` items with a 400 before many of them are built.

    A small array costs little even as tiny items: it is decoded at once, then measured, as
    ``small_item`` if given (the item with the arrays inside it typed too, rather than kept raw:
    they are small as well). A larger one is counted first, at C speed, building nothing.
    The counters are made when a large array first comes, not with the ArrayOf: one costs
    ~500 bytes a slot (33 MiB and 0.6 s for 65,536), and most processes never see such arrays.
    """

    __slots__ = ("_decoder", "_limits", "_small_decoder", "limit")

    def __init__(self, item: Any, limit: int, small_item: Any = None) -> None:
        self.limit = limit
        self._decoder: msgspec.json.Decoder[list[T] | None] = msgspec.json.Decoder(
            list.__class_getitem__(item) | None  # a type made at run time
        )
        self._small_decoder: msgspec.json.Decoder[list[T] | None] = msgspec.json.Decoder(
            list.__class_getitem__(small_item or item) | None
        )
        # A counter costs a slot per item it may hold: most arrays are short, so a small one
        # is tried first.
        self._limits = sorted({min(_SHORT, limit), limit})

    def decode(self, value: msgspec.Raw | bytes | list[T] | None, param: str) -> list[T] | None:
        """The items of ``value``: its JSON (empty: absent), or a list already decoded (within
        a small array) to measure. None for null or absent."""
        if not isinstance(value, (msgspec.Raw, bytes)):
            if value is not None and len(value) > self.limit:
                self._too_long(param)
            return value
        if not value:
            return None
        if len(value) <= _SMALL:
            items = decode_field(value, self._small_decoder, param)
            if items is not None and len(items) > self.limit:
                self._too_long(param)
            return items
        # Each item takes a byte and a comma: an array shorter than that holds no more than the
        # limit, and is not counted.
        if len(value) > 2 * self.limit and memoryview(value)[0] == _ARRAY:
            self._count(value, param)
        return decode_field(value, self._decoder, param)

    def _count(self, raw: msgspec.Raw | bytes, param: str) -> None:
        for limit in self._limits:
            try:
                _counter(limit).decode(raw)
                return
            except msgspec.ValidationError:  # only length can fail: any item is a Raw
                continue
            except (msgspec.DecodeError, RecursionError):
                return  # the decoder says what is wrong, where
        self._too_long(param)

    def _too_long(self, param: str) -> NoReturn:
        raise BadRequest(
            f"Invalid '{param}': array too long; at most {self.limit} items are allowed",
            param=param,
            code="array_above_max_length",
        )


def text_or_array(
    value: msgspec.Raw | bytes | str | list[T] | None, array: ArrayOf[T], param: str
) -> str | list[T] | None:
    """A string, null or an array decoded by ``array`` (message content, ``stop``, ``input``),
    from its JSON (empty: absent, None) or decoded already (within a small array)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (msgspec.Raw, bytes)):
        if not value:
            return None
        if memoryview(value)[0] != _ARRAY:
            text: str | None = decode_field(value, _TEXT, param)  # not an array
            return text
    return array.decode(value, param)
