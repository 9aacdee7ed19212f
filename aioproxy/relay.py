"""Sending an answer to the client: a JSON body, or a stream relayed event by event (with the
keep-alive switch-over for slow first events); a failure after the headers is one error event.

Each way out releases the answer's lease (counting the tokens it spent) and then runs
``after_response`` after the last byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Coroutine
from typing import Any

import msgspec
from aiohttp import web

from .bridges.messages_events import message_events
from .context import Call
from .dispatch import Answer, Lease, tokens_spent
from .errors import SENT_STATUS, STOPPED, ProxyError, ServerShutdown, error_event
from .failures import as_proxy_error, is_transport_error
from .keepalive import KeepAliveClock
from .outcome import Outcome
from .plugins import Hooks
from .providers import JSONReply, StreamReply
from .routes import ANTHROPIC_KINDS, Kind
from .streaming import DONE, SSE_HEADERS, json_as_sse

__all__ = ["end_with_error", "send", "send_with_keepalive"]

log = logging.getLogger("aioproxy")


def send(
    request: web.Request, call: Call, answer: Answer, hooks: Hooks
) -> Coroutine[Any, Any, web.StreamResponse]:
    """Send ``answer``: as JSON, or as the stream it began (awaited by the caller: a plain
    function picking the coroutine, not one more coroutine around it)."""
    reply = answer.reply
    if isinstance(reply, StreamReply):
        return _send_stream(request, call, reply, answer.first, answer.lease, hooks)
    return _send_json(request, call, reply, answer.lease, hooks)


async def _send_json(
    request: web.Request, call: Call, reply: JSONReply, lease: Lease, hooks: Hooks
) -> web.StreamResponse:
    outcome = Outcome(reply.status, stream=False)
    outcome.body = reply.body
    lease.release(tokens_spent(call, outcome, lease.deployment))
    response = web.Response(
        body=reply.body, status=reply.status, content_type="application/json", headers=reply.headers
    )
    if hooks.after_response.implemented:
        # Send it first, so that the hooks run after the last byte, as they are promised.
        await response.prepare(request)
        await response.write_eof()
        outcome.elapsed = time.monotonic() - call.started
        if (rest := hooks.after_response.logged(call, outcome)) is not None:
            await rest
    return response


async def send_with_keepalive(
    request: web.Request,
    call: Call,
    pending: Awaitable[Answer],
    keepalive: KeepAliveClock,
    hooks: Hooks,
) -> web.StreamResponse:
    """Await a streaming call's answer, sending SSE comments if its first event is slow to come.

    A reasoning model can think for minutes before its first token, and load balancers cut
    connections that stay silent that long. Until the first comment goes out nothing is
    committed: a failure still gets its own status. After it, a failure becomes an error event.
    The common case (the first event comes within the interval) costs two dict operations.
    """
    keepalive.watch(call)
    try:
        answer = await pending
    except Exception as exc:
        response = await keepalive.stop(call)
        if response is None:
            raise
        await end_with_error(request, response, call, exc, Outcome(200, stream=True), hooks)
        return response
    except BaseException:  # the stop, or its client's leaving
        if (response := await keepalive.stop(call)) is not None:
            request[SENT_STATUS] = response.status  # the comments' status went out: it stays
        raise
    reply, first, lease = answer
    response = None
    if (keeper := keepalive.started(call)) is not None:  # comments went out, or are starting
        try:
            response = await keeper.stop()
        except BaseException:  # the client left just as the answer began: close it
            if keeper.response is not None:
                request[SENT_STATUS] = keeper.response.status
            try:
                if isinstance(reply, StreamReply):
                    await reply.aclose()
            finally:
                lease.release()
            raise
    if isinstance(reply, JSONReply):
        if response is None:
            return await _send_json(request, call, reply, lease, hooks)
        reply = StreamReply(_single(_as_events(call, reply.body)))  # headers are out
        first = await anext(reply.events)
    return await _send_stream(request, call, reply, first, lease, hooks, response)


async def _single(events: bytes) -> AsyncIterator[bytes]:
    yield events


def _as_events(call: Call, body: bytes) -> bytes:
    """A whole JSON answer as the stream its client expects: Anthropic's events for a Message."""
    if call.kind is Kind.MESSAGES:
        with contextlib.suppress(msgspec.DecodeError):
            message = msgspec.json.decode(body)
            if isinstance(message, dict) and message.get("type") == "message":
                return message_events(message)
    return json_as_sse(call.kind.value, body)


