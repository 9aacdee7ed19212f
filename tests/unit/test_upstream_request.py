"""Upstream.request (what Provider.request calls: GET, DELETE outside a request): the 2xx
JSON answer as it is, a redirect never followed but refused as a 502 naming the deployment."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from aioproxy.config import parse_config
from aioproxy.context import Deployment
from aioproxy.errors import BadGateway
from aioproxy.transport import SessionTransport
from aioproxy.upstream import Upstream

DEPLOYMENT = Deployment(name="m", provider="openai", model="gpt-x")


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Any:
    """Answers GET /ok with JSON and GET /moved with a redirect; notes the keys it is sent."""
    seen: list[str] = []

    async def ok(request: web.Request) -> web.Response:
        seen.append(request.headers.get("x-key", ""))
        return web.json_response({"id": "resp_1"})

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/moved", moved)
    server = await aiohttp_server(app)
    server.seen = seen
    return server


async def test_request_answers_and_never_follows_a_redirect(upstream: Any) -> None:
    async with aiohttp.ClientSession() as session:
        client = Upstream(SessionTransport(session), parse_config({}))
        reply = await client.request(
            DEPLOYMENT, "GET", str(upstream.make_url("/ok")), {"x-key": "k1"}
        )
        assert (reply.status, reply.body) == (200, b'{"id": "resp_1"}')
        with pytest.raises(BadGateway) as refused:
            await client.request(DEPLOYMENT, "GET", str(upstream.make_url("/moved")), {})
    assert "m" in refused.value.message
    assert upstream.seen == ["k1"]  # the redirect was not followed to /ok
