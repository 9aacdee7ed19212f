"""A gateway-wide bound on buffered upstream bytes (issue #9.15): with a small budget, of two
large answers buffered at once one fails cleanly, the other is served, and every byte counted
is given back when the requests end."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from aioproxy import Call, Deployment, Provider, ProviderConfig, Upstream
from aioproxy.budget import BufferBudget, BufferFull
from aioproxy.config import parse_config
from aioproxy.context import ANONYMOUS
from aioproxy.keys import pool_key
from aioproxy.routes import Kind
from aioproxy.testing import assert_openai_error
from aioproxy.transport import SessionTransport
from tests.support import AUTH, MASTER_KEY, ServeProxy

HALF = 400 * 1024  # each answer's one event comes in two halves of this size
BUDGET = 1024 * 1024  # room for the first halves of both, not for a whole second event


async def until(check: Any) -> None:
    async with asyncio.timeout(10):  # a safety net: the condition is what ends the wait
        while not check():
            await asyncio.sleep(0.005)


def config(base: str) -> dict[str, Any]:
    return {
        "auth": {"master_key": MASTER_KEY},
        "models": [
            {
                "name": "big",
                "provider": "openai",
                "model": "m",
                "api_base": base,
                "api_key": "sk-up",
            }
        ],
        "router": {"num_retries": 0},
        "upstream": {"max_buffered_bytes": BUDGET},
    }


@pytest.mark.parametrize("stream", [True, False], ids=["events", "bodies"])
async def test_two_large_answers_one_fails_the_other_is_served(
    aiohttp_server: Any, serve_proxy: ServeProxy, http: Any, stream: bool
) -> None:
    budget: BufferBudget | None = None
    both_held = asyncio.Event()
    content = "x" * (2 * HALF)
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    answer = {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
    }

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        data = (f"data: {json.dumps(chunk)}\n\n" if stream else json.dumps(answer)).encode()
        # Chunked, so that a body is counted as it comes, like an event.
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream" if stream else "application/json"}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(data[:HALF])
        assert budget is not None
        # Both first halves are held by the proxy before either second half goes.
        await until(lambda: both_held.is_set() or budget.used >= 2 * HALF)
        both_held.set()
        await response.write(data[HALF:] + (b"data: [DONE]\n\n" if stream else b""))
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    upstream = await aiohttp_server(app)
    proxy = await serve_proxy(config(str(upstream.make_url("/v1"))))
    budget = proxy.app[pool_key].budget
    body = {"model": "big", "messages": [], "stream": stream}

    async def call() -> Any:
        return await http.post(proxy.make_url("/v1/chat/completions"), headers=AUTH, json=body)

    responses = await asyncio.gather(call(), call())
    failed = [r for r in responses if r.status != 200]
    served = [r for r in responses if r.status == 200]
    assert len(failed) == 1 and len(served) == 1
    await assert_openai_error(failed[0], 503, "gateway_buffers_full")
    text = await served[0].text()
    assert content in text
    await until(lambda: budget.used == 0)  # all given back when the requests end


def test_budget_counts_and_refuses() -> None:
    budget = BufferBudget(10)
    budget.take(6)
    with pytest.raises(BufferFull):
        budget.take(5)
    assert budget.used == 6  # a refused take counts nothing
    budget.give(6)
    budget.take(10)
    assert budget.used == 10
    unbounded = BufferBudget(0)
    unbounded.take(10**12)


async def test_answers_read_through_the_session_count_against_the_budget(
    aiohttp_server: Any,
) -> None:
    """The budget is the Upstream's: an answer read through a ClientSession (SessionTransport,
    Provider.request) counts against it as the lean pool's answers do."""
    big = json.dumps({"id": "resp_1", "pad": "x" * (2 * BUDGET)}).encode()

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=big, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/v1/responses/resp_1", answer)
    server = await aiohttp_server(app)
    url = str(server.make_url("/v1/responses/resp_1"))
    deployment = Deployment(name="big", provider="openai", model="m")
    call = Call(Kind.RESPONSES, make_mocked_request("POST", "/"), ANONYMOUS, "big", {}, False)
    call.route_to(deployment)
    config = parse_config({})
    async with aiohttp.ClientSession() as session:
        budget = BufferBudget(BUDGET)
        upstream = Upstream(SessionTransport(session), config, session, budget=budget)
        response = await upstream.post(call, url, b"{}", {})
        with pytest.raises(BufferFull), upstream.guard(response, call):
            await upstream.read(response, call)
        provider = Provider(upstream, ProviderConfig.of("openai", config, {}))
        with pytest.raises(BufferFull):
            await provider.request(deployment, "GET", url, {})
        assert budget.used == 0  # every byte counted was given back
        budget.limit = 4 * BUDGET
        assert (await provider.request(deployment, "GET", url, {})).body == big
