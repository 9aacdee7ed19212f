"""The HTTP handlers: one per endpoint kind, each reading top to bottom through the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from .context import Call
from .errors import ModelNotFound, ProxyError, error_payload
from .gateway import Plan
from .keys import gateway_key
from .outcome import Outcome
from .providers import JSONReply, StreamReply
from .routes import PROVIDER_KINDS, Kind
from .streaming import DONE, SSE_HEADERS, json_as_sse
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
            plan = await gateway.route(call)
            if call.stream and gateway.keepalive is not None:
                return await _stream_with_keepalive(request, call, plan)
            reply, first = await gateway.dispatch(call, plan)
            if isinstance(reply, StreamReply):
                return await _send_stream(request, call, reply, first)
            return await _send_json(request, call, reply)
        except Exception as exc:
            if gateway.hooks.on_error:
                await gateway.observe_error(request, exc, call)
            raise
        finally:
            if call is not None and call.lease is not None:
                gateway.finish(call, None)

    handle.__name__ = f"handle_{kind.value}"
    return handle


async def _send_json(request: web.Request, call: Call, reply: JSONReply) -> web.StreamResponse:
    gateway = request.app[gateway_key]
    outcome = Outcome(reply.status, stream=False)
    outcome.body = reply.body
    gateway.finish(call, outcome)
    response = web.Response(
        body=reply.body, status=reply.status, content_type="application/json", headers=reply.headers
    )
    if gateway.hooks.after_response:
        # Send it first, so that the hooks run after the last byte, as they are promised.
        await response.prepare(request)
        await response.write_eof()
        outcome.elapsed = time.monotonic() - call.started
        await gateway.report(call, outcome)
    return response


async def _stream_with_keepalive(request: web.Request, call: Call, plan: Plan) -> web.StreamResponse:
    """Dispatch a streaming call, sending SSE comments if its first event is slow to come.

    A reasoning model can think for minutes before its first token, and load balancers cut
    connections that stay silent that long. Until the first comment goes out nothing is
    committed: a failure still gets its own status. After it, a failure becomes an error event.
    The common case (the first event comes within the interval) costs two dict operations.
    """
    gateway = request.app[gateway_key]
    assert gateway.keepalive is not None
    keeper = gateway.keepalive.watch(request)
    try:
        reply, first = await gateway.dispatch(call, plan)
    except Exception as exc:
        response = await keeper.stop()
        if response is None:
            raise
        await _end_with_error(request, response, call, exc, Outcome(200, stream=True))
        return response
    except BaseException:
        await keeper.stop()
        raise
    try:
        response = await keeper.stop()
    except BaseException:  # the client left just as the answer began: close it
        if isinstance(reply, StreamReply):
            await reply.aclose()
        raise
    if isinstance(reply, JSONReply):
        if response is None:
            return await _send_json(request, call, reply)
        reply = StreamReply(_single(json_as_sse(call.kind.value, reply.body)))  # headers are out
        first = await anext(reply.events)
    return await _send_stream(request, call, reply, first, response)


async def _single(events: bytes) -> AsyncIterator[bytes]:
    yield events


async def _send_stream(
    request: web.Request,
    call: Call,
    reply: StreamReply,
    first: bytes | None,
    response: web.StreamResponse | None = None,
) -> web.StreamResponse:
    """Relay a provider's events to the client one by one, as each arrives.

    ``first`` was pulled before the headers went out (unless keep-alive comments already sent
    them), so an error before it still got its own status. After that the status is fixed: a
    failure becomes one ``data: {"error": ...}`` event and the stream ends. When the client goes
    away (a failed write, or the handler being cancelled) the provider's stream is closed at once,
    which releases the upstream connection.
    """
    gateway = request.app[gateway_key]
    outcome = Outcome(200, stream=True)
    outcome.ttfb = time.monotonic() - call.started
    count_events = bool(gateway.hooks.after_response) or (
        call.lease is not None and call.lease.tpm is not None
    )
    try:
        if response is None and _is_whole(first, reply):
            # The upstream's whole stream came in its first read (a short answer, a cache): it
            # goes out as one body with a Content-Length, with no chunked framing to pay for.
            assert first is not None
            response = web.Response(body=first, headers=SSE_HEADERS)
        elif response is None:
            response = _EventStream(headers=SSE_HEADERS)
        if reply.headers and not response.prepared:
            response.headers.update(reply.headers)
        try:
            if isinstance(response, web.Response):
                await response.prepare(request)
                await response.write_eof()
                assert first is not None
                outcome.events = first.count(b"\n\n") if count_events else 0
                outcome.last_events = (first,)
            else:
                if not response.prepared:
                    await response.prepare(request)
                await _relay(response, first, reply, outcome, count_events)
        except ConnectionResetError:
            outcome.disconnected = True
        except asyncio.CancelledError:
            outcome.disconnected = True
            raise
        except Exception as exc:
            await _end_with_error(request, response, call, exc, outcome)
    finally:
        try:
            await reply.aclose()
        finally:
            gateway.finish(call, outcome)
            if gateway.hooks.after_response:
                outcome.elapsed = time.monotonic() - call.started
                await gateway.report(call, outcome)
    return response


def _is_whole(first: bytes | None, reply: StreamReply) -> bool:
    """The first block holds the whole stream: it ends with [DONE] and the upstream has ended."""
    return (
        first is not None
        and first.endswith(DONE)
        and reply.finished is not None
        and reply.finished()
    )


class _EventStream(web.StreamResponse):
    """An SSE response whose headers go out with its first event, in one write (aiohttp's
    StreamResponse would send them on their own, as soon as it is prepared)."""

    _send_headers_immediately = False


_DRAIN_AFTER_DONE = 5.0  # seconds


async def _relay(
    response: web.StreamResponse,
    first: bytes | None,
    reply: StreamReply,
    outcome: Outcome,
    count_events: bool,
) -> None:
    """Write each block as it comes; the block that ends with ``[DONE]`` goes out together with
    the end of the response (one write instead of two: the stream is over by the protocol).
    Events are counted only when something reads the count (it costs ~9 µs per 50 events)."""
    if first is None:
        await response.write_eof()
        return
    block, events, previous, last = first, 0, first, first
    while True:
        if count_events:
            events += block.count(b"\n\n")
        if block.endswith(DONE):
            await response.write_eof(block)
            if reply.finished is None or not reply.finished():
                await _drain(reply)
            break
        await response.write(block)
        following = await anext(reply.events, None)
        if following is None:
            await response.write_eof()
            break
        block, previous, last = following, last, following
    outcome.events = events
    outcome.last_events = (last,) if previous is last else (previous, last)


async def _drain(reply: StreamReply) -> None:
    """Let the upstream's answer end after ``[DONE]``, so that its connection goes back to the
    pool; one that lingers is cut (``aclose`` closes it)."""
    with contextlib.suppress(Exception):  # the client has it all: nothing to tell it
        async with asyncio.timeout(_DRAIN_AFTER_DONE):
            async for _ in reply.events:
                pass


async def _end_with_error(
    request: web.Request, response: web.StreamResponse, call: Call, exc: Exception, outcome: Outcome
) -> None:
    """A failure after the headers went out: one error event, then the end of the stream."""
    gateway = request.app[gateway_key]
    error = failure_from(exc, call.deployment if call.routed else None)  # a ProxyError comes back as it is
    if not isinstance(exc, ProxyError) and not _is_client_error(exc):
        log.exception("stream from %s failed", call.routed and call.deployment.describe())
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


async def readiness(request: web.Request) -> web.Response:
    """Each configured deployment's state (cooldown, in flight, latency); 503 when some model has
    no deployment available. No auth: it shows no key and no address."""
    gateway = request.app[gateway_key]
    rows = gateway.router.snapshot(gateway.table)
    ready = all(
        any(row["available"] for row in rows if row["model"] == model) for model in gateway.table
    )
    body = {"status": "ready" if ready else "degraded", "deployments": rows}
    return _json(_encode(body), 200 if ready else 503)


def make_handlers() -> dict[Kind, Handler]:
    """A handler for every endpoint kind."""
    handlers: dict[Kind, Handler] = {kind: make_provider_handler(kind) for kind in PROVIDER_KINDS}
    handlers[Kind.MODELS] = list_models
    handlers[Kind.MODEL] = get_model
    return handlers
