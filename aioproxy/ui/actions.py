"""What changes state from the dashboard: signing in and out, keys and teams, the playground.

Each call carries the session's CSRF token in ``X-CSRF-Token`` (the sign-in form, one bound to a
nonce cookie) and a JSON body, which the gateway's ingress requires of every POST anyway. Keys
and teams go through the admin API's own handlers, vouched for by the session.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from ..control import admin
from ..control.clock import ControlClock
from ..control.plane import clock_key, plane_key
from ..errors import AuthenticationError, BadRequest
from ..handlers import make_provider_handler
from ..routes import Kind
from .pages import render, require_session
from .paths import ROOT, base_of
from .session import CSRF_HEADER, Session, sessions_key
from .throttle import throttle_key

__all__ = ["ACTIONS", "PLAYGROUND_PRINCIPAL", "signin_page"]

# ``request[PLAYGROUND_PRINCIPAL]``: who a playground call runs as (the signed-in operator);
# the dashboard's ``authenticate`` hook answers with it.
PLAYGROUND_PRINCIPAL = web.RequestKey("aioproxy.ui.principal", object)


_CLOCK = ControlClock()  # unless a test put its own in the app (``clock_key``)


class _SignIn(msgspec.Struct):
    key: str
    next: str = ""


async def signin_page(request: web.Request) -> web.StreamResponse:
    sessions = request.app[sessions_key]
    if sessions.read(request) is not None:
        raise web.HTTPFound(_next(request, request.query.get("next", "")))
    nonce, token = sessions.signin_token(request)
    response = render(
        request,
        "signin.html",
        None,
        next=request.query.get("next", ""),
        csrf=token,
        no_master=not sessions.config.auth.master_key,
        open_mode=sessions.open_mode,
    )
    sessions.remember_signin(response, request, nonce)
    return response


async def signin(request: web.Request) -> web.StreamResponse:
    sessions = request.app[sessions_key]
    sessions.check_signin_token(request, request.headers.get(CSRF_HEADER, ""))
    try:
        form = msgspec.json.decode(await request.read(), type=_SignIn)
    except msgspec.DecodeError:
        raise BadRequest('Send {"key": "..."}', param="key", code="invalid_value") from None
    throttle, address = request.app[throttle_key], request.remote or ""
    now = (request.app.get(clock_key) or _CLOCK).monotonic()
    throttle.check(address, now)
    holder = sessions.holder_of(form.key.strip(), request.app.get(plane_key))
    if holder is None:
        throttle.failed(address, now)
        # One answer for a wrong key and a key without the admin role: no key is confirmed.
        raise AuthenticationError(
            "Sign in with the master key or a key with the admin role", code="invalid_api_key"
        )
    response = web.json_response({"redirect": _next(request, form.next)})
    sessions.start(response, request, holder[0])
    return response


def _next(request: web.Request, target: str) -> str:
    """Where to go after signing in: a page of the dashboard, never another site."""
    home = base_of(request) + ROOT
    if target.startswith(home) and not target.startswith("//") and "\\" not in target:
        return target
    return home


Action = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]


def action(handler: Action) -> Handler:
    """A call for signed-in operators carrying the session's CSRF token; else 401/403."""

    async def handle(request: web.Request) -> web.StreamResponse:
        session = require_session(request)
        if session is None:
            raise AuthenticationError("Sign in to the dashboard first", code="not_signed_in")
        request.app[sessions_key].check_csrf(request, session)
        return await handler(request, session)

    return handle


async def signout(request: web.Request, session: Session) -> web.StreamResponse:
    response = web.json_response({"redirect": f"{base_of(request)}{ROOT}/signin"})
    request.app[sessions_key].end(response, request)
    return response


def _vouched(handler: Handler) -> Action:
    async def handle(request: web.Request, session: Session) -> web.StreamResponse:
        request[admin.ADMIN_VOUCHED] = True
        return await handler(request)

    return handle


_chat = make_provider_handler(Kind.CHAT_COMPLETIONS)


async def chat(request: web.Request, session: Session) -> web.StreamResponse:
    """A chat completion as the signed-in operator, streamed back as the API streams it."""
    request[PLAYGROUND_PRINCIPAL] = session.principal
    return await _chat(request)


ACTIONS: list[tuple[str, str, Action]] = [
    ("POST", "/signout", signout),
    ("POST", "/api/keys", _vouched(admin.create_key)),
    ("PATCH", "/api/keys/{id}", _vouched(admin.update_key)),
    ("DELETE", "/api/keys/{id}", _vouched(admin.delete_key)),
    ("POST", "/api/teams", _vouched(admin.create_team)),
    ("PATCH", "/api/teams/{id}", _vouched(admin.update_team)),
    ("DELETE", "/api/teams/{id}", _vouched(admin.delete_team)),
    ("POST", "/api/chat", chat),
]
