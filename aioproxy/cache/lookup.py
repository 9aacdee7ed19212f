"""What a request's cache key is made of: the scope it may share answers within, the endpoint
kind, the model and the body's fields, order and the fields that do not change the answer
(``stream``, ``user``, ``metadata``, ``stream_options``) left out."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from ..config import CacheConfig
from ..context import Call
from ..routes import Kind

__all__ = ["cache_key", "cacheable"]

_IGNORED = frozenset({"model", "stream", "user", "metadata", "stream_options"})
_CACHED_KINDS = frozenset(
    {Kind.CHAT_COMPLETIONS, Kind.COMPLETIONS, Kind.EMBEDDINGS, Kind.RESPONSES}
)
_encode_sorted = msgspec.json.Encoder(order="sorted").encode
_decode = msgspec.json.Decoder().decode


def cacheable(call: Call, config: CacheConfig) -> bool:
    """Embeddings always; chat, completions and non-stored responses when deterministic
    (``temperature`` 0) or when the config caches sampled answers too."""
    kind = call.kind
    if kind not in _CACHED_KINDS:
        return False
    if kind is Kind.EMBEDDINGS:
        return True
    if kind is Kind.RESPONSES and call.get("store") is not False:
        return False  # a stored response is its own record, with its own id
    if config.cache_sampled:
        return True
    temperature: Any = call.get("temperature", 1)  # OpenAI's default is 1: sampled
    return isinstance(temperature, int | float) and temperature == 0


def cache_key(call: Call, scope: str) -> str:
    """The key of ``call``'s answer within ``scope`` (a key's, a team's id, or "*")."""
    fields = {name: _decode(raw) for name, raw in call.fields.items() if name not in _IGNORED}
    digest = hashlib.sha256()
    for part in (scope, call.kind.value, call.model):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(_encode_sorted(fields))
    return digest.hexdigest()
