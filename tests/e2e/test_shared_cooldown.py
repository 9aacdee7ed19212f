"""Deployment cooldowns shared through a real Redis ([state] redis_url): an instance that
subscribes after a cooldown was announced (starting, or back after losing Redis) still skips
the cooling deployment, from its first request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from aioproxy.keys import runtime_key
from aioproxy.state.shared import changes_key, link_key
from aioproxy.testing import FakeOpenAI
from tests.redis_server import redis_server, redis_url
from tests.support import MASTER_KEY, ServeProxy, sdk, upstream_model

__all__ = ["redis_server", "redis_url"]  # the fixtures, used here

CHAT: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


class CuttableRelay:
    """A TCP relay to Redis that a test can cut (its connections closed, new ones refused)
    and restore: one instance losing Redis while the others keep it."""

    def __init__(self, target_url: str) -> None:
        self.target_url = target_url
        self.target_port = int(target_url.rsplit(":", 1)[1].split("/")[0])
        self.open = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """The Redis URL through the relay."""
        return self.target_url.replace(f":{self.target_port}/", f":{self.port}/")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        to_reader, to_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, to_writer}
        await asyncio.gather(_pipe(reader, to_writer), _pipe(to_reader, writer))

    def cut(self) -> None:
        self.open = False
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture
async def relay(redis_url: str) -> AsyncIterator[CuttableRelay]:
    relay = CuttableRelay(redis_url)
    await relay.start()
    yield relay
    await relay.close()


class Upstreams:
    """``gpt-test`` on two fake upstreams; weights 1 and 0: the preferred one always, unless
    it cools down."""

    def __init__(self) -> None:
        self.preferred, self.other = FakeOpenAI(), FakeOpenAI()
        self.bases: list[str] = []

    def config(self, redis: str) -> dict[str, Any]:
        preferred, other = self.bases
        return {
            "auth": {"master_key": MASTER_KEY},
            "models": [
                upstream_model("gpt-test", preferred, weight=1.0),
                upstream_model("gpt-test", other, weight=0.0),
            ],
            "router": {"num_retries": 0, "cooldown_failures": 1, "cooldown_seconds": 600},
            "state": {"redis_url": redis, "timeout": 10.0},  # a loaded machine's lag is no loss
        }

    async def skipped_by(self, proxy: TestServer) -> None:
        """``proxy``'s next request goes to the other upstream (the preferred had the one
        failure that cooled it down)."""
        assert await chat(proxy) == 200
        assert (len(self.preferred.requests), len(self.other.requests)) == (1, 1)


@pytest.fixture
async def upstreams(aiohttp_server: Any) -> Upstreams:
    upstreams = Upstreams()
    for fake in (upstreams.preferred, upstreams.other):
        upstreams.bases.append(str((await aiohttp_server(fake.app())).make_url("/v1")))
    return upstreams


async def chat(proxy: TestServer) -> int:
    """The status of one chat request through ``proxy``, sent by the openai SDK."""
    async with sdk(proxy) as client:
        try:
            await client.chat.completions.create(**CHAT)
        except openai.APIStatusError as exc:
            return exc.status_code
    return 200


async def cool_the_preferred(proxy: TestServer, preferred: FakeOpenAI, redis: str) -> None:
    """One failure through ``proxy`` cools the preferred deployment down; wait until its
    announcement is out (sent after the answer, off its path)."""
    client = aioredis.Redis.from_url(redis)
    try:
        async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe("aioproxy:changes")
            preferred.faults = ["status:500"]
            assert await chat(proxy) == 500
            async with asyncio.timeout(30):  # safety net: published in the next batch
                while await pubsub.get_message(timeout=1.0) is None:
                    pass
    finally:
        await client.aclose()


async def test_an_instance_started_later_skips_a_cooling_deployment(
    serve_proxy: ServeProxy, redis_url: str, upstreams: Upstreams
) -> None:
    first = await serve_proxy(upstreams.config(redis_url))
    await cool_the_preferred(first, upstreams.preferred, redis_url)
    second = await serve_proxy(upstreams.config(redis_url))  # after the cooldown was announced
    await upstreams.skipped_by(second)


async def test_an_instance_back_from_losing_redis_skips_a_cooling_deployment(
    serve_proxy: ServeProxy, redis_url: str, relay: CuttableRelay, upstreams: Upstreams
) -> None:
    first = await serve_proxy(upstreams.config(redis_url))
    second = await serve_proxy(upstreams.config(relay.url))
    listening = second.app[changes_key].listening
    relay.cut()
    async with asyncio.timeout(30):  # safety net: its subscription ends at once
        while listening.is_set():
            await asyncio.sleep(0.01)
    await cool_the_preferred(first, upstreams.preferred, redis_url)  # the second misses it
    relay.open = True
    async with asyncio.timeout(30):  # safety net: it subscribes again within a second
        await listening.wait()
    await upstreams.skipped_by(second)


async def test_a_cooldown_announced_while_redis_was_away_reaches_the_others(
    serve_proxy: ServeProxy, redis_url: str, relay: CuttableRelay, upstreams: Upstreams
) -> None:
    """The instance that cooled a deployment down while cut from Redis announces it once
    Redis is back: the others skip it too (it was never sent, and they sent it traffic)."""
    first = await serve_proxy(upstreams.config(relay.url))
    second = await serve_proxy(upstreams.config(redis_url))
    relay.cut()
    upstreams.preferred.faults = ["status:500"]
    assert await chat(first) == 500  # it cools down there, unheard
    link = first.app[link_key]
    async with asyncio.timeout(30):  # safety net: the announcement fails at once
        while link.up:
            await asyncio.sleep(0.01)
    relay.open = True
    runtime = second.app[runtime_key]
    async with asyncio.timeout(30):  # safety net: announced again once the link is back
        while not runtime.router.snapshot(runtime.deployments)[0]["cooldown_remaining"]:
            await asyncio.sleep(0.01)
    await upstreams.skipped_by(second)
