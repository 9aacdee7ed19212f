"""Upstream.post / guard: the one place a provider's POST becomes an answer or an error, over
both transports."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from aioproxy.config import Timeouts, parse_config
from aioproxy.context import Call, Deployment, Principal
from aioproxy.errors import BadGateway, ProxyError
from aioproxy.h1client import H1Pool
from aioproxy.routes import Kind
from aioproxy.transport import Transport
from aioproxy.upstream import Upstream

DEPLOYMENT = Deployment(name="m", provider="p", model="m", timeouts=Timeouts(total=5))
CONFIG = parse_config({})


def routed_call() -> Call:
    request = make_mocked_request("POST", "/v1/chat/completions")
    call = Call(Kind.CHAT_COMPLETIONS, request, Principal("t"), "m", {}, stream=False)
    call.route_to(DEPLOYMENT)
    return call


@pytest.fixture
async def base(aiohttp_server: Any) -> str:
    async def status(request: web.Request) -> web.StreamResponse:
        code = int(request.match_info["code"])
        if code == 200:  # a body that keeps coming: a reader may be cut off mid-way
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"{")
            await asyncio.sleep(5)
            return response
        headers = {"Location": "/elsewhere", "Retry-After": "7"}
        return web.Response(status=code, body=b'{"error": {"message": "nope"}}', headers=headers)

    app = web.Application()
    app.router.add_post("/{code}", status)
    return str((await aiohttp_server(app)).make_url("/"))


async def test_an_error_status_goes_through_the_providers_reader(
    base: str, transport: Transport
) -> None:
    seen: list[tuple[int, bytes, str | None]] = []

    def read_error(
        status: int, body: bytes, deployment: Deployment, headers: Mapping[str, str]
    ) -> ProxyError:
        seen.append((status, body, headers.get("Retry-After")))
        return ProxyError("mapped", status=status)

    upstream = Upstream(transport, CONFIG)
    with pytest.raises(ProxyError) as caught:
        await upstream.post(routed_call(), base + "429", b"{}", {}, read_error=read_error)
    assert caught.value.message == "mapped"
    assert seen == [(429, b'{"error": {"message": "nope"}}', "7")]


async def test_openai_errors_by_default_and_redirects_refused(
    base: str, transport: Transport
) -> None:
    upstream, call = Upstream(transport, CONFIG), routed_call()
    with pytest.raises(ProxyError) as caught:
        await upstream.post(call, base + "429", b"{}", {})
    assert (caught.value.status, caught.value.message) == (429, "nope")
    assert caught.value.headers == {"Retry-After": "7"}
    with pytest.raises(BadGateway) as redirect:
        await upstream.post(call, base + "302", b"{}", {})
    assert redirect.value.code == "upstream_redirect"


async def test_a_cancelled_read_closes_the_answer(base: str) -> None:
    pool = H1Pool(asyncio.get_running_loop())
    upstream, call = Upstream(pool, CONFIG), routed_call()
    response = await upstream.post(call, base + "200", b"{}", {})

    async def read() -> None:
        with upstream.guard(response, call):
            await response.content.read()

    reading = asyncio.ensure_future(read())
    await asyncio.sleep(0.05)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert pool.open_connections == 0  # hung up, not left busy or pooled
    await pool.close()
