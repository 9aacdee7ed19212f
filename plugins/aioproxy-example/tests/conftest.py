"""A fake toy API, and the proxy in front of it with the example provider."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aioproxy_example
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aioproxy.testing import ProxyUnderTest, start_proxy

TOY_KEY = "toy-secret"


class FakeToy:
    """The toy API: answers "toy says: <prompt>", counts requests in flight, fails on demand."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.faults: list[int | str] = []  # a status to answer the next request with, or "cut"
        self.delay = 0.0  # seconds before each streamed word
        self.fault_words = "injected {}"  # what a fault says ({} is its status)
        self.trickle = False  # stream: a byte at a time, never a whole line

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/embed", self.embed)
        return app

    def _refusal(self, request: web.Request, fault: int | str | None) -> web.Response | None:
        if request.headers.get("X-Toy-Key") != TOY_KEY:
            return web.json_response({"fault": "unknown key"}, status=401)
        if isinstance(fault, int):
            headers = {"Retry-After": "7"} if fault == 429 else None
            said = self.fault_words.format(fault)
            return web.json_response({"fault": said}, status=fault, headers=headers)
        return None

    async def embed(self, request: web.Request) -> web.Response:
        """A vector of three floats per text: its length, its words, 0.5."""
        body = await request.json()
        self.requests.append(body)
        refusal = self._refusal(request, self.faults.pop(0) if self.faults else None)
        if refusal is not None:
            return refusal
        texts = body["texts"]
        vectors = [[float(len(text)), float(len(text.split())), 0.5] for text in texts]
        words = sum(len(text.split()) for text in texts)
        return web.json_response({"vectors": vectors, "input_words": words})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            body = await request.json()
            self.requests.append(body)
            fault = self.faults.pop(0) if self.faults else None
            refusal = self._refusal(request, fault)
            if refusal is not None:
                return refusal
            words = ("toy says: " + body["prompt"]).split()
            answer = words[: body["max_words"]]
            counts = {
                "input_words": len(body["prompt"].split()),
                "output_words": len(answer),
                "truncated": len(answer) < len(words),
            }
            if not body["stream"]:
                return web.json_response({"text": " ".join(answer), **counts})
            return await self._stream(request, answer, counts, cut=fault == "cut")
        finally:
            self.in_flight -= 1

    async def _stream(
        self, request: web.Request, words: list[str], counts: dict[str, Any], cut: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            while self.trickle:  # bytes keep coming, no line ever ends
                await response.write(b" ")
                await asyncio.sleep(0.01)
            for i, word in enumerate(words):
                if cut and i == 2:
                    assert request.transport is not None
                    request.transport.close()  # hang up mid-answer
                    return response
                await asyncio.sleep(self.delay)
                token = word if i == 0 else " " + word
                await response.write(msgspec.json.encode({"token": token}) + b"\n")
            await response.write(msgspec.json.encode({"end": True, **counts}) + b"\n")
            await response.write_eof()
        except ConnectionResetError:  # the proxy went away: so do we
            pass
        return response


def toy_config(api_base: str, **settings: Any) -> dict[str, Any]:
    model = {"name": "toy", "provider": "example", "model": "toy-1", "api_base": api_base}
    timeouts = settings.pop("timeouts", None)
    entry = {**model, "api_key": TOY_KEY, "settings": settings}
    if timeouts is not None:
        entry["timeouts"] = timeouts
    return {"models": [entry]}


@pytest.fixture
def toy() -> FakeToy:
    return FakeToy()


@pytest.fixture
async def toy_base(aiohttp_server: Any, toy: FakeToy) -> str:
    server: TestServer = await aiohttp_server(toy.app())
    return str(server.make_url("/"))


StartToyProxy = Callable[..., Awaitable[ProxyUnderTest]]


@pytest.fixture
def start_toy_proxy(aiohttp_server: Any, toy_base: str) -> StartToyProxy:
    """``await start_toy_proxy(**settings)``: a proxy serving model ``toy`` from the fake."""

    async def start(**settings: Any) -> ProxyUnderTest:
        config = toy_config(toy_base, **settings)
        return await start_proxy(aiohttp_server, config, [aioproxy_example])

    return start


@pytest.fixture
async def proxy(start_toy_proxy: StartToyProxy) -> ProxyUnderTest:
    return await start_toy_proxy()
