"""The openai provider through aioproxy.testing, against the fake OpenAI upstream of tests/fakes."""

from __future__ import annotations

from typing import Any

import aioproxy_openai
import pytest

from aioproxy import testing

REPLY = "fake reply to: Say hello to the kit"


@pytest.fixture
def fake() -> testing.FakeOpenAI:
    return testing.FakeOpenAI()


@pytest.fixture
async def proxy(aiohttp_server: Any, fake: testing.FakeOpenAI) -> testing.ProxyUnderTest:
    upstream = await aiohttp_server(fake.app())
    base = {"provider": "openai", "api_base": str(upstream.make_url("/v1")), "api_key": "sk-up"}
    models = [
        {"name": "gpt", "model": "gpt-4o-mini", **base},
        {"name": "instruct", "model": "gpt-3.5-turbo-instruct", **base},
        {"name": "embed", "model": "text-embedding-3-small", **base},
    ]
    return await testing.start_proxy(aiohttp_server, {"models": models}, [aioproxy_openai])


async def test_chat(proxy: testing.ProxyUnderTest) -> None:
    assert await testing.check_chat(proxy, "gpt") == REPLY


async def test_chat_stream(proxy: testing.ProxyUnderTest) -> None:
    assert await testing.check_chat_stream(proxy, "gpt") == REPLY


async def test_chat_stream_of_a_tool_call(proxy: testing.ProxyUnderTest) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert await testing.check_chat_stream(proxy, "gpt", tools=tools) == ""


async def test_completion(proxy: testing.ProxyUnderTest) -> None:
    assert await testing.check_completion(proxy, "instruct") == REPLY


async def test_responses(proxy: testing.ProxyUnderTest) -> None:
    assert await testing.check_responses(proxy, "gpt") == REPLY


async def test_embeddings(proxy: testing.ProxyUnderTest) -> None:
    vectors = await testing.check_embeddings(proxy, "embed", inputs=["a", "b", "c"], dims=8)
    assert len(vectors) == 3


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("status:400", 400, None),
        ("status:404", 404, None),
        ("status:429", 429, "rate_limit_exceeded"),
        ("status:500", 500, None),
        ("status:503", 503, None),
        ("status:401", 502, "upstream_auth_failed"),  # the proxy's key, not the client's
        ("garbage", 502, "upstream_invalid_response"),
        ("reset", 502, "upstream_disconnected"),
        ("redirect", 502, "upstream_redirect"),
    ],
)
async def test_error_mapping(
    proxy: testing.ProxyUnderTest,
    fake: testing.FakeOpenAI,
    fault: str,
    status: int,
    code: str | None,
) -> None:
    await testing.check_error_mapping(
        proxy, "gpt", lambda: fake.faults.append(fault), status, code=code
    )


async def test_client_leaving_closes_the_upstream(
    proxy: testing.ProxyUnderTest, fake: testing.FakeOpenAI
) -> None:
    fake.stream_delay = 0.02
    fake.stream_chunks = 100  # two seconds of stream, were it left to run
    await testing.check_cancellation(proxy, "gpt", lambda: fake.in_flight)
