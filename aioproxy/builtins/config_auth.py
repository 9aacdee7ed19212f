"""Authentication by the config's master key and virtual keys."""

from __future__ import annotations

import hashlib
import logging

from aiohttp import web

from ..config import Config
from ..context import ANONYMOUS, Principal
from ..errors import AuthenticationError
from ..hookspecs import hookimpl

log = logging.getLogger("aioproxy")

__all__ = ["ConfigAuth", "presented_key"]


def presented_key(request: web.Request) -> str | None:
    """The key a client sent: ``Authorization: Bearer``, ``api-key`` or ``x-api-key``."""
    headers = request.headers
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return headers.get("api-key") or headers.get("x-api-key") or None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class ConfigAuth:
    """Looks the presented key up by its SHA-256 digest.

    Hashing first makes the comparison constant-time with respect to the keys: the dict compares
    digests, and how long that takes says nothing about any key's bytes (a digest prefix gives no
    key prefix). It also costs one lookup whatever the number of keys. With no key configured the
    proxy is open.
    """

    def __init__(self, config: Config) -> None:
        self._principals: dict[bytes, Principal] = {}
        auth = config.auth
        if auth.master_key:
            self._principals[_digest(auth.master_key)] = Principal("master", is_master=True)
        for i, vkey in enumerate(auth.keys):
            models = frozenset(vkey.models) if vkey.models is not None else None
            self._principals[_digest(vkey.key)] = Principal(vkey.name or f"key-{i}", models)
        self.open = not self._principals

    @hookimpl(trylast=True)
    def authenticate(self, request: web.Request) -> Principal:
        if self.open:
            return ANONYMOUS
        key = presented_key(request)
        if key is None:
            raise AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer <key>', 'api-key' or 'x-api-key'",
                code="missing_api_key",
            )
        principal = self._principals.get(_digest(key))
        if principal is None:
            raise AuthenticationError("Invalid API key", code="invalid_api_key")
        return principal
