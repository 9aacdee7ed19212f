"""The ``database`` plugin: the control plane's database for the app's life, and the admin API."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from .._aiohttp import request_state
from ..config import Config
from ..hookspecs import RegisterContext, RegisterRoute, hookimpl
from ..keys import database_key
from .admin import admin_routes
from .clock import ControlClock
from .meters import KeyLimits
from .plane import ControlPlane, clock_key, plane_key

__all__ = ["LIMITED_BY", "RATE_LIMIT_HEADERS", "Database"]

# ``request[RATE_LIMIT_HEADERS]``: the x-ratelimit-* headers the limits plugin computed for the
# request; added to its response whatever it is (JSON, stream, error).
RATE_LIMIT_HEADERS = web.RequestKey("aioproxy.ratelimit_headers", dict[str, str])
# ``request[LIMITED_BY]``: the limits of the rate-limited key that sent it (set by keyauth), so
# that a response the limits plugin did not count (an error before it, the model list) still
# carries the key's headers: every response to a limited key does.
LIMITED_BY = web.RequestKey("aioproxy.limited_by", KeyLimits)


async def _add_rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    state = request_state(request)
    headers = state.get(RATE_LIMIT_HEADERS)  # mostly not there: no KeyError
    if headers is None:
        limits = state.get(LIMITED_BY)
        if limits is None:
            return
        headers = limits.headers_now()
    if headers:
        response.headers.update(headers)


class Database:
    def __init__(self, config: Config) -> None:
        self.config = config

    @hookimpl
    def register_contexts(self, register: RegisterContext, app: web.Application) -> None:
        config = self.config
        app.on_response_prepare.append(_add_rate_limit_headers)

        async def control_plane(app: web.Application) -> AsyncIterator[None]:
            plane = await ControlPlane.open(config, app.get(clock_key) or ControlClock())
            app[plane_key] = plane
            app[database_key] = plane.engine  # the Responses store's too
            plane.start()
            try:
                yield
            finally:
                await plane.close()

        register(control_plane)

    @hookimpl
    def register_routes(self, register: RegisterRoute) -> None:
        for method, path, handler in admin_routes():
            register(method, path, handler)
