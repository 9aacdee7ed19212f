"""Authentication by the config's master key and virtual keys."""

from __future__ import annotations

import hashlib
import logging

from aiohttp import web

from ..config import Config, Secret
from ..context import ANONYMOUS, Principal
from ..errors import AuthenticationError
from ..hookspecs import hookimpl

log = logging.getLogger("aioproxy")

__all__ = ["ConfigAuth", "key_id", "presented_key"]


def presented_key(request: web.Request) -> str | None:
    """The key a client sent: ``Authorization: Bearer``, ``api-key`` or ``x-api-key``."""
    headers = request.headers
    authorization = headers.get("Authorization")
    if authorization is not None:
        if authorization.startswith("Bearer "):  # as clients send it: the parse below, shorter
            token = authorization[7:].strip()
            if token:
                return token
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return headers.get("api-key") or headers.get("x-api-key") or None


def key_id(key: str) -> str:
    """A key's stable identity: a digest that names it without revealing it."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]


class ConfigAuth:
    """Looks the presented key up in a dict of the configured keys.

    The lookup leaks nothing about a key's bytes through its timing: the dict compares strings
    only once their hashes match, and str hashes are SipHash under a key drawn at random per
    process, so an attacker can neither aim a guess at a stored hash nor learn from a near miss
    (a byte-by-byte comparison never runs on a wrong key, bar a 64-bit hash collision). It costs
    one lookup whatever the number of keys. With no key configured the proxy is open.
    """

    def __init__(self, config: Config) -> None:
        self._principals: dict[str, Principal] = {}  # keys held as Secret: a repr shows none
        auth = config.auth
        if auth.master_key:
            self._principals[Secret(auth.master_key)] = Principal(
                "master", is_master=True, id=key_id(auth.master_key)
            )
        for i, vkey in enumerate(auth.keys):
            models = frozenset(vkey.models) if vkey.models is not None else None
            self._principals[Secret(vkey.key)] = Principal(
                vkey.name or f"key-{i}", models, id=key_id(vkey.key)
            )
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
        principal = self._principals.get(key)
        if principal is None:
            raise AuthenticationError("Invalid API key", code="invalid_api_key")
        return principal