async def _send_stream(
    request: web.Request,
    call: Call,
    reply: StreamReply,
    first: bytes | None,
    lease: Lease,
    hooks: Hooks,
    response: web.StreamResponse | None = None,
) -> web.StreamResponse:
    """Relay a provider's events to the client one by one, as each arrives.

    ``first`` was pulled before the headers went out (unless keep-alive comments already sent
    them), so an error before it still got its own status. After that the status is fixed: a
    failure becomes one ``data: {"error": ...}`` event and the stream ends. When the client goes
    away (a failed write, or the handler being cancelled) the provider's stream is closed at once,
    which releases the upstream connection.
    """
    outcome = Outcome(200, stream=True)
    outcome.ttfb = time.monotonic() - call.started
    outcome.first = first
    handed_off = False  # the upstream's end left to a task of its own, which closes the reply
    try:
        whole = False
        if response is None:
            if (
                first is not None
                and first.endswith(_FINAL_EVENTS)
                and (finished := reply.finished) is not None
                and finished()
            ):
                # The upstream's whole stream came in its first read (a short answer, a cache):
                # it goes out as one body with a Content-Length, with no chunked framing to pay
                # for. (Checked here, not in a function: one call less a stream.)
                response, whole = web.Response(body=first, headers=SSE_HEADERS), True
            else:
                response = _EventStream(headers=SSE_HEADERS)
        if reply.headers and not response.prepared:
            response.headers.update(reply.headers)
        try:
            if whole:
                await response.prepare(request)
                await response.write_eof()
                outcome.came_whole()
            else:
                if not response.prepared:
                    await response.prepare(request)
                # Counted only when something reads the count (not for a stream come whole).
                count_events = hooks.after_response.implemented or lease.deployment.tpm is not None
                handed_off = await _relay(response, first, reply, outcome, count_events)
        except ConnectionResetError:
            outcome.disconnected = True
        except asyncio.CancelledError:
            if request.get(STOPPED):  # the gateway's stop cut it, not its client
                outcome.error_code = ServerShutdown.default_code
            else:
                outcome.disconnected = True
            raise
        except Exception as exc:  # noqa: BLE001 - whatever failed, the client gets one event
            await end_with_error(request, response, call, exc, outcome, hooks)
    finally:
        try:
            if not handed_off:
                await reply.aclose()
        finally:
            lease.release(tokens_spent(call, outcome, lease.deployment))
            if hooks.after_response.implemented:
                outcome.elapsed = time.monotonic() - call.started
                if (rest := hooks.after_response.logged(call, outcome)) is not None:
                    await rest
    return response


# How a stream's last event ends: chat's [DONE], Anthropic's message_stop. A first block that
# ends so, from an upstream that has ended (``reply.finished()``), holds the whole stream.
_FINAL_EVENTS = (DONE, b'"type":"message_stop"}\n\n')


class _EventStream(web.StreamResponse):
    """An SSE response whose headers go out with its first event, in one write (aiohttp's
    StreamResponse would send them on their own, as soon as it is prepared)."""

    _send_headers_immediately = False


_DRAIN_AFTER_DONE = 5.0  # seconds
# The upstream answers being drained after their [DONE] (strong references: a task only the loop
# knows of may be collected mid-way).
_DRAINING: set[asyncio.Task[None]] = set()


async def _relay(
    response: web.StreamResponse,
    first: bytes | None,
    reply: StreamReply,
    outcome: Outcome,
    count_events: bool,
) -> bool:
    """Write each block as it comes; the block that ends with the final event (chat's
    ``[DONE]``, Anthropic's ``message_stop``) goes out together with the end of the response
    (one write instead of two: the stream is over by the protocol).
    Events are counted only when something reads the count (it costs ~9 µs per 50 events).
    True: the upstream had yet to end its answer after that event, and a task of its own drains
    and closes it (the request is over: a client that leaves now left nothing unanswered)."""
    if first is None:
        await response.write_eof()
        return False
    block, events, previous, last = first, 0, first, first
    handed_off = False
    while True:
        if count_events:
            events += block.count(b"\n\n")
        if block.endswith(_FINAL_EVENTS):
            await response.write_eof(block)
            if reply.close is None and reply.finished is None:
                # Nothing upstream to let end (events made in memory: a cached answer, a
                # bridge's): their end is at hand, with no wait a client's leaving could cut.
                await _drain_events(reply)
            elif reply.finished is None or not reply.finished():
                task = asyncio.get_running_loop().create_task(_drain(reply))
                _DRAINING.add(task)
                task.add_done_callback(_DRAINING.discard)
                handed_off = True
            break
        await response.write(block)
        following = await anext(reply.events, None)
        if following is None:
            await response.write_eof()
            break
        block, previous, last = following, last, following
    outcome.events = events
    outcome.last_events = (last,) if previous is last else (previous, last)
    return handed_off


async def _drain_events(reply: StreamReply) -> None:
    """Let the answer end after its final event, so that its upstream connection goes back to
    the pool; one that lingers is cut (by ``aclose``, after)."""
    with contextlib.suppress(Exception):  # the client has it all: nothing to tell it
        async with asyncio.timeout(_DRAIN_AFTER_DONE):
            async for _ in reply.events:
                pass


async def _drain(reply: StreamReply) -> None:
    """A task's: drain the answer, then close it (a failing close is logged: no one awaits
    this task to hear of it)."""
    try:
        await _drain_events(reply)
    finally:
        try:
            await reply.aclose()
        except Exception:
            log.exception("closing a drained stream failed")


async def end_with_error(
    request: web.Request,
    response: web.StreamResponse,
    call: Call,
    exc: Exception,
    outcome: Outcome,
    hooks: Hooks,
) -> None:
    """A failure after the headers went out: one error event, then the end of the stream.

    The request keeps the status its client got (``outcome.status``, ``error.sent_status``);
    ``outcome.error_code`` says how it was cut short. ``on_error`` hears the error the client
    is told of."""
    # A ProxyError comes back as it is; a transport error as the client's 502/504.
    error = as_proxy_error(exc, call.deployment if call.routed else None)
    if not isinstance(exc, ProxyError) and not is_transport_error(exc):
        log.exception("stream from %s failed", call.routed and call.deployment.describe())
    error.sent_status = outcome.status
    outcome.error_code = error.code or error.type
    if hooks.on_error and (rest := hooks.on_error.logged(request, error, call)):
        await rest
    try:
        await response.write(error_event(error, call.kind in ANTHROPIC_KINDS))
        await response.write_eof()
    except ConnectionResetError:
        outcome.disconnected = True
