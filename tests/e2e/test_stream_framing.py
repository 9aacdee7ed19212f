"""How a stream goes out: a whole stream that came in one read as one body with a length, a
stream still coming as chunks, each relayed as it arrives; the SDK reads both the same."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support import AUTH, ServeProxy, gateway_config, sdk

EVENTS = [
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":'
    b'[{"index":0,"delta":{"role":"assistant","content":"'
    + word
    + b'"},"finish_reason":null}]}\n\n'
    for word in (b"Hel", b"lo", b"!")
] + [b"data: [DONE]\n\n"]
REQUEST = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def _upstream(aiohttp_server: Any, gap: float) -> str:
    """An upstream sending EVENTS at once (gap 0: one body with a length) or gap seconds apart."""

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        if not gap:
            return web.Response(body=b"".join(EVENTS), content_type="text/event-stream")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in EVENTS:
            await response.write(event)
            await asyncio.sleep(gap)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return str((await aiohttp_server(app)).make_url("/v1"))


@asynccontextmanager
async def _streamed(
    aiohttp_server: Any, serve_proxy: ServeProxy, gap: float
) -> AsyncIterator[tuple[TestServer, aiohttp.ClientResponse]]:
    """A proxy in front of :func:`_upstream`, and its response to REQUEST."""
    proxy = await serve_proxy(gateway_config(await _upstream(aiohttp_server, gap)))
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.make_url("/v1/chat/completions"), json=REQUEST, headers=AUTH) as response,
    ):
        yield proxy, response


async def test_a_whole_stream_goes_out_with_a_length(
    aiohttp_server: Any, serve_proxy: ServeProxy
) -> None:
    async with _streamed(aiohttp_server, serve_proxy, gap=0) as (proxy, response):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Content-Length"] == str(len(b"".join(EVENTS)))
        assert "Transfer-Encoding" not in response.headers
        assert await response.read() == b"".join(EVENTS)
    async with sdk(proxy) as client:
        stream = await client.chat.completions.create(**REQUEST)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "Hello!"


async def test_a_stream_still_coming_goes_out_event_by_event(
    aiohttp_server: Any, serve_proxy: ServeProxy
) -> None:
    async with _streamed(aiohttp_server, serve_proxy, gap=0.05) as (_, response):
        assert response.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in response.headers
        received = [chunk async for chunk in response.content.iter_any()]
    assert b"".join(received) == b"".join(EVENTS)
    assert len(received) == len(EVENTS)  # 50 ms apart upstream: never two in one piece


MESSAGES_REQUEST = {
    "model": "gpt-test",
    "max_tokens": 20,
    "stream": True,
    "messages": REQUEST["messages"],
}


async def test_a_whole_stream_translated_to_anthropic_events_goes_out_with_a_length(
    aiohttp_server: Any, serve_proxy: ServeProxy
) -> None:
    """A Messages stream onto a chat model: a chat stream that came in one read goes out as
    one body too, its closing events with the rest; one still coming goes out as chunks."""
    for gap, whole in ((0, True), (0.05, False)):
        proxy = await serve_proxy(gateway_config(await _upstream(aiohttp_server, gap)))
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                proxy.make_url("/v1/messages"), json=MESSAGES_REQUEST, headers=AUTH
            ) as response,
        ):
            assert response.status == 200
            body = await response.read()
            assert ("Content-Length" in response.headers) is whole
            assert (response.headers.get("Transfer-Encoding") == "chunked") is not whole
        names = [line[7:] for line in body.decode().splitlines() if line.startswith("event: ")]
        assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
        assert names.count("content_block_delta") == 3
        if whole:
            assert response.headers["Content-Length"] == str(len(body))
