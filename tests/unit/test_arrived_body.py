"""_aiohttp.read_arrived_body: a body that came whole is read as ``request.read()`` reads it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestClient

from aioproxy._aiohttp import read_arrived_body

Client = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


def _app(client_max_size: int = 1024**2) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        assert request.content.is_eof()  # a small body comes with the headers
        body = read_arrived_body(request)
        again = await request.read()  # a later read (a plugin's) gets the same bytes
        return web.json_response({"body": body.decode(), "same": again == body})

    app = web.Application(client_max_size=client_max_size)
    app.router.add_post("/", echo)
    return app


async def test_the_body_and_a_later_read_are_the_bytes_sent(aiohttp_client: Client) -> None:
    client = await aiohttp_client(_app())
    response = await client.post("/", data=b'{"model": "m"}')
    assert await response.json() == {"body": '{"model": "m"}', "same": True}


async def test_a_body_over_client_max_size_is_413(aiohttp_client: Client) -> None:
    client = await aiohttp_client(_app(client_max_size=8))
    response = await client.post("/", data=b"x" * 9)
    assert response.status == 413
    assert "Maximum request body size 8 exceeded." in await response.text()
    response = await client.post("/", data=b"x" * 8)  # at the limit: read
    assert (await response.json())["body"] == "x" * 8
