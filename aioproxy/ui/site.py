"""The operators' web pages at ``/ui`` (the ``dashboard`` plugin, when ``[ui] enabled``).

Pages are rendered on the server (aiohttp-jinja2); the browser runs one script of ours and the
vendored chart library, both served from the package. Every answer carries a strict
Content-Security-Policy: nothing inline, nothing from another origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler

from .._aiohttp import request_state
from ..app import is_open
from ..config import Config
from ..context import Principal
from ..control.plane import plane_key
from ..errors import NotFound
from ..hookspecs import RegisterContext, RegisterRoute, hookimpl
from ..keys import runtime_key
from .actions import ACTIONS, PLAYGROUND_PRINCIPAL, action, signin, signin_page
from .pages import PAGES, page, points_key
from .paths import ROOT, mounted
from .queries import RANGES, PointCache, overview
from .session import Sessions, sessions_key
from .throttle import SignInThrottle, throttle_key

__all__ = ["Dashboard"]

log = logging.getLogger("aioproxy")

_STATIC = Path(__file__).with_name("static")
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _secured(handler: Handler) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # a redirect: secured too
            exc.headers.update(_HEADERS)
            raise
        if not response.prepared:  # a playground stream has sent its headers already
            for name, value in _HEADERS.items():
                response.headers.setdefault(name, value)
        return response

    return handle


def _assets() -> dict[str, tuple[bytes, str]]:
    """The static files, read once: served by name only, so no path reaches outside them."""
    files = {}
    for path in _STATIC.iterdir():
        kind = mimetypes.guess_type(path.name)[0] or "text/plain"
        files[path.name] = (path.read_bytes(), kind)
    return files


def _static(
    assets: dict[str, tuple[bytes, str]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["name"])
        if found is None:
            raise NotFound("No such file", code="not_found")
        body, kind = found
        charset = "utf-8" if kind.startswith("text/") or kind.endswith("javascript") else None
        response = web.Response(body=body, content_type=kind, charset=charset)
        response.headers["Cache-Control"] = "public, max-age=3600"
        return response

    return serve


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _usd(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"${value:,.2f}"
    # Small amounts to their first digits: a budget of $0.0000001 is not shown as $0.
    digits = 4 if value >= 0.01 else 10
    return f"${value:.{digits}f}".rstrip("0").rstrip(".")


_warming_key = web.AppKey("aioproxy.ui.warming", asyncio.Task[None])


async def _warm(app: web.Application) -> None:
    """Read the overview's settled points once, off the request path, so that the first
    view of the 30-day overview after a start reads only its newest point too."""
    plane = app.get(plane_key)
    if plane is None:
        return
    for span, step in RANGES.values():
        try:
            await overview(plane, app[points_key], span, step)
        except Exception as exc:  # noqa: BLE001 - the page reads them itself then
            log.warning("dashboard: cannot read the overview ahead: %s", exc)
            return


async def _start_warming(app: web.Application) -> None:
    app[_warming_key] = asyncio.create_task(_warm(app), name="aioproxy dashboard warm-up")


async def _stop_warming(app: web.Application) -> None:
    task = app.get(_warming_key)
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Dashboard:
    def __init__(self, config: Config) -> None:
        self.config = config

    @hookimpl
    def register_routes(self, register: RegisterRoute) -> None:
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/signin", signin_page),
            ("POST", "/signin", signin),
            ("GET", "/static/{name}", _static(_assets())),
            *(("GET", path, page(handler)) for path, handler in PAGES),
            *((method, path, action(handler)) for method, path, handler in ACTIONS),
        ]
        for method, path, handler in routes:
            full = ROOT + path
            register(method, full, _secured(mounted(full, handler)))

    @hookimpl
    def register_contexts(self, register: RegisterContext, app: web.Application) -> None:
        aiohttp_jinja2.setup(
            app,
            loader=jinja2.PackageLoader("aioproxy.ui", "templates"),
            autoescape=True,
            default_helpers=False,
            undefined=jinja2.StrictUndefined,
            filters={"seconds": _seconds, "usd": _usd},
        )
        app[sessions_key] = Sessions(self.config, open_mode=is_open(app[runtime_key]))
        app[points_key] = PointCache()
        ui = self.config.ui
        app[throttle_key] = SignInThrottle(ui.signin_attempts, ui.signin_window)
        # After every context started (the database's included), before any is cleaned up.
        app.on_startup.append(_start_warming)
        app.on_shutdown.append(_stop_warming)

    @hookimpl(tryfirst=True)
    def authenticate(self, request: web.Request) -> Principal | None:
        """A playground call runs as the signed-in operator (set only after its session and
        CSRF token were checked); every other request is left to the other plugins."""
        # The request's storage read in C: request.get would raise and catch a KeyError for
        # every API request, none of which is a playground call.
        principal = request_state(request).get(PLAYGROUND_PRINCIPAL)
        return principal if isinstance(principal, Principal) else None
