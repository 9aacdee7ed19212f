"""The response cache ([cache]), end to end: a real fake upstream whose requests are counted,
the proxy in front, answers compared byte for byte."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp.test_utils import TestServer

from aioproxy.cache.redis_store import _KEEP
from aioproxy.cache.response_cache import store_key
from aioproxy.state.shared import link_key
from aioproxy.testing import FakeOpenAI
from tests.redis_server import redis_server, redis_url
from tests.support import MASTER_KEY, ServeProxy, gateway_config, sdk

__all__ = ["redis_server", "redis_url"]  # the fixtures, used here

KEY_A, KEY_B = "sk-tenant-a-0123456789", "sk-tenant-b-0123456789"
CHAT = {
    "model": "gpt-test",
    "messages": [{"role": "user", "content": "cache me"}],
    "temperature": 0,
}


def cache_config(
    upstream_base: str, tmp_path: Path, state: dict[str, Any] | None = None, **cache: Any
) -> dict[str, Any]:
    return gateway_config(
        upstream_base,
        auth={
            "master_key": MASTER_KEY,
            "keys": [{"key": KEY_A, "name": "a"}, {"key": KEY_B, "name": "b"}],
        },
        database={"url": f"sqlite:///{tmp_path / 'db.sqlite3'}"},
        cache={"enabled": True, **cache},
        **({"state": state} if state else {}),
    )


async def post(
    proxy: TestServer,
    body: dict[str, Any],
    key: str = KEY_A,
    path: str = "/v1/chat/completions",
    **headers: str,
) -> tuple[int, str | None, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.make_url(path), json=body, headers={"Authorization": f"Bearer {key}", **headers}
        ) as response,
    ):
        return response.status, response.headers.get("x-aioproxy-cache"), await response.read()


def upstream_calls(fake: FakeOpenAI) -> int:
    return len(fake.requests)


@pytest.fixture
async def cached(serve_proxy: ServeProxy, upstream_base: str, tmp_path: Path) -> TestServer:
    return await serve_proxy(cache_config(upstream_base, tmp_path))


async def test_a_hit_never_reaches_the_upstream(cached: TestServer, fake: FakeOpenAI) -> None:
    first = await post(cached, CHAT)
    second = await post(cached, {**CHAT, "user": "someone", "metadata": {"x": "y"}})
    assert first[:2] == (200, "miss") and second[:2] == (200, "hit")
    assert second[2] == first[2]
    assert upstream_calls(fake) == 1


async def test_field_order_does_not_count(cached: TestServer, fake: FakeOpenAI) -> None:
    await post(cached, CHAT)
    reordered = {"temperature": 0, "messages": CHAT["messages"], "model": "gpt-test"}
    assert (await post(cached, reordered))[1] == "hit"
    assert (await post(cached, {**CHAT, "max_tokens": 5}))[1] == "miss"
    assert upstream_calls(fake) == 2


async def test_stream_replays_byte_for_byte(cached: TestServer, fake: FakeOpenAI) -> None:
    streamed = {**CHAT, "stream": True}
    status, result, original = await post(cached, streamed)
    assert (status, result) == (200, "miss") and original.endswith(b"data: [DONE]\n\n")
    status, result, replayed = await post(cached, streamed)
    assert (status, result) == (200, "hit") and replayed == original
    assert upstream_calls(fake) == 1


async def test_stream_fills_a_json_answer(cached: TestServer, fake: FakeOpenAI) -> None:
    await post(cached, {**CHAT, "stream": True})
    status, result, body = await post(cached, CHAT)
    assert (status, result) == (200, "hit")
    answer = json.loads(body)
    direct = json.loads((await post(cached, CHAT, **{"Cache-Control": "no-cache"}))[2])
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert answer["choices"][0]["finish_reason"] == direct["choices"][0]["finish_reason"]


async def test_json_fills_a_stream(cached: TestServer, fake: FakeOpenAI) -> None:
    _, _, body = await post(cached, CHAT)
    status, result, events = await post(cached, {**CHAT, "stream": True})
    assert (status, result) == (200, "hit") and events.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(line[6:]) for line in events.split(b"\n\n") if line.startswith(b"data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == json.loads(body)["choices"][0]["message"]["content"]
    assert upstream_calls(fake) == 1


async def test_scope_isolates_keys(cached: TestServer, fake: FakeOpenAI) -> None:
    await post(cached, CHAT, key=KEY_A)
    assert (await post(cached, CHAT, key=KEY_B))[1] == "miss"
    assert (await post(cached, CHAT, key=KEY_A))[1] == "hit"
    assert upstream_calls(fake) == 2


async def test_global_scope_shares(
    serve_proxy: ServeProxy, upstream_base: str, tmp_path: Path, fake: FakeOpenAI
) -> None:
    proxy = await serve_proxy(cache_config(upstream_base, tmp_path, scope="global"))
    await post(proxy, CHAT, key=KEY_A)
    assert (await post(proxy, CHAT, key=KEY_B))[1] == "hit"
    assert upstream_calls(fake) == 1


async def test_no_cache_and_no_store(cached: TestServer, fake: FakeOpenAI) -> None:
    assert (await post(cached, CHAT, **{"Cache-Control": "no-store"}))[1] == "miss"
    assert (await post(cached, CHAT))[1] == "miss"  # nothing was stored
    assert (await post(cached, CHAT, **{"Cache-Control": "no-cache"}))[1] == "miss"
    assert (await post(cached, CHAT))[1] == "hit"
    assert upstream_calls(fake) == 3


async def test_sampled_requests_are_not_cached_by_default(
    cached: TestServer, fake: FakeOpenAI
) -> None:
    sampled = {k: v for k, v in CHAT.items() if k != "temperature"}  # OpenAI's default: 1
    await post(cached, sampled)
    assert (await post(cached, sampled))[1] is None
    assert (await post(cached, {**CHAT, "temperature": 0.7}))[1] is None
    assert upstream_calls(fake) == 3


async def test_ttl_expiry(cached: TestServer, fake: FakeOpenAI) -> None:
    store = cached.app[store_key]
    now = [1000.0]
    store.now = lambda: now[0]
    await post(cached, CHAT)
    now[0] += 3599
    assert (await post(cached, CHAT))[1] == "hit"
    now[0] += 2
    assert (await post(cached, CHAT))[1] == "miss"
    assert upstream_calls(fake) == 2


async def test_eviction_under_the_byte_bound(
    serve_proxy: ServeProxy, upstream_base: str, tmp_path: Path, fake: FakeOpenAI
) -> None:
    proxy = await serve_proxy(cache_config(upstream_base, tmp_path, max_bytes=1500))
    sizes = []
    for word in ("one", "two", "three"):
        body = {**CHAT, "messages": [{"role": "user", "content": word}]}
        sizes.append(len((await post(proxy, body))[2]))
    assert sum(sizes) > 1500 >= sizes[1] + sizes[2]  # the bound holds the last two, not three
    store = proxy.app[store_key]
    assert store.bytes <= 1500 and len(store.entries) == 2
    first = {**CHAT, "messages": [{"role": "user", "content": "one"}]}
    assert (await post(proxy, first))[1] == "miss"  # the least recently used went


async def test_embeddings_and_stored_responses(cached: TestServer, fake: FakeOpenAI) -> None:
    embed = {"model": "gpt-test", "input": "hello"}
    await post(cached, embed, path="/v1/embeddings")
    assert (await post(cached, embed, path="/v1/embeddings"))[1] == "hit"
    stored = {"model": "gpt-test", "input": "hi", "temperature": 0}
    await post(cached, stored, path="/v1/responses")
    assert (await post(cached, stored, path="/v1/responses"))[1] is None  # store defaults true
    unstored = {**stored, "store": False}
    await post(cached, unstored, path="/v1/responses")
    assert (await post(cached, unstored, path="/v1/responses"))[1] == "hit"


async def test_redis_cache_is_shared_by_instances(
    serve_proxy: ServeProxy, upstream_base: str, tmp_path: Path, fake: FakeOpenAI, redis_url: str
) -> None:
    config = cache_config(upstream_base, tmp_path, state={"redis_url": redis_url})
    first, second = await serve_proxy(config), await serve_proxy(config)
    original = await post(first, {**CHAT, "stream": True})
    client = redis.asyncio.Redis.from_url(redis_url)
    async with asyncio.timeout(30):  # safety net: it is written after the answer, off its path
        while not await client.keys("aioproxy:cache:*"):
            await asyncio.sleep(0.01)
    await client.aclose()
    replayed = await post(second, {**CHAT, "stream": True})
    assert replayed[1] == "hit" and replayed[2] == original[2]
    assert upstream_calls(fake) == 1


async def kept(proxy: TestServer, body: dict[str, Any]) -> bytes:
    """``body``'s answer, once it is in the cache (written after the answer, off its path)."""
    status, result, answer = await post(proxy, body)
    assert (status, result) == (200, "miss")
    async with asyncio.timeout(30):  # safety net: the write goes in the next batch
        while (await post(proxy, body))[1] != "hit":
            await asyncio.sleep(0.01)
    return answer


