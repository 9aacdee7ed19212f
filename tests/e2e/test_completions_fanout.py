"""Legacy completions with a list of prompts on a chat-only provider (issue #9.1): one chat call
per prompt, but a bounded list, a bounded number in flight at once, and each call counted
against the deployment's limits."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from aioproxy.testing import FakeClock, FakeOpenAI, assert_openai_error
from tests.e2e.test_bridges import ChatOnlyPlugin  # "chatonly": openai with chat only
from tests.support import AUTH, ServeProxy, gateway_config


async def start(
    serve_proxy: ServeProxy, base: str, entry: dict[str, Any] | None = None, **overrides: Any
) -> TestServer:
    config = gateway_config(base, **overrides)
    config["models"][0].update({"provider": "chatonly", **(entry or {})})
    return await serve_proxy(config, plugins=[ChatOnlyPlugin()])


async def complete(
    proxy: TestServer, prompt: Any, **body: Any
) -> tuple[aiohttp.ClientResponse, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.make_url("/v1/completions"),
            headers=AUTH,
            json={"model": "gpt-test", "prompt": prompt, **body},
        ) as response:
            if response.status != 200:
                return response, await assert_openai_error(response, response.status)
            return response, await response.json()


async def in_flight(proxy: TestServer) -> list[int]:
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.make_url("/health/readiness"), headers=AUTH) as response:
            rows = (await response.json())["deployments"]
    return [row["in_flight"] for row in rows]


async def test_many_prompts_are_sent_a_few_at_a_time(
    serve_proxy: ServeProxy, fake: FakeOpenAI, upstream_base: str
) -> None:
    proxy = await start(serve_proxy, upstream_base)
    fake.response_delay = 0.02  # long enough for the calls in flight to overlap
    prompts = [f"prompt {i}" for i in range(150)]
    response, body = await complete(proxy, prompts)
    assert response.status == 200
    assert [c["text"] for c in body["choices"]] == [f"fake reply to: {p}" for p in prompts]
    assert len(fake.requests) == 150
    assert 2 <= fake.max_in_flight <= 8, fake.max_in_flight  # [completions] concurrency = 8
    assert await in_flight(proxy) == [0, 0]


async def test_concurrency_is_configurable(
    serve_proxy: ServeProxy, fake: FakeOpenAI, upstream_base: str
) -> None:
    proxy = await start(serve_proxy, upstream_base, completions={"concurrency": 1})
    fake.response_delay = 0.01
    response, body = await complete(proxy, ["a", "b", "c", "d"], stream=False)
    assert response.status == 200 and len(body["choices"]) == 4
    assert fake.max_in_flight == 1


async def test_each_prompt_counts_against_the_rpm_cap(
    serve_proxy: ServeProxy, fake: FakeOpenAI, upstream_base: str
) -> None:
    proxy = await start(serve_proxy, upstream_base, {"rpm": 5})
    FakeClock().install(proxy)
    response, _ = await complete(proxy, ["a", "b", "c", "d", "e"])
    assert response.status == 200 and len(fake.requests) == 5
    response, error = await complete(proxy, "one more")  # five requests' worth this minute
    assert response.status == 429 and error["code"] == "rate_limit_exceeded"
    assert len(fake.requests) == 5
    assert await in_flight(proxy) == [0, 0]


async def test_streamed_prompts_count_against_the_rpm_cap(
    serve_proxy: ServeProxy, fake: FakeOpenAI, upstream_base: str
) -> None:
    proxy = await start(serve_proxy, upstream_base, {"rpm": 3})
    FakeClock().install(proxy)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.make_url("/v1/completions"),
            headers=AUTH,
            json={"model": "gpt-test", "prompt": ["a", "b", "c"], "stream": True},
        ) as response:
            assert response.status == 200
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
    assert len(fake.requests) == 3
    response, _ = await complete(proxy, "one more")
    assert response.status == 429 and len(fake.requests) == 3
    assert await in_flight(proxy) == [0, 0]


async def test_a_list_over_the_cap_is_refused(
    serve_proxy: ServeProxy, fake: FakeOpenAI, upstream_base: str
) -> None:
    proxy = await start(serve_proxy, upstream_base, completions={"max_prompts": 4})
    response, error = await complete(proxy, ["p"] * 5)
    assert response.status == 400 and error["param"] == "prompt"
    assert "at most 4" in error["message"]
    response, _ = await complete(proxy, ["p"] * 4)
    assert response.status == 200
    assert len(fake.requests) == 4


async def test_prompts_of_the_wrong_type_are_refused(
    serve_proxy: ServeProxy, fake: FakeOpenAI, upstream_base: str
) -> None:
    proxy = await start(serve_proxy, upstream_base)
    for prompt in (5, [], [{"x": 1}], [[1, 2], 3]):
        response, error = await complete(proxy, prompt)
        assert response.status == 400 and error["param"] == "prompt", (prompt, error)
    assert fake.requests == []


async def test_a_list_the_cap_cannot_take_is_a_429_not_a_cooldown(
    serve_proxy: ServeProxy, fake: FakeOpenAI, upstream_base: str
) -> None:
    proxy = await start(
        serve_proxy,
        upstream_base,
        {"rpm": 3},
        completions={"concurrency": 1},
        router={"cooldown_failures": 1},
    )
    FakeClock().install(proxy)
    response, error = await complete(proxy, ["a", "b", "c", "d", "e"])
    assert response.status == 429 and error["code"] == "rate_limit_exceeded", error
    assert len(fake.requests) == 3  # the calls the cap allowed; none beyond it
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.make_url("/health/readiness"), headers=AUTH) as health:
            row = (await health.json())["deployments"][0]
    assert row["failed"] == 0 and row["cooldown_remaining"] == 0 and row["in_flight"] == 0
