"""Serving an app from ``run.py``: aiohttp's runner, with HTTP-level errors in OpenAI's shape.

aiohttp answers a request it cannot even parse (a malformed request line or header, a header
too long) itself, in plain text, and logs the offending bytes, which may hold a key. Here those
answers are OpenAI error objects too, and the log line names only the error's class. The
app's middleware never sees such a request, so its listeners (``UNPARSED``: the observer, for
its access line and metrics) are told of it here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable, MutableSequence
from http import HTTPStatus
from typing import Any

from aiohttp import web

from ._aiohttp import UNPARSED_MESSAGE, BaseRequest, RequestHandler, request_state
from .errors import STOPPED, error_body
from .heap import malloc_trim, trim_forever
from .request_ids import HEADER as REQUEST_ID_HEADER
from .request_ids import request_id

__all__ = ["UNPARSED", "UnparsedListener", "run", "serve_with"]

log = logging.getLogger("aioproxy")

# Told of each request answered here (its request, answer and error code), not by the app.
UnparsedListener = Callable[[BaseRequest, web.StreamResponse, str], None]
UNPARSED = web.AppKey("aioproxy.unparsed", MutableSequence[UnparsedListener])


class _OpenAIErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering unparseable requests with OpenAI errors."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # an answer had begun: nothing more can be said
            raise ConnectionError("Response is sent already, cannot send an error")
        log.info("malformed request answered %d (%s)", status, type(exc).__name__)
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        server_side = status >= 500
        code = "internal_error" if server_side else "malformed_request"
        response = web.Response(
            status=status,
            body=error_body(
                f"The proxy failed: {phrase}"
                if server_side
                else f"Malformed HTTP request: {phrase}",
                "server_error" if server_side else "invalid_request_error",
                code=code,
            ),
            content_type="application/json",
            # No app's signal sees an answer made here: the request's id set here (a new one
            # for a request never parsed, whose headers are not read).
            headers={REQUEST_ID_HEADER: request_id(request)},
        )
        response.force_close()
        manager = self._manager
        # Only a request that was never parsed: any other reached the app (its handler raised).
        if (
            request.message is UNPARSED_MESSAGE
            and isinstance(manager, _OpenAIErrorServer)
            and manager.app is not None
        ):
            for listener in manager.app.get(UNPARSED, ()):
                try:
                    listener(request, response, code)
                except Exception:  # a listener's bug must not cost the client its answer
                    log.exception("a listener of unparsed requests failed")
        return response

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """aiohttp's, the request still running when ``timeout`` (the grace) runs out marked
        ``STOPPED`` before aiohttp cancels its handler: it is logged as cut short by the stop,
        not by its client (whose leaving cancels a handler too). aiohttp cancels only after a
        wait of its own (up to about ``timeout`` again), so a client that leaves in between is
        logged as the stop's too: the mark cannot tell them apart, and both were cut short."""
        deadline = None
        if timeout is not None and self._current_request is not None:
            deadline = asyncio.get_running_loop().call_later(timeout, self._mark_stopped)
        try:
            await super().shutdown(timeout)
        finally:
            if deadline is not None:
                deadline.cancel()

    def _mark_stopped(self) -> None:
        request = self._current_request
        if request is not None:
            request_state(request)[STOPPED] = True


class _OpenAIErrorServer(web.Server):
    app: web.Application | None = None  # whose listeners hear of the requests answered here

    def __call__(self) -> RequestHandler:
        return _OpenAIErrorHandler(self, loop=self._loop, **self._kwargs)


def serve_with(runner: web.AppRunner, app: web.Application) -> None:
    """Make ``runner`` (set up, its site not started) serve ``app`` as run.py does: unparseable
    requests answered as OpenAI errors, and requests still running when its shutdown grace
    runs out logged as cut short by the stop."""
    assert runner.server is not None
    # Same server, our connection handler: the runner binds it when the site starts.
    runner.server.__class__ = _OpenAIErrorServer
    runner.server.app = app  # type: ignore[attr-defined]  # set on the class just above


async def _serve(
    app: web.Application,
    host: str,
    port: int,
    reuse_port: bool,
    on_ready: Callable[[int], None] | None,
    **runner_options: Any,
) -> None:
    runner = web.AppRunner(app, handle_signals=True, **runner_options)
    await runner.setup()
    trimmer: asyncio.Task[None] | None = None
    try:
        serve_with(runner, app)
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        # What start-up built (modules, the config, the route table, price rates) lives as long
        # as the process: out of the collector's sight, a full collection no longer walks it
        # all, which under load stalled the loop for tens of milliseconds (the p99 latency).
        gc.freeze()
        # Freed heap pages go back to the system as the process calms down (aioproxy.heap).
        trim = malloc_trim()
        if trim is not None:
            trimmer = asyncio.create_task(trim_forever(trim), name="aioproxy heap trim")
        if on_ready is not None:
            on_ready(runner.addresses[0][1])  # the port bound: port 0 picks one
        await asyncio.Event().wait()  # until SIGTERM/SIGINT raise GracefulExit
    finally:
        if trimmer is not None:
            trimmer.cancel()
        await runner.cleanup()


def run(
    app: web.Application,
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[int], None] | None = None,
    **runner_options: Any,
) -> None:
    """Serve ``app`` on ``loop`` until SIGTERM/SIGINT, then shut down gracefully (as run_app).

    ``on_ready(port)`` runs once the app has started, the port is listening and SIGTERM/SIGINT
    are handled: a supervisor that reads it may signal from then on. A failure to start
    (a provider refusing its config, say) is raised.
    """
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, host, port, reuse_port, on_ready, **runner_options))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError, web.GracefulExit):
                loop.run_until_complete(main)  # runs the runner's graceful cleanup
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()
