"""Provider.post: through the app's lean pool when there is one, else the session; never a redirect."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from aioproxy.config import parse_config
from aioproxy.h1client import H1Pool, H1Response
from aioproxy.providers import Provider

# Provider(session, config) and Provider.post are deprecated shims (issue 11): still tested.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TIMEOUT = aiohttp.ClientTimeout(total=5)


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Any:
    """Answers /ok with JSON and /moved with a redirect; counts the connections it accepts."""
    seen: list[str] = []

    async def ok(request: web.Request) -> web.Response:
        seen.append(request.headers.get("x-key", ""))
        return web.json_response({"echo": await request.json()})

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    app = web.Application()
    app.router.add_post("/ok", ok)
    app.router.add_post("/moved", moved)
    server = await aiohttp_server(app)
    server.seen = seen
    return server


@pytest.mark.parametrize("with_pool", [True, False])
async def test_post_answers_and_never_follows_a_redirect(upstream: Any, with_pool: bool) -> None:
    async with aiohttp.ClientSession() as session:
        provider = Provider(session, parse_config({}))
        pool = H1Pool(asyncio.get_running_loop()) if with_pool else None
        provider.pool = pool
        try:
            response = await provider.post(
                str(upstream.make_url("/ok")), b'{"a": 1}', {"x-key": "k1"}, TIMEOUT
            )
            assert isinstance(response, H1Response) is with_pool
            assert (response.status, response.content_type) == (200, "application/json")
            assert await response.read() == b'{"echo": {"a": 1}}'
            response.release()
            moved = await provider.post(str(upstream.make_url("/moved")), b"{}", {}, TIMEOUT)
            assert moved.status == 302 and moved.headers["Location"] == "/ok"
            moved.close()
            assert upstream.seen == ["k1"]  # the redirect was not followed to /ok
            if pool is not None:
                assert pool.open_connections <= 1  # the keep-alive connection was reused
        finally:
            if pool is not None:
                await pool.close()
