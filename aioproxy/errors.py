"""The ProxyError family, the OpenAI error body, and the middleware that renders every failure."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from ._aiohttp import request_state

log = logging.getLogger("aioproxy")

__all__ = [
    "ANSWERED_ERROR",
    "ANTHROPIC_STATUSES",
    "ON_ERROR",
    "STOPPED",
    "AuthenticationError",
    "BadGateway",
    "BadRequest",
    "ClientDisconnected",
    "GatewayTimeout",
    "ModelNotFound",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProxyError",
    "RateLimited",
    "ServerShutdown",
    "UnsupportedMediaType",
    "UpstreamError",
    "anthropic_error",
    "cut_short",
    "cut_short_answer",
    "error_body",
    "error_event",
    "error_middleware",
    "error_response",
    "speaks_anthropic",
    "tell_on_error",
]


class ProxyError(Exception):
    """A failure that the client sees as an OpenAI error object with ``status``."""

    status: int = 500
    type: str = "server_error"
    default_code: str | None = None
    # Whether the upstream caused it; None: judged by status (see ``upstream_fault``). Errors
    # made from an upstream's own failing answer say True (its code may be anything, even
    # "internal_error"); the gateway's own failures that share an upstream status (a cap
    # reached, its buffers or store unavailable) say False.
    caused_by_upstream: bool | None = None
    # The status the client had already got when this failure came (a stream cut after its
    # 200 went out: the failure is told as one last event). Set by the relay; the request is
    # logged with this status and the error's code. None: the client gets ``status``.
    sent_status: int | None = None
    # Raised where no handler tells ``on_error`` of it (the ingress checks, which run before
    # any handler): the error middleware does as it answers it.
    untold: bool = False

    def __init_subclass__(
        cls,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        **kwargs: Any,
    ) -> None:
        """A kind of failure declared in its class line, as ``class Gone(ProxyError,
        status=410, type="invalid_request_error", code="gone")``; what it leaves out, it
        inherits (a subclass may still set the class attributes in its body)."""
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status
        if type is not None:
            cls.type = type
        if code is not None:
            cls.default_code = code

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        caused_by_upstream: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers = headers
        if caused_by_upstream is not None:
            self.caused_by_upstream = caused_by_upstream

    @property
    def upstream_fault(self) -> bool:
        """The upstream caused it (unreachable, too slow, a 5xx, a 429 or 408 of its own), not
        the request nor a bug of ours: what counts toward a deployment's cooldown."""
        if self.caused_by_upstream is not None:
            return self.caused_by_upstream
        if self.status == 500:  # ours (a bug, a misconfiguration) unless marked the upstream's
            return False
        return self.status >= 500 or self.status in (408, 429)

    @property
    def retryable(self) -> bool:
        """Worth another try, on another deployment if there is one: the upstream's faults,
        and the gateway's own rate caps (another deployment may have room); never the
        request's own 4xx, a bug of ours, or the gateway's other troubles."""
        if self.caused_by_upstream is False:
            return self.status == 429
        return self.upstream_fault


# The family: each kind declares its status, OpenAI's error type and default code in its class
# line (see ProxyError.__init_subclass__).


class BadRequest(ProxyError, status=400, type="invalid_request_error"):
    """The request is malformed or asks for what cannot be done; ``param`` names the field."""


class AuthenticationError(
    ProxyError, status=401, type="authentication_error", code="invalid_api_key"
):
    """No client key, or one the gateway does not know."""


class PermissionDenied(ProxyError, status=403, type="permission_error", code="model_not_allowed"):
    """A known key that may not do this (a model it is not allowed)."""


class NotFound(ProxyError, status=404, type="invalid_request_error", code="not_found"):
    """No such thing (a route, a stored response)."""


class ModelNotFound(NotFound, code="model_not_found"):
    """No model of that name for this key."""


class PayloadTooLarge(
    ProxyError, status=413, type="invalid_request_error", code="request_too_large"
):
    """A request body over the configured limit."""


class UnsupportedMediaType(
    ProxyError, status=415, type="invalid_request_error", code="unsupported_media_type"
):
    """A request body the proxy will not read: not JSON, or compressed."""


