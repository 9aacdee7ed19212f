"""``/v1/responses/{response_id}`` (GET, DELETE), its ``input_items`` and ``cancel``: each
response for its creator only.

A response an upstream created natively is asked of the deployment that created it, through its
provider's ``response_action`` (see the ``openai`` plugin); a bridged one is answered from the
response store. Another key's response, or one the gateway never saw, is a 404 either way.
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import quote

import msgspec
from aiohttp import web

from ..context import Deployment, Principal
from ..errors import BadRequest, NotFound
from ..keys import runtime_key
from ..providers import JSONReply
from ..routes import Kind
from .input_items import input_items, item_page
from .native import not_found
from .store import BrokenChain, HistoryTooLarge, owner_of

__all__ = ["ResponseAction", "response_routes"]

_PREFIXES = (
    "/v1/responses/{response_id}",
    "/responses/{response_id}",
    "/openai/v1/responses/{response_id}",  # Azure's v1 form (aioproxy.routes.AZURE_ALIASES)
)

_encode = msgspec.json.Encoder().encode


class ResponseAction(Protocol):
    """A provider's ``response_action``: call ``path`` (query string included) on the
    deployment's upstream with ``method``, and answer with its JSON reply."""

    async def __call__(self, deployment: Deployment, method: str, path: str) -> JSONReply: ...


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encode(obj), status=status, content_type="application/json")


class _Target:
    """The response a request names, for the principal asking: upstream or stored."""

    __slots__ = ("deployment", "principal", "request", "response_id")

    def __init__(
        self, request: web.Request, principal: Principal, deployment: Deployment | None
    ) -> None:
        self.request = request
        self.principal = principal
        self.response_id: str = request.match_info["response_id"]
        self.deployment = deployment  # the native response's, else None (a stored one)

    async def ask_upstream(self, method: str, suffix: str = "") -> web.Response:
        """Relay ``method`` on the response's upstream path (``suffix`` after its id)."""
        assert self.deployment is not None
        registry = self.request.app[runtime_key].registry
        provider = registry.providers.get(self.deployment.provider)
        action: ResponseAction | None = getattr(provider, "response_action", None)
        if action is None:
            raise NotFound(
                f"Response with id '{self.response_id}' was created by provider "
                f"'{self.deployment.provider}', which cannot read it back",
                param="response_id",
            )
        path = f"/responses/{quote(self.response_id, safe='')}{suffix}"
        if self.request.query_string:
            path += "?" + self.request.query_string
        reply = await action(self.deployment, method, path)
        return web.Response(body=reply.body, status=reply.status, content_type="application/json")

    @property
    def owner(self) -> str:
        return owner_of(self.principal)  # the key's identity, never its name

    async def stored(self) -> dict[str, Any]:
        """The stored (bridged) Response object; a 404 if there is none."""
        store = self.request.app[runtime_key].store
        found = await store.response(self.response_id, self.owner) if store else None
        if found is None:
            raise not_found(self.response_id)
        return found

    async def conversation(self) -> list[dict[str, Any]]:
        """The stored response's conversation, its answer last; when an earlier link of its
        chain was deleted, or the chain is longer than a request may continue (what would be
        decoded to show one page), only its own turn."""
        runtime = self.request.app[runtime_key]
        store, limit = runtime.store, runtime.config.server.max_body_size
        try:
            found = await store.get(self.response_id, self.owner, limit) if store else None
        except (BrokenChain, HistoryTooLarge):
            own = await store.input_messages(self.response_id, self.owner) if store else None
            if own is None:
                raise not_found(self.response_id) from None
            return [*own, {}]  # the answer's place: input_items leaves the last message out
        if found is None:
            raise not_found(self.response_id)
        return found[1]


async def _target(request: web.Request) -> _Target:
    """Authenticate, and find the named response's deployment if an upstream created it."""
    runtime = request.app[runtime_key]
    principal = await runtime.authenticate(request, Kind.RESPONSES)
    response_id = request.match_info["response_id"]
    owner = await runtime.registry.natives.owner(response_id)
    if owner is None:
        return _Target(request, principal, None)
    if owner.principal != owner_of(principal):
        raise not_found(response_id)
    if owner.deployment is None:
        raise NotFound(
            f"Response with id '{response_id}' was created by a deployment that is no longer "
            "configured",
            param="response_id",
        )
    return _Target(request, principal, owner.deployment)


async def get_response(request: web.Request) -> web.Response:
    """The Response object, or a 404 (also when another key created it)."""
    target = await _target(request)
    if request.query.get("stream", "false").lower() not in ("false", "0"):
        raise BadRequest(
            "Streaming a response back ('stream' on retrieve) is not supported by this proxy",
            param="stream",
            code="unsupported_parameter",
        )
    if target.deployment is not None:
        return await target.ask_upstream("GET")
    return _json(await target.stored())


async def delete_response(request: web.Request) -> web.Response:
    """Delete a response: OpenAI's deletion object, or a 404."""
    target = await _target(request)
    if target.deployment is not None:
        return await target.ask_upstream("DELETE")
    store = request.app[runtime_key].store
    if store is None or not await store.delete(target.response_id, target.owner):
        raise not_found(target.response_id)
    return _json({"id": target.response_id, "object": "response", "deleted": True})


async def list_input_items(request: web.Request) -> web.Response:
    """The items used to generate the response, a page at a time, or a 404."""
    target = await _target(request)
    if target.deployment is not None:
        return await target.ask_upstream("GET", "/input_items")
    conversation = await target.conversation()
    return _json(item_page(input_items(conversation, target.response_id), request.query))


async def cancel_response(request: web.Request) -> web.Response:
    """Cancel a background response; a bridged one never is, and has finished: OpenAI's 400."""
    target = await _target(request)
    if target.deployment is not None:
        return await target.ask_upstream("POST", "/cancel")
    await target.stored()  # a 404 unless it exists, and is this key's
    raise BadRequest("Cannot cancel a synchronous response.")


def response_routes() -> list[web.RouteDef]:
    """The routes of stored responses, in the OpenAI form and the short alias."""
    routes: list[web.RouteDef] = []
    for prefix in _PREFIXES:
        routes += [
            web.get(prefix, get_response),
            web.delete(prefix, delete_response),
            web.get(prefix + "/input_items", list_input_items),
            web.post(prefix + "/cancel", cancel_response),
        ]
    return routes
