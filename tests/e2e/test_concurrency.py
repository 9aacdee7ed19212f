"""Many clients at once, clients that go away, and config aliases."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
from aiohttp.test_utils import TestServer

from aioproxy.testing import FakeOpenAI, eventually
from tests.support import AUTH, ServeProxy, gateway_config, sdk

MESSAGES = [{"role": "user", "content": "many at once"}]


async def test_concurrent_requests_all_complete(proxy: TestServer, fake: FakeOpenAI) -> None:
    fake.stream_delay = 0.005

    async def one(i: int, client: openai.AsyncOpenAI) -> str:
        if i % 2:
            stream = await client.chat.completions.create(
                model="gpt-test", messages=MESSAGES, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        done = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        return done.choices[0].message.content or ""

    async with sdk(proxy) as client:
        answers = await asyncio.gather(*(one(i, client) for i in range(60)))
    assert answers == ["fake reply to: many at once"] * 60
    assert len(fake.requests) == 60


async def test_client_leaving_mid_stream_cancels_upstream(
    proxy: TestServer, fake: FakeOpenAI
) -> None:
    fake.stream_delay = 0.2
    fake.stream_chunks = 50  # ten seconds of stream, were it left to run
    body = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as http:
        response = await http.post(proxy.make_url("/v1/chat/completions"), json=body, headers=AUTH)
        await response.content.readline()  # the first event has arrived
        assert fake.in_flight == 1
        response.close()  # the client goes away
    await eventually(lambda: fake.in_flight == 0, within=5.0)
    async with sdk(proxy) as client:  # and the proxy still serves
        assert (await client.chat.completions.create(model="gpt-test", messages=MESSAGES)).choices


async def test_client_leaving_before_first_token_cancels_upstream(
    proxy: TestServer, fake: FakeOpenAI
) -> None:
    fake.faults.append("hang")  # the upstream says nothing, like a model still thinking
    body = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as http:
        with_timeout = aiohttp.ClientTimeout(total=0.3)
        try:
            await http.post(
                proxy.make_url("/v1/chat/completions"),
                json=body,
                headers=AUTH,
                timeout=with_timeout,
            )
        except TimeoutError:
            pass
    await eventually(lambda: fake.in_flight == 0, within=5.0)


async def test_config_aliases_reach_the_same_handler(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    config = gateway_config(
        upstream_base,
        aliases={
            "chat_completions": ["/openai/v1/chat/completions"],
            "models": ["/openai/v1/models"],
        },
    )
    proxy = await serve_proxy(config)
    async with sdk(proxy, prefix="/openai/v1") as client:
        done = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        assert done.choices[0].message.content == "fake reply to: many at once"
        assert len((await client.models.list()).data) == 2
    async with sdk(proxy) as client:  # the built-in paths are still there
        assert (await client.chat.completions.create(model="gpt-test", messages=MESSAGES)).choices
