"""Deployment cooldowns shared through a real Redis ([state] redis_url): an instance that
subscribes after a cooldown was announced (starting, or back after losing Redis) still skips
the cooling deployment, from its first request."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import openai
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from aioproxy.state.shared import changes_key
from aioproxy.testing import FakeOpenAI
from tests.redis_server import redis_server, redis_url
from tests.support import MASTER_KEY, ServeProxy, sdk, upstream_model

__all__ = ["redis_server", "redis_url"]  # the fixtures, used here

CHAT: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


class CuttableRelay:
    """A TCP relay to Redis that a test can cut (its connections closed, new ones refused)
    and restore: one instance losing Redis while the others keep it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

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


async def serve_upstreams(aiohttp_server: Any, *fakes: FakeOpenAI) -> list[str]:
    return [str((await aiohttp_server(fake.app())).make_url("/v1")) for fake in fakes]


def shared_config(bases: list[str], redis: str) -> dict[str, Any]:
    """``gpt-test`` on two upstreams; weights 1 and 0: the first always, unless it cools down."""
    preferred, other = bases
    return {
        "auth": {"master_key": MASTER_KEY},
        "models": [
            upstream_model("gpt-test", preferred, weight=1.0),
            upstream_model("gpt-test", other, weight=0.0),
        ],
        "router": {"num_retries": 0, "cooldown_failures": 1, "cooldown_seconds": 600},
        "state": {"redis_url": redis, "timeout": 10.0},  # a loaded machine's lag is no loss
    }


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
    aiohttp_server: Any, serve_proxy: ServeProxy, redis_url: str
) -> None:
    preferred, other = FakeOpenAI(), FakeOpenAI()
    bases = await serve_upstreams(aiohttp_server, preferred, other)
    config = shared_config(bases, redis_url)
    first = await serve_proxy(config)
    await cool_the_preferred(first, preferred, redis_url)
    second = await serve_proxy(config)  # started after the cooldown was announced
    assert await chat(second) == 200
    assert (len(preferred.requests), len(other.requests)) == (1, 1)


async def test_an_instance_back_from_losing_redis_skips_a_cooling_deployment(
    aiohttp_server: Any, serve_proxy: ServeProxy, redis_url: str
) -> None:
    preferred, other = FakeOpenAI(), FakeOpenAI()
    bases = await serve_upstreams(aiohttp_server, preferred, other)
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    relay = CuttableRelay(port)
    await relay.start()
    try:
        first = await serve_proxy(shared_config(bases, redis_url))
        relayed = redis_url.replace(f":{port}/", f":{relay.port}/")
        second = await serve_proxy(shared_config(bases, relayed))
        listening = second.app[changes_key].listening
        relay.cut()
        async with asyncio.timeout(30):  # safety net: its subscription ends at once
            while listening.is_set():
                await asyncio.sleep(0.01)
        await cool_the_preferred(first, preferred, redis_url)  # published: the second misses it
        relay.open = True
        async with asyncio.timeout(30):  # safety net: it subscribes again within a second
            await listening.wait()
        assert await chat(second) == 200
        assert (len(preferred.requests), len(other.requests)) == (1, 1)
    finally:
        await relay.close()
