"""The ``keyauth`` plugin: database keys, looked up in the in-memory cache.

It runs before the config's keys (``aioproxy.builtins.config_auth``, trylast) and defers to them
for any key that is not a database key, so the TOML file's keys keep working.
"""

from __future__ import annotations

from aiohttp import web

from .._aiohttp import request_state
from ..builtins.config_auth import presented_key
from ..config import Config
from ..context import Principal
from ..errors import AuthenticationError
from ..hookspecs import hookimpl
from ..keys import plugin_manager_key
from .database import LIMITED_BY
from .limits import Limits
from .plane import ControlPlane, plane_key

__all__ = ["KeyAuth"]


class KeyAuth:
    def __init__(self, config: Config) -> None:
        self.config = config
        # The app's control plane, once it has one. Each app makes its own plugins
        # (plugins.make_plugin_manager), so it is this app's: kept, it spares every request
        # the app lookup (~45 bytecodes, config keys' requests included).
        self._plane: ControlPlane | None = None
        # Whether this app counts keys' rates with the built-in limits plugin, whose windows
        # give the x-ratelimit-* headers of the responses it does not count (``LIMITED_BY``):
        # disabled or replaced, nothing fills them.
        self._marks = False

    @hookimpl
    def authenticate(self, request: web.Request) -> Principal | None:
        plane = self._plane
        if plane is None or plane.closed:  # closed: the same app was started again
            plane = self._plane = request.app.get(plane_key)
            if plane is None:
                return None
            limits = request.app[plugin_manager_key].get_plugin("aioproxy.limits")
            self._marks = isinstance(limits, Limits)
        cache = plane.cache
        if not cache.principals:
            return None
        key = presented_key(request)
        if key is None:
            return None
        principal = cache.by_secret.get(key) or cache.principal_of(key)
        if principal is None:
            return None
        limits = principal.limits
        entry = limits.key
        if entry.disabled:
            raise AuthenticationError("This API key is disabled", code="key_disabled")
        if entry.expires_at is not None and plane.clock.time() >= entry.expires_at:
            raise AuthenticationError("This API key has expired", code="key_expired")
        if limits.limited and self._marks:
            request_state(request)[LIMITED_BY] = limits
        return principal
