"""Where the dashboard is: its routes live under ``/ui`` of an app that may itself be mounted
under a prefix (``parent.add_subapp("/llm", app)``), so links are built from the request."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = ["ROOT", "base_of", "mounted"]

ROOT = "/ui"
_base_key = web.RequestKey("aioproxy.ui.base", str)


def base_of(request: web.Request) -> str:
    """The prefix the app is mounted under ('' when it is not)."""
    base: str = request.get(_base_key, "")
    return base


def mounted(path: str, handler: Handler) -> Handler:
    """``handler`` for route ``path``, told its app's prefix: the route's full pattern less
    ``path`` (aiohttp adds a sub-app's prefix to its routes when it is mounted)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else path
        request[_base_key] = canonical[: len(canonical) - len(path)]
        return await handler(request)

    return handle
