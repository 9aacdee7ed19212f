"""The echo provider through aioproxy.testing: every endpoint kind as clients see it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aioproxy_echo
import pytest

from aioproxy.testing import (
    ProxyUnderTest,
    assert_response_events,
    check_cancellation,
    check_chat,
    check_chat_stream,
    check_completion,
    check_embeddings,
    check_responses,
    read_sse,
    start_proxy,
)

ECHOED = "Say hello to the kit"  # the kit's default message, echoed back


@pytest.fixture
async def proxy(aiohttp_server: Any, tmp_path: Path) -> ProxyUnderTest:
    models = [
        {"name": "echo", "provider": "echo"},
        {"name": "slow-echo", "provider": "echo", "settings": {"delay": 0.02}},
    ]
    # Responses go through the core's bridge, which stores them in the kit's scratch database.
    return await start_proxy(aiohttp_server, {"models": models}, [aioproxy_echo])


async def test_chat(proxy: ProxyUnderTest) -> None:
    assert await check_chat(proxy, "echo") == ECHOED
    assert await check_chat(proxy, "echo", n=2, max_tokens=2) == "Say hello"


async def test_chat_stream(proxy: ProxyUnderTest) -> None:
    assert await check_chat_stream(proxy, "echo") == ECHOED
    assert await check_chat_stream(proxy, "echo", n=3) == ECHOED


async def test_completion(proxy: ProxyUnderTest) -> None:
    assert await check_completion(proxy, "echo") == ECHOED


async def test_responses(proxy: ProxyUnderTest) -> None:
    assert await check_responses(proxy, "echo") == ECHOED


async def test_responses_cut_short_end_incomplete(proxy: ProxyUnderTest) -> None:
    body = {"model": "echo", "input": ECHOED, "max_output_tokens": 2, "stream": True}
    async with proxy.http() as http, http.post("/v1/responses", json=body) as response:
        events = await read_sse(response)
    assert assert_response_events(events, final="response.incomplete") == "Say hello"


async def test_embeddings(proxy: ProxyUnderTest) -> None:
    await check_embeddings(proxy, "echo", dims=16)


async def test_client_leaving_ends_the_stream(proxy: ProxyUnderTest) -> None:
    # No upstream here: the proxy's own in-flight count must drop once the client leaves.
    words = [{"role": "user", "content": "word " * 200}]  # four seconds of stream
    await check_cancellation(proxy, "slow-echo", messages=words)
