"""A stream's progress is counted in complete events (issue #9.18): an upstream that trickles
bytes forever without completing an event cannot hold a stream; the defaults bound every call."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from aioproxy.config import Timeouts
from aioproxy.transport import client_timeout as timeout_for
from tests.support import AUTH, MASTER_KEY, ServeProxy

FIRST = {
    "id": "c1",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
}


def trickling_upstream() -> web.Application:
    """One event, then one byte every 0.05 s of an event that never ends, until the proxy
    hangs up."""

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"data: {json.dumps(FIRST)}\n\n".encode())
        await response.write(b"data: ")
        while True:
            await asyncio.sleep(0.05)
            await response.write(b"x")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def test_a_trickling_stream_ends_with_a_timeout_event(
    aiohttp_server: Any, serve_proxy: ServeProxy, http: Any
) -> None:
    upstream = await aiohttp_server(trickling_upstream())
    config = {
        "auth": {"master_key": MASTER_KEY},
        "models": [
            {
                "name": "slow",
                "provider": "openai",
                "model": "m",
                "api_base": str(upstream.make_url("/v1")),
                "api_key": "sk-up",
            }
        ],
        "upstream": {"timeouts": {"read": 0.2}},
    }
    proxy = await serve_proxy(config)
    response = await http.post(
        proxy.make_url("/v1/chat/completions"),
        headers=AUTH,
        json={"model": "slow", "messages": [], "stream": True},
    )
    assert response.status == 200
    body = await asyncio.wait_for(response.read(), 30)  # a safety net: it ends by itself
    events = [event for event in body.split(b"\n\n") if event.strip()]
    assert json.loads(events[0][len(b"data: ") :]) == FIRST
    assert len(events) == 2
    error = json.loads(events[1][len(b"data: ") :])["error"]
    assert (error["type"], error["code"]) == ("timeout_error", "upstream_timeout")


def test_default_timeouts_bound_a_call() -> None:
    """``read`` is at most 120 s by default; ``first_byte`` stays separate: when longer, the
    socket may stay silent that long before the first event."""
    defaults = Timeouts()
    assert defaults.read <= 120
    assert timeout_for(defaults).event == defaults.read
    thinking = Timeouts(first_byte=600)
    assert timeout_for(thinking).sock_read == 600 and timeout_for(thinking).event == 120
