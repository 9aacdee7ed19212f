"""``/v1/embeddings``: a unit vector per input, a pure function of the input's text or token ids."""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from collections.abc import Sequence

from aioproxy import Call, JSONReply, Reply

from .inputs import TokenIds, embedding_dimensions, embedding_inputs, wants_base64
from .settings import EchoSettings, pace
from .text import count_words

__all__ = ["answer", "embed"]


def _seed(piece: str | TokenIds) -> bytes:
    # Token ids get a prefix no UTF-8 text starts with, so [1, 2] and "1,2" differ.
    if isinstance(piece, str):
        return piece.encode()
    return b"\xfftokens:" + ",".join(map(str, piece)).encode()


def embed(piece: str | TokenIds, dimensions: int) -> tuple[float, ...]:
    """An L2-normalised vector from SHAKE-256 of the input, rounded to float32.

    Rounded so that the float and base64 answers carry exactly the same numbers.
    """
    raw = hashlib.shake_256(_seed(piece)).digest(4 * dimensions)
    values = [n / 2**31 - 1.0 for n in struct.unpack(f"<{dimensions}I", raw)]  # in [-1, 1)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return struct.unpack(f"<{dimensions}f", _pack([v / norm for v in values]))


def _pack(vector: Sequence[float]) -> bytes:
    """Little-endian float32, as OpenAI's base64 embeddings are."""
    return struct.pack(f"<{len(vector)}f", *vector)


def _words(piece: str | TokenIds) -> int:
    return count_words(piece) if isinstance(piece, str) else len(piece)


async def answer(call: Call, settings: EchoSettings) -> Reply:
    pieces = embedding_inputs(call)
    dimensions = embedding_dimensions(call) or settings.dimensions
    as_base64 = wants_base64(call)
    data = []
    for index, piece in enumerate(pieces):
        vector = embed(piece, dimensions)
        # The SDK asks for base64 by default, and decodes it itself.
        encoded = base64.b64encode(_pack(vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(map(_words, pieces))
    await pace(settings.delay)  # one step for the whole batch, as an encoder does it in one pass
    return JSONReply.of(
        {
            "object": "list",
            "data": data,
            "model": call.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