@pytest.mark.parametrize("bound", [{"max_entries": 2}, {"max_bytes": 1500}], ids=["count", "bytes"])
async def test_redis_cache_is_bounded(
    serve_proxy: ServeProxy,
    upstream_base: str,
    tmp_path: Path,
    fake: FakeOpenAI,
    redis_url: str,
    bound: dict[str, int],
) -> None:
    """In Redis too (across instances), the oldest entries go beyond the bounds: it grew
    without one until each entry's TTL, until Redis ran out of memory."""
    config = cache_config(upstream_base, tmp_path, state={"redis_url": redis_url}, **bound)
    proxy = await serve_proxy(config)
    bodies = [{**CHAT, "messages": [{"role": "user", "content": w}]} for w in ("a", "b", "c")]
    sizes = [len(await kept(proxy, body)) for body in bodies]
    assert sum(sizes) > 1500 >= sizes[1] + sizes[2] + 64  # answers and their encoding
    assert [(await post(proxy, body))[1] for body in bodies[1:]] == ["hit", "hit"]
    assert (await post(proxy, bodies[0]))[1] == "miss"  # the oldest went
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert len(await client.keys("aioproxy:cache:*")) == 2
    finally:
        await client.aclose()


# Per accounting key of the Redis cache: how to give it another type.
WRONG_TYPES = {
    "aioproxy:cache-index": lambda client, key: client.set(key, "x"),
    "aioproxy:cache-sizes": lambda client, key: client.set(key, "x"),
    "aioproxy:cache-bytes": lambda client, key: client.hset(key, "x", "1"),
}


