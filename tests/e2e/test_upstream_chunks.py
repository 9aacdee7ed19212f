"""``Upstream.chunks``: a raw body chunk by chunk, under the gateway's buffer budget."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from aioproxy import BadGateway, Call, Deployment, Upstream
from aioproxy.budget import BufferBudget, BufferFull
from aioproxy.config import parse_config
from aioproxy.context import ANONYMOUS
from aioproxy.routes import Kind
from aioproxy.transport import SessionTransport

PIECE = 1000  # bytes the upstream writes at a time


async def _upstream(
    aiohttp_server: Any, pieces: int, cut: bool = False
) -> tuple[str, asyncio.Queue[None]]:
    """A server writing ``pieces`` pieces of PIECE bytes, each once the client took the last
    (it waits for the proxy's ack); ``cut``: it drops the connection after the first."""
    acks: asyncio.Queue[None] = asyncio.Queue()

    async def body(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(pieces):
            await response.write(bytes([65 + i]) * PIECE)
            if cut:
                assert request.transport is not None
                request.transport.close()
                return response
            await acks.get()
        return response

    app = web.Application()
    app.router.add_post("/body", body)
    server = await aiohttp_server(app)
    return str(server.make_url("/body")), acks


class _Decoder:
    """Stands for a provider's decoder: the bytes it keeps of an unfinished message."""

    def __init__(self) -> None:
        self.pending = 0

    def held(self) -> int:
        return self.pending


def _call() -> Call:
    call = Call(Kind.CHAT_COMPLETIONS, make_mocked_request("POST", "/"), ANONYMOUS, "m", {}, True)
    call.route_to(Deployment(name="m", provider="p", model="m"))
    return call


async def test_chunks_count_what_is_held_and_give_it_all_back(aiohttp_server: Any) -> None:
    url, acks = await _upstream(aiohttp_server, pieces=3)
    budget = BufferBudget(10 * PIECE)
    decoder = _Decoder()  # it keeps half of each piece, here
    seen: list[tuple[int, int]] = []
    call = _call()
    async with aiohttp.ClientSession() as session:
        upstream = Upstream(SessionTransport(session), parse_config({}), session, budget=budget)
        response = await upstream.post(call, url, b"{}", {})
        with upstream.guard(response, call):
            async for chunk in upstream.chunks(response, call, held=decoder.held):
                seen.append((len(chunk), budget.used))  # the chunk and what was held before
                decoder.pending += len(chunk) // 2
                acks.put_nowait(None)
        response.release()
    total = sum(size for size, _ in seen)
    assert total == 3 * PIECE
    held_before = 0
    for size, used in seen:
        assert used == size + held_before  # the chunk and the unfinished bytes, counted
        held_before += size // 2
    assert budget.used == 0  # all given back at the end


async def test_chunks_past_the_budget_are_the_clients_503(aiohttp_server: Any) -> None:
    url, acks = await _upstream(aiohttp_server, pieces=3)
    budget = BufferBudget(PIECE + PIECE // 2)  # a piece fits, two do not
    call = _call()
    async with aiohttp.ClientSession() as session:
        upstream = Upstream(SessionTransport(session), parse_config({}), session, budget=budget)
        response = await upstream.post(call, url, b"{}", {})
        decoder = _Decoder()  # one that never completes a message
        with pytest.raises(BufferFull), upstream.guard(response, call):
            async for chunk in upstream.chunks(response, call, held=decoder.held):
                decoder.pending += len(chunk)
                acks.put_nowait(None)
    assert decoder.pending == PIECE
    assert budget.used == 0


async def test_a_cut_body_is_the_clients_502(aiohttp_server: Any) -> None:
    url, _acks = await _upstream(aiohttp_server, pieces=2, cut=True)
    budget = BufferBudget(0)
    call = _call()
    async with aiohttp.ClientSession() as session:
        upstream = Upstream(SessionTransport(session), parse_config({}), session, budget=budget)
        response = await upstream.post(call, url, b"{}", {})
        with pytest.raises(BadGateway) as caught, upstream.guard(response, call):
            async for _chunk in upstream.chunks(response, call):
                pass
    assert caught.value.code == "upstream_disconnected"
