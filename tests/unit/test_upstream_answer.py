"""answer_of / closed_on_failure: the one place a provider's POST becomes an answer or an error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from aioproxy.context import Deployment
from aioproxy.errors import BadGateway, ProxyError
from aioproxy.h1client import H1Pool
from aioproxy.upstream import answer_of, closed_on_failure

DEPLOYMENT = Deployment(name="m", provider="p", model="m")
TIMEOUT = aiohttp.ClientTimeout(total=5)


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


@pytest.fixture
async def pool() -> AsyncIterator[H1Pool]:
    pool = H1Pool(asyncio.get_running_loop())
    yield pool
    await pool.close()


async def test_an_error_status_goes_through_the_providers_reader(base: str, pool: H1Pool) -> None:
    seen: list[tuple[int, bytes, str | None]] = []

    def read_error(
        status: int, body: bytes, deployment: Deployment, headers: Mapping[str, str]
    ) -> ProxyError:
        seen.append((status, body, headers.get("Retry-After")))
        return ProxyError("mapped", status=status)

    with pytest.raises(ProxyError) as caught:
        await answer_of(pool.post(base + "429", b"{}", {}, TIMEOUT), DEPLOYMENT, read_error)
    assert caught.value.message == "mapped"
    assert seen == [(429, b'{"error": {"message": "nope"}}', "7")]


async def test_openai_errors_by_default_and_redirects_refused(base: str, pool: H1Pool) -> None:
    with pytest.raises(ProxyError) as caught:
        await answer_of(pool.post(base + "429", b"{}", {}, TIMEOUT), DEPLOYMENT)
    assert (caught.value.status, caught.value.message) == (429, "nope")
    assert caught.value.headers == {"Retry-After": "7"}
    with pytest.raises(BadGateway) as redirect:
        await answer_of(pool.post(base + "302", b"{}", {}, TIMEOUT), DEPLOYMENT)
    assert redirect.value.code == "upstream_redirect"


async def test_a_cancelled_read_closes_the_answer(base: str, pool: H1Pool) -> None:
    response = await answer_of(pool.post(base + "200", b"{}", {}, TIMEOUT), DEPLOYMENT)

    async def read() -> None:
        with closed_on_failure(response, DEPLOYMENT):
            await response.content.read()

    reading = asyncio.ensure_future(read())
    await asyncio.sleep(0.05)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert pool.open_connections == 0  # hung up, not left busy or pooled