async def keyspace(client: redis.asyncio.Redis) -> dict[bytes, tuple[bytes, Any]]:
    """Every key: its type and its value's dump (what it holds, whatever the type)."""
    return {
        key: (await client.type(key), await client.dump(key))
        for key in sorted(await client.keys("aioproxy:cache*"))
    }


@pytest.mark.parametrize("broken", WRONG_TYPES)
async def test_a_wrong_typed_accounting_key_writes_nothing(
    serve_proxy: ServeProxy,
    upstream_base: str,
    tmp_path: Path,
    fake: FakeOpenAI,
    redis_url: str,
    broken: str,
) -> None:
    """The cache's write script reads its accounting keys before its first write: one of
    another type fails it there, with nothing written (no entry without its accounting); the
    cache misses, the answers are served, and Redis is not given up (the limits keep it)."""
    proxy = await serve_proxy(cache_config(upstream_base, tmp_path, state={"redis_url": redis_url}))
    link = proxy.app[link_key]
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await WRONG_TYPES[broken](client, broken)
        before = await keyspace(client)
        for expected_refusals in (1, 2):
            status, result, _ = await post(proxy, CHAT)
            assert (status, result) == (200, "miss")
            async with asyncio.timeout(30):  # safety net: it is written after the answer
                while link.unusable < expected_refusals:
                    await asyncio.sleep(0.01)
            assert await keyspace(client) == before
        assert upstream_calls(fake) == 2 and link.up and link.failures == 0
    finally:
        await client.aclose()


