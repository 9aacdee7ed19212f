"""OpenAI embeddings <-> Bedrock's InvokeModel bodies of Titan and Cohere embedding models.

Titan embeds one text a call (``inputText``), Cohere up to 96 (``texts``): :func:`batches` says
how the inputs are cut, :func:`request` and :func:`vectors` build and read each call's body.
"""

from __future__ import annotations

import base64
import struct
from typing import Any, Literal

import msgspec

from aioproxy import BadRequest

__all__ = ["Family", "base64_vector", "batches", "family_of", "request", "vectors"]

Family = Literal["titan", "cohere"]
_COHERE_BATCH = 96  # texts in one Cohere call (its limit on Bedrock)


def family_of(model_id: str, configured: Family | None) -> Family | None:
    """The body format ``model_id`` takes: the configured one, else guessed from the id
    (``amazon.titan-embed-*``, ``cohere.embed-*``, with or without a region prefix)."""
    if configured is not None:
        return configured
    if "titan-embed" in model_id:
        return "titan"
    if "cohere.embed" in model_id:
        return "cohere"
    return None


def batches(family: Family, texts: list[str]) -> list[list[str]]:
    size = 1 if family == "titan" else _COHERE_BATCH
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def request(family: Family, texts: list[str], dimensions: int | None, input_type: str) -> bytes:
    """One InvokeModel body for ``texts`` (one text for Titan)."""
    body: dict[str, Any]
    if family == "titan":
        body = {"inputText": texts[0]}
        if dimensions is not None:
            body["dimensions"] = dimensions
    else:
        body = {"texts": texts, "input_type": input_type, "embedding_types": ["float"]}
        if dimensions is not None:
            body["output_dimension"] = dimensions  # Cohere Embed v4; v3 refuses it (a 400)
    return msgspec.json.encode(body)


class _Titan(msgspec.Struct):
    embedding: list[float]
    inputTextTokenCount: int | None = None  # noqa: N815 - Titan's name


Vectors = list[list[float]]


class _CohereTypes(msgspec.Struct):
    floats: Vectors = msgspec.field(name="float")  # the one type asked for


class _Cohere(msgspec.Struct):
    # embeddings_floats: a list of vectors; embeddings_by_type: by type, as asked for here
    embeddings: list[list[float]] | _CohereTypes


_decode_titan = msgspec.json.Decoder(_Titan).decode
_decode_cohere = msgspec.json.Decoder(_Cohere).decode


def vectors(family: Family, body: bytes) -> tuple[list[list[float]], int | None]:
    """One call's vectors and, if the body says, its input token count.

    Raises msgspec.DecodeError when the body is not of the family's shape.
    """
    if family == "titan":
        titan = _decode_titan(body)
        return [titan.embedding], titan.inputTextTokenCount
    embeddings = _decode_cohere(body).embeddings
    return (embeddings.floats if isinstance(embeddings, _CohereTypes) else embeddings), None


def texts_of(value: Any) -> list[str]:
    """``input``: a string or a list of them (Bedrock's embedding models take no token ids)."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest("Bedrock embeds a string or a list of strings", param="input")
    return texts


def base64_vector(vector: list[float]) -> str:
    """A vector as ``encoding_format: "base64"`` has it: little-endian float32s, in base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