class RateLimited(ProxyError, status=429, type="rate_limit_error", code="rate_limit_exceeded"):
    """A rate cap reached (the gateway's, or an upstream's)."""

    # Whose cap it was, for aioproxy_rate_limited_total{scope} (key, team, budget, gateway);
    # None: the router's own deployment caps.
    scope: str | None = None


class ClientDisconnected(ProxyError, status=499, type="client_error", code="client_disconnected"):
    """The client went away before its answer was over (nginx's 499): never sent to anyone,
    but what ``on_error`` (and ``after_attempt``, for the attempt under way) hears, so the
    request is still logged and its reservations settled."""

    @classmethod
    def now(cls) -> ClientDisconnected:
        """The error of a request (or attempt) its client's leaving cut short."""
        return cls("The client went away before its answer was over")


class ServerShutdown(ProxyError, status=503, type="server_error", code="server_shutdown"):
    """The gateway stopped before the answer was over: its shutdown grace ran out with the
    request still running. Never sent (its connection is closed), but what ``on_error`` and
    ``after_attempt`` hear in place of a ClientDisconnected, so that the request is logged as
    the stop's, not its client's."""


# Set on a request still running when the gateway's shutdown grace runs out (by run.py's
# server, just before aiohttp cancels its handler): the stop cancels it, not its client.
STOPPED = web.RequestKey("aioproxy.stopped", bool)
# Set on a stream whose keep-alive comments had sent its status when its handler was cancelled
# (by the stop or its client's leaving): the request keeps that status (``sent_status``).
SENT_STATUS = web.RequestKey("aioproxy.sent_status", int)


def cut_short(request: web.BaseRequest) -> ProxyError:
    """The error of a request (or attempt) whose handler was cancelled: the gateway's stop
    (``STOPPED``), else its client's leaving."""
    if request_state(request).get(STOPPED):
        return ServerShutdown("The gateway stopped before the answer was over")
    return ClientDisconnected.now()


def cut_short_answer(request: web.BaseRequest) -> ProxyError:
    """The error of a request whose handler was cancelled, with the status its client had got
    if any (a stream's keep-alive comments): what ``on_error`` hears of the request."""
    error = cut_short(request)
    error.sent_status = request_state(request).get(SENT_STATUS)
    return error


class UpstreamError(ProxyError, type="upstream_error"):
    """The upstream answered with an error; its status and message are passed on."""


class BadGateway(ProxyError, status=502, type="upstream_error", code="bad_gateway"):
    """The upstream failed to answer properly (unreachable, broken, not of its shape)."""


class GatewayTimeout(ProxyError, status=504, type="timeout_error", code="upstream_timeout"):
    """The upstream took too long."""


class _ErrorDetail(msgspec.Struct, omit_defaults=False):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


_encode = msgspec.json.Encoder().encode