async def test_a_size_that_is_not_a_number_counts_as_none(redis_url: str) -> None:
    """An entry's size in the accounting hash that is not a number (written by hand) does not
    fail the eviction midway (an entry dropped from the index, still stored): it counts as 0,
    and the total is set from what the script counted."""
    client = redis.asyncio.Redis.from_url(redis_url)
    prefix, index, sizes, total = "t:cache:", "t:cache-index", "t:cache-sizes", "t:cache-bytes"
    try:
        await client.zadd(index, {"old": 1})
        await client.hset(sizes, "old", "many")
        await client.set(prefix + "old", "x")
        await client.set(total, "junk")
        words = [prefix, index, sizes, total, "new", "v" * 10, 60_000, 1, 1000]
        await client.eval(_KEEP, 0, *words)
        assert await client.zrange(index, 0, -1) == [b"new"]
        assert await client.exists(prefix + "old") == 0 and await client.hkeys(sizes) == [b"new"]
        assert await client.get(total) == b"10"
    finally:
        await client.aclose()


ASKS_USAGE = {"stream": True, "stream_options": {"include_usage": True}}


def usage_chunks(events: bytes) -> list[dict[str, Any]]:
    """The stream's usage-only chunks (``"choices": []``)."""
    chunks = [json.loads(e[6:]) for e in events.split(b"\n\n") if e.startswith(b"data: {")]
    return [chunk for chunk in chunks if chunk.get("usage") and not chunk["choices"]]


async def test_the_usage_chunk_goes_to_the_requests_asking_for_it(
    cached: TestServer, fake: FakeOpenAI
) -> None:
    """``stream_options`` is not part of the key: whichever request filled the entry, a stream
    that asks for the usage gets its chunk, and one that does not gets none (a chunk without
    choices breaks a client reading ``chunk.choices[0]``; one asking missed its usage)."""
    _, _, asked = await post(cached, {**CHAT, **ASKS_USAGE})
    assert len(usage_chunks(asked)) == 1
    status, result, plain = await post(cached, {**CHAT, "stream": True})
    assert (status, result) == (200, "hit") and usage_chunks(plain) == []
    assert (await post(cached, {**CHAT, **ASKS_USAGE}))[2] == asked  # byte for byte

    other = {**CHAT, "messages": [{"role": "user", "content": "filled without usage"}]}
    _, _, plain = await post(cached, {**other, "stream": True})
    assert usage_chunks(plain) == []
    status, result, asked = await post(cached, {**other, **ASKS_USAGE})
    assert (status, result) == (200, "hit") and len(usage_chunks(asked)) == 1
    assert json.loads((await post(cached, other))[2])["usage"] == usage_chunks(asked)[0]["usage"]

    third = {**CHAT, "messages": [{"role": "user", "content": "filled as JSON"}]}
    answer = json.loads((await post(cached, third))[2])
    assert usage_chunks((await post(cached, {**third, "stream": True}))[2]) == []
    asked = (await post(cached, {**third, **ASKS_USAGE}))[2]
    assert usage_chunks(asked)[0]["usage"] == answer["usage"]
    assert upstream_calls(fake) == 3


async def test_hits_do_not_use_the_deployments_rpm(
    serve_proxy: ServeProxy, upstream_base: str, tmp_path: Path, fake: FakeOpenAI
) -> None:
    """A hit never reaches the upstream, so it does not count toward the deployment's rpm cap
    (the upstream's own limit): hits used it up, then the next real request got 429."""
    config = cache_config(upstream_base, tmp_path)
    config["models"][0] = {**config["models"][0], "rpm": 2}
    proxy = await serve_proxy(config)
    assert [(await post(proxy, CHAT))[:2] for _ in range(4)] == [(200, "miss")] + [(200, "hit")] * 3
    other = {**CHAT, "messages": [{"role": "user", "content": "not cached yet"}]}
    assert (await post(proxy, other))[:2] == (200, "miss")  # the cap's second request
    assert upstream_calls(fake) == 2


async def test_a_json_response_replays_as_the_events_of_a_stream(
    cached: TestServer, fake: FakeOpenAI
) -> None:
    """A Responses answer kept as JSON, asked for as a stream: the events a stream of it has
    (created ... text deltas ... completed), which the SDK's stream helper needs (it failed on
    a stream that began with ``response.completed``)."""
    request: dict[str, Any] = {"model": "gpt-test", "input": "hi", "temperature": 0, "store": False}
    async with sdk(cached, KEY_A) as client:
        answer = await client.responses.create(**request)
        async with client.responses.stream(**request) as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
    text = "".join(deltas)
    assert text == answer.output_text != ""
    assert final.id == answer.id and final.output_text == answer.output_text
    assert upstream_calls(fake) == 1  # the stream was the cached answer
