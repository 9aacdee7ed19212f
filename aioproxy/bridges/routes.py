"""``GET`` and ``DELETE /v1/responses/{response_id}``: stored responses, for their creator only."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from ..errors import NotFound
from ..keys import gateway_key
from ..routes import Kind
from .store import ResponseStore, owner_of

__all__ = ["RESPONSE_PATHS", "delete_response", "get_response"]

RESPONSE_PATHS = ("/v1/responses/{response_id}", "/responses/{response_id}")

_encode = msgspec.json.Encoder().encode


def _json(obj: Any) -> web.Response:
    return web.Response(body=_encode(obj), content_type="application/json")


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param="response_id")


async def _store_and_principal(request: web.Request) -> tuple[ResponseStore | None, str]:
    gateway = request.app[gateway_key]
    principal = await gateway.authenticate(request, Kind.RESPONSES)
    return gateway.store, owner_of(principal)  # the key's identity, not its name


async def get_response(request: web.Request) -> web.Response:
    """The stored Response object, or a 404 (also when another key created it)."""
    store, principal = await _store_and_principal(request)
    response_id = request.match_info["response_id"]
    found = await store.response(response_id, principal) if store is not None else None
    if found is None:
        raise _not_found(response_id)
    return _json(found)


async def delete_response(request: web.Request) -> web.Response:
    """Delete a stored response: OpenAI's deletion object, or a 404."""
    store, principal = await _store_and_principal(request)
    response_id = request.match_info["response_id"]
    if store is None or not await store.delete(response_id, principal):
        raise _not_found(response_id)
    return _json({"id": response_id, "object": "response", "deleted": True})
