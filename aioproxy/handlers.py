"""The HTTP handlers: one per endpoint kind, each reading top to bottom:
authenticate -> read_body -> dispatch -> relay."""

from __future__ import annotations

import asyncio
import functools

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from .context import ANONYMOUS, Call
from .dispatch import Lease
from .errors import (
    ModelNotFound,
    ProxyError,
    cut_short_answer,
    from_http_exception,
    tell_on_error,
)
from .keys import runtime_key
from .payloads import read_body, refuse_unless_allowed
from .relay import send, send_with_keepalive
from .routes import ANTHROPIC_KINDS, DEPLOYMENT_ALIASES, PROVIDER_KINDS, Kind
from .runtime import Runtime

__all__ = ["health", "make_deployment_handlers", "make_handlers"]

_encode = msgspec.json.Encoder().encode


_HEALTHY = _encode({"status": "ok"})


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def make_provider_handler(
    kind: Kind, path_model: str | None = None, runtime: Runtime | None = None
) -> Handler:
    """The handler for a kind that calls a provider: auth, body, dispatch, answer.

    ``path_model``: the path's variable that names the model (Azure's ``{deployment}``), which
    wins over the body's ``model``. ``runtime``: the app's, for a handler of that app's routes
    (None: the request's app's, looked up per request).
    """
    bound = runtime

    async def handle(request: web.Request) -> web.StreamResponse:
        # Bound: no request.app lookup (~30 bytecodes a request).
        runtime = bound if bound is not None else request.app[runtime_key]
        dispatcher = runtime.dispatcher
        call: Call | None = None
        lease: Lease | None = None
        try:
            principal = await runtime.authenticate(request, kind)
            # The call exists before its body is read: a request of a known key refused for
            # its body is heard by on_error as its call (and logged as its key's).
            model = request.match_info[path_model] if path_model else ""  # "": the body's
            call = Call(kind, request, principal, model, {}, False)
            try:
                await read_body(call, runtime.config.server.body_timeout)
                refuse_unless_allowed(call, dispatcher.allows)
                plan, lease = await dispatcher.plan(call)
            except (ProxyError, web.HTTPException) as refused:
                # Refused for the client's own request before any upstream was chosen (its
                # body, a model it may not use or that is not served): may answer otherwise.
                if runtime.hooks.before_refusal.implemented and _refused_as_asked(call, refused):
                    await _before_refusal(runtime, call, refused)
                raise
            if call.stream and runtime.keepalive is not None:
                return await send_with_keepalive(
                    request,
                    call,
                    dispatcher.dispatch(call, plan, lease),
                    runtime.keepalive,
                    runtime.hooks,
                )
            return await send(
                request, call, await dispatcher.dispatch(call, plan, lease), runtime.hooks
            )
        except Exception as exc:
            if runtime.hooks.on_error:
                # aiohttp's own refusal (a body over client_max_size: 413) as the error the
                # client gets from the error middleware: every on_error hears its status.
                if isinstance(exc, web.HTTPException):
                    exc = from_http_exception(exc, request)
                if rest := runtime.hooks.on_error.logged(request, exc, call):
                    await rest
            raise
        except asyncio.CancelledError:  # its client went away, or the gateway stopped
            if runtime.hooks.on_error and (
                rest := runtime.hooks.on_error.logged(request, cut_short_answer(request), call)
            ):
                await rest
            raise
        finally:
            if lease is not None:  # released already unless the request ended before dispatch
                lease.release()

    handle.__name__ = f"handle_{kind.value}"
    if kind in ANTHROPIC_KINDS:
        handle.anthropic = True  # type: ignore[attr-defined]  # errors in its shape: errors.py
    return handle


async def _before_refusal(
    runtime: Runtime, call: Call, refused: ProxyError | web.HTTPException
) -> None:
    """The ``before_refusal`` hooks of a request refused for what it asked (aiohttp's own
    refusal, a body over client_max_size, as the 413 the client gets): the limits count it."""
    if isinstance(refused, web.HTTPException):
        refused = from_http_exception(refused, call.request)
    await runtime.hooks.before_refusal.each_answering(call=call, error=refused)


def _refused_as_asked(call: Call, refused: ProxyError | web.HTTPException) -> bool:
    """Whether a refusal is the request's own fault (a 4xx but a 429, which is a cap's) and came
    before routing: after it, ``before_request`` counted the request, or refused it."""
    return not call.routed and 400 <= refused.status < 500 and refused.status != 429


def _heard_on_error(handler: Handler) -> Handler:
    """``handler``, its refusals heard by ``on_error`` (with no call: it makes none)."""

    @functools.wraps(handler)
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProxyError as refusal:
            await tell_on_error(request, refusal)
            raise

    return handle


@_heard_on_error
async def list_models(request: web.Request) -> web.Response:
    runtime = request.app[runtime_key]
    principal = await runtime.authenticate(request, Kind.MODELS)
    data = [_model_object(runtime.created, name) for name in runtime.model_names(principal)]
    return _json(_encode({"object": "list", "data": data}))


@_heard_on_error
async def get_model(request: web.Request) -> web.Response:
    runtime = request.app[runtime_key]
    principal = await runtime.authenticate(request, Kind.MODEL)
    name = request.match_info["model"]
    if name not in runtime.model_names(principal):
        raise ModelNotFound(
            f"The model '{name}' does not exist or is not served here", param="model"
        )
    return _json(_encode(_model_object(runtime.created, name)))


def _model_object(created: int, name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": created, "owned_by": "aioproxy"}


async def health(request: web.Request) -> web.Response:
    """Liveness: 200 while the app serves; no auth, no upstream call."""
    return _json(_HEALTHY)


async def readiness(request: web.Request) -> web.Response:
    """Whether every model has a deployment available: ``ready`` (200) or ``degraded`` (503),
    without auth, for load balancers. Each configured deployment's state (cooldown, in flight,
    latency) is shown only to the master key, or to anyone on a proxy without keys: model
    names, upstream model ids and traffic are not for every caller."""
    runtime = request.app[runtime_key]
    deployments = runtime.deployments
    rows = runtime.router.snapshot(deployments)
    ready = all(
        any(row["available"] for row in rows if row["model"] == model) for model in deployments
    )
    body: dict[str, object] = {"status": "ready" if ready else "degraded"}
    if await _sees_deployments(request):
        body["deployments"] = rows
    return _json(_encode(body), 200 if ready else 503)


async def _sees_deployments(request: web.Request) -> bool:
    try:
        principal = await request.app[runtime_key].authenticate(request, Kind.MODELS)
    except ProxyError:  # no key, or a wrong one: the status alone
        return False
    return principal.is_master or principal is ANONYMOUS  # ANONYMOUS: a proxy without keys


def make_handlers(runtime: Runtime | None = None) -> dict[Kind, Handler]:
    """A handler for every endpoint kind (``runtime``: as for make_provider_handler)."""
    handlers: dict[Kind, Handler] = {
        kind: make_provider_handler(kind, runtime=runtime) for kind in PROVIDER_KINDS
    }
    handlers[Kind.MODELS] = list_models
    handlers[Kind.MODEL] = get_model
    return handlers


def make_deployment_handlers(runtime: Runtime | None = None) -> dict[Kind, Handler]:
    """A handler for each kind of Azure's deployment routes, the model read from the path."""
    return {kind: make_provider_handler(kind, "deployment", runtime) for kind in DEPLOYMENT_ALIASES}
