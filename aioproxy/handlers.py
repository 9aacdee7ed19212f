"""The HTTP handlers: one per endpoint kind, each reading top to bottom through the gateway."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from .context import Call
from .errors import ModelNotFound, ProxyError, error_payload
from .keys import gateway_key
from .outcome import Outcome
from .providers import JSONReply, StreamReply
from .routes import PROVIDER_KINDS, Kind
from .streaming import SSE_HEADERS
from .upstream import failure_from

__all__ = ["health", "make_handlers"]

log = logging.getLogger("aioproxy")

_encode = msgspec.json.Encoder().encode
_HEALTHY = _encode({"status": "ok"})


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def make_provider_handler(kind: Kind) -> Handler:
    """The handler for a kind that calls a provider: auth, model map, hooks, provider, answer."""

    async def handle(request: web.Request) -> web.StreamResponse:
        gateway = request.app[gateway_key]
        call: Call | None = None
        try:
            principal = await gateway.authenticate(request, kind)
            call = await gateway.read_call(kind, request, principal)
            await gateway.route(call)
            reply = await gateway.call_provider(call)
            if isinstance(reply, StreamReply):
                return await _send_stream(request, call, reply)
            assert isinstance(reply, JSONReply), f"provider returned {type(reply).__name__}"
            response = web.Response(
                body=reply.body,
                status=reply.status,
                content_type="application/json",
                headers=reply.headers,
            )
            if gateway.hooks.after_response:
                outcome = Outcome(reply.status, stream=False)
                outcome.body = reply.body
                outcome.elapsed = time.monotonic() - call.started
                await gateway.report(call, outcome)
            return response
        except Exception as exc:
            if gateway.hooks.on_error:
                await gateway.observe_error(request, exc, call)
            raise

    handle.__name__ = f"handle_{kind.value}"
    return handle


async def _send_stream(request: web.Request, call: Call, reply: StreamReply) -> web.StreamResponse:
    """Relay a provider's events to the client one by one, as each arrives.

    The first event is awaited before the headers go out, so an error before it still gets its
    own status. After that the status is fixed: a failure becomes one ``data: {"error": ...}``
    event and the stream ends. When the client goes away (a failed write, or the handler being
    cancelled) the provider's stream is closed at once, which releases the upstream connection.
    """
    gateway = request.app[gateway_key]
    outcome = Outcome(200, stream=True)
    try:
        try:
            first: bytes | None = await anext(reply.events)
        except StopAsyncIteration:
            first = None
        except ProxyError:
            raise
        except Exception as exc:
            raise failure_from(exc, call.deployment) from exc
        outcome.ttfb = time.monotonic() - call.started
        response = web.StreamResponse(headers=SSE_HEADERS)
        if reply.headers:
            response.headers.update(reply.headers)
        await response.prepare(request)
        try:
            await _relay(response, first, reply, outcome)
        except ConnectionResetError:
            outcome.disconnected = True
        except asyncio.CancelledError:
            outcome.disconnected = True
            raise
        except Exception as exc:
            await _end_with_error(request, response, call, exc, outcome)
    finally:
        await reply.aclose()
        if gateway.hooks.after_response and outcome.ttfb is not None:
            outcome.elapsed = time.monotonic() - call.started
            await gateway.report(call, outcome)
    return response


async def _relay(
    response: web.StreamResponse, first: bytes | None, reply: StreamReply, outcome: Outcome
) -> None:
    if first is not None:
        await response.write(first)
        outcome.events = 1
        outcome.last_events = (first,)
        async for event in reply.events:
            await response.write(event)
            outcome.events += 1
            outcome.last_events = (outcome.last_events[-1], event)
    await response.write_eof()


async def _end_with_error(
    request: web.Request, response: web.StreamResponse, call: Call, exc: Exception, outcome: Outcome
) -> None:
    """A failure after the headers went out: one error event, then the end of the stream."""
    gateway = request.app[gateway_key]
    error = exc if isinstance(exc, ProxyError) else failure_from(exc, call.deployment)
    if not isinstance(exc, ProxyError) and not _is_client_error(exc):
        log.exception("stream from %s failed", call.deployment and call.deployment.describe())
    if gateway.hooks.on_error:
        await gateway.observe_error(request, exc, call)
    outcome.status = error.status
    try:
        await response.write(b"data: " + error_payload(error) + b"\n\n")
        await response.write_eof()
    except ConnectionResetError:
        outcome.disconnected = True


def _is_client_error(exc: BaseException) -> bool:
    return isinstance(exc, (aiohttp.ClientError, TimeoutError, OSError))


async def list_models(request: web.Request) -> web.Response:
    gateway = request.app[gateway_key]
    principal = await gateway.authenticate(request, Kind.MODELS)
    data = [_model_object(gateway.created, name) for name in gateway.model_names(principal)]
    return _json(_encode({"object": "list", "data": data}))


async def get_model(request: web.Request) -> web.Response:
    gateway = request.app[gateway_key]
    principal = await gateway.authenticate(request, Kind.MODEL)
    name = request.match_info["model"]
    if name not in gateway.model_names(principal):
        raise ModelNotFound(f"The model '{name}' does not exist or is not served here", param="model")
    return _json(_encode(_model_object(gateway.created, name)))


def _model_object(created: int, name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": created, "owned_by": "aioproxy"}


async def health(request: web.Request) -> web.Response:
    """Liveness: 200 while the app serves; no auth, no upstream call."""
    return _json(_HEALTHY)


def make_handlers() -> dict[Kind, Handler]:
    """A handler for every endpoint kind."""
    handlers: dict[Kind, Handler] = {kind: make_provider_handler(kind) for kind in PROVIDER_KINDS}
    handlers[Kind.MODELS] = list_models
    handlers[Kind.MODEL] = get_model
    return handlers
