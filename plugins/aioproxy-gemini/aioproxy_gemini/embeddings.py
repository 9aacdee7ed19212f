"""OpenAI embeddings <-> Gemini ``embedContent`` (one input) / ``batchEmbedContents`` (several)."""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from typing import Any

import msgspec

from aioproxy import ABSENT, INT, STR, ArrayOf, BadRequest, get_field, text_or_array

__all__ = [
    "MAX_INPUTS",
    "Batch",
    "Single",
    "decode_batch",
    "decode_single",
    "embed_request",
    "inputs_of",
    "to_embeddings",
    "wants_base64",
]

MAX_INPUTS = 2048  # OpenAI's own limit on one request's inputs


class _Values(msgspec.Struct):
    values: list[float]


class Single(msgspec.Struct):
    """embedContent's answer."""

    embedding: _Values


class Batch(msgspec.Struct):
    """batchEmbedContents' answer: one embedding per request, in order."""

    embeddings: list[_Values]


decode_single = msgspec.json.Decoder(Single).decode
decode_batch = msgspec.json.Decoder(Batch).decode
_INPUTS: ArrayOf[str | int | list[int]] = ArrayOf(str | int | list[int], MAX_INPUTS)


def inputs_of(fields: Mapping[str, msgspec.Raw]) -> list[str]:
    """The texts to embed: ``input``, a string or an array of strings."""
    value = text_or_array(fields.get("input", ABSENT), _INPUTS, "input")
    if value is None:
        raise BadRequest("'input' is required: a string or an array of strings", param="input")
    if isinstance(value, str):
        return [value]
    texts = []
    for item in value:
        if not isinstance(item, str):
            raise BadRequest("Gemini embeds text only, not token ids", param="input")
        texts.append(item)
    if not texts:
        raise BadRequest("'input' must not be empty", param="input")
    return texts


def embed_request(
    model: str, texts: list[str], fields: Mapping[str, msgspec.Raw], task_type: str | None
) -> dict[str, Any]:
    """One EmbedContentRequest per text; ``model``: ``models/<id>``, which batch items name."""
    options: dict[str, Any] = {}
    dimensions = get_field(fields, "dimensions", INT)
    if dimensions is not None:
        if dimensions < 1:
            raise BadRequest("'dimensions' must be at least 1", param="dimensions")
        options["outputDimensionality"] = dimensions
    if task_type:
        options["taskType"] = task_type
    requests = [{"content": {"parts": [{"text": text}]}, **options} for text in texts]
    if len(requests) == 1:
        return requests[0]
    return {"requests": [{"model": model, **request} for request in requests]}


def wants_base64(fields: Mapping[str, msgspec.Raw]) -> bool:
    """``encoding_format``: "float" (the default) or "base64", which the openai SDK sends."""
    encoding = get_field(fields, "encoding_format", STR) or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest("encoding_format must be 'float' or 'base64'", param="encoding_format")
    return encoding == "base64"


def _base64(vector: list[float]) -> str:
    """A vector as ``encoding_format: "base64"`` has it: little-endian float32s, in base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def to_embeddings(vectors: list[list[float]], *, model: str, as_base64: bool) -> dict[str, Any]:
    """The vectors as OpenAI's embeddings list. Gemini's embedding answers count no tokens, so
    the usage says 0 (a budget plugin must not take it for a measure)."""
    data = [
        {"object": "embedding", "index": i, "embedding": _base64(v) if as_base64 else v}
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": 0, "total_tokens": 0}
    return {"object": "list", "data": data, "model": model, "usage": usage}
