"""The Redis batcher on a real Redis: calls issued while a batch is on its way share the next
round trip, and a settle is queued, not waited for."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from aioproxy.config import Secret, StateConfig
from aioproxy.control.clock import ControlClock
from aioproxy.control.meters import KeyLimits, Meter
from aioproxy.control.records import KeyEntry
from aioproxy.errors import RateLimited
from aioproxy.state.batch import Batcher, LuaScript
from aioproxy.state.counters import SharedCounters
from aioproxy.state.link import RedisLink
from tests.redis_server import redis_server, redis_url

__all__ = ["redis_server", "redis_url"]  # the fixtures, used here

ECHO = LuaScript("return ARGV[1]")


async def test_calls_queued_during_a_round_trip_share_the_next(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(client, timeout=5.0)
    try:
        await client.script_load(ECHO.text)
        first = batcher.run(ECHO, [], ["first"])
        await asyncio.sleep(0)  # the first batch is written and waits for its reply
        rest = [batcher.run(ECHO, [], [str(i)]) for i in range(20)]
        rest.append(batcher.command("SET", "aioproxy-test:batch", "1"))
        answers = await asyncio.gather(first, *rest)
        assert answers[0] == b"first" and answers[1:21] == [str(i).encode() for i in range(20)]
        assert batcher.batches == 2  # the first alone, then the 21 together
    finally:
        await batcher.close()
        await client.aclose()


async def test_an_error_reply_fails_only_its_call(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(client, timeout=5.0)
    try:
        ok, failed, after = (
            batcher.command("SET", "aioproxy-test:x", "1"),
            batcher.command("INCR", "aioproxy-test:x", "not-a-count"),
            batcher.command("GET", "aioproxy-test:x"),
        )
        results = await asyncio.gather(ok, failed, after, return_exceptions=True)
        assert results[0] == b"OK" and isinstance(results[1], Exception) and results[2] == b"1"
    finally:
        await batcher.close()
        await client.aclose()


def _limits(max_parallel: int) -> KeyLimits:
    key = KeyEntry(
        id="key_batch", name="batch", digest="d", key_prefix="sk-", created_at=0.0,
        max_parallel=max_parallel,
    )  # fmt: skip
    return KeyLimits(key, Meter(), None, None)


class _Call:
    """What ``reserve`` reads of a call: its request (for the headers) and its state."""

    def __init__(self) -> None:
        self.request: dict[Any, Any] = {}
        self.state: dict[str, Any] = {}


async def test_a_settle_is_queued_not_awaited(redis_url: str) -> None:
    link = RedisLink(StateConfig(redis_url=Secret(redis_url), prefix="aioproxy-test-settle"))
    counters = SharedCounters(link, ControlClock(time=lambda: 1_000.0, monotonic=lambda: 1_000.0))
    limits = _limits(max_parallel=1)
    try:
        reserved = await counters.reserve(_Call(), limits, 10)  # type: ignore[arg-type]
        assert reserved is not None
        reservation, _ = reserved
        assert reservation.settle(10, 0.0, 0.0) is None  # type: ignore[func-returns-value]  # nothing to await
        # Queued before the next reservation, so it is counted first: the slot is free.
        assert await counters.reserve(_Call(), limits, 10) is not None  # type: ignore[arg-type]
    finally:
        await counters.close()
        await link.close()


def _counters(redis_url: str, prefix: str) -> tuple[RedisLink, SharedCounters]:
    link = RedisLink(StateConfig(redis_url=Secret(redis_url), prefix=prefix))
    clock = ControlClock(time=lambda: 1_000.0, monotonic=lambda: 1_000.0)
    return link, SharedCounters(link, clock)


async def _script_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_concurrent_requests_share_one_script_call(redis_url: str) -> None:
    """A batch's reservations are checked in one script call, in order and exactly, and the
    settles queued meanwhile go in the next as one merged settle, not one call per request."""
    client = aioredis.Redis.from_url(redis_url)
    link, counters = _counters(redis_url, "aioproxy-test-merge")
    limits = _limits(max_parallel=5)
    try:
        await client.config_resetstat()
        answers = await asyncio.gather(
            *(counters.reserve(_Call(), limits, 10) for _ in range(20)),  # type: ignore[arg-type]
            return_exceptions=True,
        )
        admitted = [answer for answer in answers if isinstance(answer, tuple)]
        assert len(admitted) == 5  # max_parallel, exactly, within one batch
        assert all(isinstance(answer, RateLimited) for answer in answers if answer not in admitted)
        more = [
            asyncio.ensure_future(counters.reserve(_Call(), limits, 10))  # type: ignore[arg-type]
            for _ in range(5)
        ]
        for reservation, _ in admitted:
            reservation.settle(7, 0.5, 1_000.0)
        # Settled before the next reservations in the same call: their 5 slots are free.
        assert all(answer is not None for answer in await asyncio.gather(*more))
        assert await _script_calls(client) == 2  # was 30: 20 reserves, 5 settles, 5 reserves
        base = "aioproxy-test-merge:k:key_batch"
        assert await client.get(base + ":f") == b"5"
        tokens = await client.hvals(base + ":t")
        assert sum(int(value) for value in tokens) == 5 * 7 + 5 * 10
        assert await client.get(base + ":s:ever") == b"2.5"
    finally:
        await counters.close()
        await link.close()
        await client.aclose()


async def test_close_sends_the_last_settles(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    link, counters = _counters(redis_url, "aioproxy-test-close")
    try:
        reserved = await counters.reserve(_Call(), _limits(max_parallel=1), 10)  # type: ignore[arg-type]
        assert reserved is not None
        reserved[0].settle(10, 0.0, 1_000.0)
        await counters.close()  # at once: the settle is still queued
        assert await client.get("aioproxy-test-close:k:key_batch:f") == b"0"
    finally:
        await link.close()
        await client.aclose()


async def test_settles_missed_while_down_are_sent_when_back(redis_url: str) -> None:
    link, counters = _counters(redis_url, "aioproxy-test-missed")
    limits = _limits(max_parallel=1)
    try:
        reserved = await counters.reserve(_Call(), limits, 10)  # type: ignore[arg-type]
        assert reserved is not None
        link.lost(OSError("gone"))  # the probe finds it back within half a second
        reserved[0].settle(10, 0.0, 1_000.0)  # kept: not sent while down
        async with asyncio.timeout(30):  # safety net: the probe pings every half second
            while not link.up:
                await asyncio.sleep(0.05)
        # The slot was freed in Redis when it came back, before this reservation.
        assert await counters.reserve(_Call(), limits, 10) is not None  # type: ignore[arg-type]
    finally:
        await counters.close()
        await link.close()
