"""Serving an app from ``run.py``: aiohttp's runner, with HTTP-level errors in OpenAI's shape.

aiohttp answers a request it cannot even parse (a malformed request line or header, a header
too long) itself, in plain text, and logs the offending bytes, which may hold a key. Here those
answers are OpenAI error objects too, and the log line names only the error's class.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from ._aiohttp import BaseRequest, RequestHandler
from .errors import error_body
from .heap import malloc_trim, trim_forever
from .request_ids import HEADER as REQUEST_ID_HEADER
from .request_ids import new_request_id

__all__ = ["run"]

log = logging.getLogger("aioproxy")


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
        response = web.Response(
            status=status,
            body=error_body(
                f"The proxy failed: {phrase}"
                if server_side
                else f"Malformed HTTP request: {phrase}",
                "server_error" if server_side else "invalid_request_error",
                code="internal_error" if server_side else "malformed_request",
            ),
            content_type="application/json",
            # No app saw it (its signal sets the id on every other answer): a new id here.
            headers={REQUEST_ID_HEADER: new_request_id()},
        )
        response.force_close()
        return response


class _OpenAIErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _OpenAIErrorHandler(self, loop=self._loop, **self._kwargs)


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
        assert runner.server is not None
        # Same server, our connection handler: the runner binds it when the site starts.
        runner.server.__class__ = _OpenAIErrorServer
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
