"""What a request must look like before any handler runs: its body's type and encoding, its Host
and its Origin (a local gateway must not answer the web pages its user visits), and CORS.

Every check reads headers only, so a refused request's body is never read, let alone inflated.
"""

from __future__ import annotations

from collections.abc import Awaitable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .config import ServerConfig
from .errors import PermissionDenied, ProxyError, UnsupportedMediaType

__all__ = ["Ingress"]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})  # bound to every address: no one name
_PREFLIGHT_MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer


def hostname(host: str) -> str:
    """The name in a Host header or config entry: lower case, no port, brackets or final dot."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:4000
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:  # name:port (a bare IPv6 address has more colons)
        host = host.partition(":")[0]
    return host.rstrip(".")


class Ingress:
    """The checks, resolved from the config once; ``middleware`` applies them to each request.

    Args:
        server: the ``[server]`` table (``host``, ``allowed_hosts``, ``cors_origins``).
        open_mode: no credentials are needed, so Host is checked too (against DNS rebinding).
    """

    def __init__(self, server: ServerConfig, open_mode: bool) -> None:
        hosts = {hostname(name) for name in server.allowed_hosts}
        self.any_host = not open_mode or "*" in hosts
        self.hosts = frozenset(_LOOPBACK | hosts | ({hostname(server.host)} - _WILDCARD_ADDRESSES))
        self.any_origin = "*" in server.cors_origins
        self.origins = frozenset(origin.rstrip("/").lower() for origin in server.cors_origins)
        self.cors = bool(self.origins)

    def install(self, app: web.Application) -> None:
        """Check every request of ``app`` (mounted or not), and answer CORS when configured."""
        app.middlewares.append(self.middleware())
        if self.cors:  # the signal costs each response a call: only when there is CORS to add
            app.on_response_prepare.append(self._add_cors_headers)

    def middleware(self) -> Middleware:
        """The middleware: a plain function returning the awaitable aiohttp awaits (the
        handler's, or the preflight's answer), not one more coroutine around the handler's on
        every request. A refusal is raised as it is called, within the error middleware's
        ``await`` (which answers it, and tells ``on_error``: no handler will) all the same."""
        refuse, cors = self.refuse, self.cors

        @web.middleware
        def ingress(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
            refuse(request)
            if cors and request.method == "OPTIONS" and _is_preflight(request):
                return _answered(self._preflight(request))
            return handler(request)

        return ingress

    def refuse(self, request: web.Request) -> None:
        """Raise the ProxyError that refuses ``request``, if any; read nothing but headers."""
        headers = request.headers
        # An unknown route or method is answered 404/405 without its body being read.
        if request.body_exists and request.match_info.http_exception is None:
            encoding = headers.get("Content-Encoding")
            if encoding is not None and encoding.strip().lower() != "identity":
                raise _untold(
                    UnsupportedMediaType(
                        "Request bodies are read uncompressed only, not Content-Encoding "
                        f"'{encoding}'",
                        code="unsupported_content_encoding",
                    )
                )
            content_type = headers.get("Content-Type", "")
            if (
                request.method in _BODY_METHODS
                and content_type != "application/json"  # as SDKs send it: no parsing
                and not _is_json(content_type)
            ):
                raise _untold(
                    UnsupportedMediaType(
                        "Request bodies must be JSON (Content-Type: application/json), not "
                        f"'{content_type or 'none'}'"
                    )
                )
        if not self.any_host and hostname(request.host) not in self.hosts:
            raise _untold(
                PermissionDenied(
                    "This proxy answers only requests addressed to its own host name; add the "
                    "name to [server] allowed_hosts to use it",
                    code="host_not_allowed",
                )
            )
        origin = headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin, request):
            raise _untold(
                PermissionDenied(
                    "Requests from web pages of other origins are refused; add the origin to "
                    "[server] cors_origins to allow it",
                    code="origin_not_allowed",
                )
            )

    def _origin_allowed(self, origin: str, request: web.Request) -> bool:
        origin = origin.strip().lower()
        if self.any_origin or origin in self.origins:
            return True
        # Same origin: a page the proxy (or its host app) served itself.
        return origin.partition("://")[2] == request.host.strip().lower()

    def _preflight(self, request: web.Request) -> web.Response:
        """A CORS preflight from an allowed origin (others are refused): what may follow."""
        requested = request.headers.get("Access-Control-Request-Headers")
        headers = {
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Max-Age": _PREFLIGHT_MAX_AGE,
        }
        if requested:  # the SDKs' headers vary (x-stainless-*): allow what is asked
            headers["Access-Control-Allow-Headers"] = requested
        return web.Response(status=204, headers=headers)

    async def _add_cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and self._origin_allowed(origin, request):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")


def _is_json(content_type: str) -> bool:
    """``application/json``, parameters allowed (read from the raw header: aiohttp's parsed
    ``content_type`` costs several microseconds a request)."""
    return content_type.partition(";")[0].strip().lower() == "application/json"


async def _answered(response: web.StreamResponse) -> web.StreamResponse:
    return response


def _untold(refusal: ProxyError) -> ProxyError:
    """``refusal``, for the error middleware to tell ``on_error`` of as it answers it."""
    refusal.untold = True
    return refusal


def _is_preflight(request: web.Request) -> bool:
    return "Access-Control-Request-Method" in request.headers