# aiohttp's own HTTP exceptions (unknown route, wrong method, body too large) in OpenAI terms.
_HTTP_TYPES = {
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    """The encoded ``{"error": {...}}`` object that every failure answers with."""
    return _encode(_ErrorBody(_ErrorDetail(message, type, param, code)))


def error_payload(exc: ProxyError) -> bytes:
    return error_body(exc.message, exc.type, exc.param, exc.code)


def error_response(exc: ProxyError, anthropic: bool = False) -> web.Response:
    """``exc`` as the answer: OpenAI's error object, or Anthropic's on its routes."""
    status, body = anthropic_error(exc) if anthropic else (exc.status, error_payload(exc))
    return web.Response(
        body=body, status=status, content_type="application/json", headers=exc.headers
    )


# Anthropic's error type for each status it uses (docs: "HTTP errors"); other statuses keep
# theirs, typed by class: a client's mistake, or the service's trouble.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_OVERLOADED = 529  # Anthropic's own status for an overloaded upstream (a 503 elsewhere)
# Each of Anthropic's error types and its status, to read an Anthropic upstream's error.
ANTHROPIC_STATUSES = {kind: status for status, kind in _ANTHROPIC_TYPES.items() if status != 503}


class _AnthropicDetail(msgspec.Struct):
    type: str
    message: str


class _AnthropicBody(msgspec.Struct, tag_field="type", tag="error"):
    error: _AnthropicDetail


def anthropic_error(exc: ProxyError) -> tuple[int, bytes]:
    """``exc`` in Anthropic's shape: its status and ``{"type": "error", "error": {"type",
    "message"}}``. An upstream's overload (Anthropic's 529, which aioproxy calls a 503
    ``overloaded``) is Anthropic's 529 again, which its SDKs retry."""
    status = _OVERLOADED if exc.code == "overloaded" else exc.status
    kind = _ANTHROPIC_TYPES.get(status)
    if kind is None:  # an Anthropic upstream's own type where it has one, else by class
        if exc.type in ANTHROPIC_STATUSES:
            kind = exc.type
        else:
            kind = "invalid_request_error" if status < 500 else "api_error"
    return status, _encode(_AnthropicBody(_AnthropicDetail(kind, exc.message)))


def error_event(exc: ProxyError, anthropic: bool = False) -> bytes:
    """``exc`` as the one SSE event that ends a stream whose status has gone out already."""
    if anthropic:
        return b"event: error\ndata: " + anthropic_error(exc)[1] + b"\n\n"
    return b"data: " + error_payload(exc) + b"\n\n"


def speaks_anthropic(handler: object) -> bool:
    """Whether ``handler`` serves one of Anthropic's routes (marked by ``handlers``)."""
    return getattr(handler, "anthropic", False) is True


def from_http_exception(exc: web.HTTPException, request: web.Request) -> ProxyError:
    """Translate aiohttp's HTTPException (404, 405, 413, ...) into a ProxyError."""
    type_, code = _HTTP_TYPES.get(exc.status, ("invalid_request_error", None))
    if exc.status == 405:
        message = f"Method {exc.method} not allowed; use {', '.join(sorted(exc.allowed_methods))}"  # type: ignore[attr-defined]
    elif exc.status == 413:
        message = f"Request body too large: {exc.text}"
    elif exc.status == 404:
        from .masking import mask_keylike  # here: masking imports context, which imports us

        # A secret pasted into a path (/admin/sk-...) is not told back.
        message = f"Unknown route: {request.method} {mask_keylike(request.path)}"
    else:
        message = exc.text or exc.reason
    headers = None
    if exc.status == 405:
        headers = {"Allow": exc.headers.get("Allow", "")}
    return ProxyError(message, status=exc.status, type=type_, code=code, headers=headers)


# The app's ``on_error`` hook (``Hook.logged``; set by create_app when a plugin implements it),
# for the refusals no provider handler hears: the router's (an unknown route's 404, a wrong
# method's 405, answered before any handler runs), the ingress checks', the model routes'.
ON_ERROR: web.AppKey[Callable[..., Awaitable[None] | None]] = web.AppKey("aioproxy.on_error")

# Where the middleware leaves the error a request was answered with (for the access log's
# ``error``, whichever layer refused it: a route, the ingress checks, a handler).
ANSWERED_ERROR = web.RequestKey("aioproxy.answered_error", ProxyError)


def _answer(request: web.Request, error: ProxyError) -> web.Response:
    request_state(request)[ANSWERED_ERROR] = error
    return error_response(error, speaks_anthropic(request.match_info.handler))


async def tell_on_error(request: web.Request, error: ProxyError) -> None:
    """``on_error`` for a refusal with no call (nobody was authenticated): the router's 404 and
    405, the ingress checks', a model route's (which makes no call)."""
    on_error = request.app.get(ON_ERROR)
    if on_error is not None and (rest := on_error(request, error, None)) is not None:
        await rest


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render ProxyError, aiohttp HTTP errors and unexpected exceptions as OpenAI error objects
    (Anthropic's on its routes)."""
    try:
        return await handler(request)
    except ProxyError as exc:
        if exc.untold:
            await tell_on_error(request, exc)
        return _answer(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = from_http_exception(exc, request)
        if request.match_info.http_exception is exc:  # the router's own: no handler heard it
            await tell_on_error(request, error)
        return _answer(request, error)
    except ConnectionResetError:
        raise  # the client went away: nobody to answer, and aiohttp knows to ignore it
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _answer(
            request,
            ProxyError(
                "The proxy failed unexpectedly; the error was logged.", code="internal_error"
            ),
        )
