"""Limits and key changes shared through a real Redis by two gateway apps on one database
([state] redis_url): what one instance counts or changes, the other enforces."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from aioproxy import hookimpl
from aioproxy.config import Secret, StateConfig
from aioproxy.control.plane import plane_key
from aioproxy.state import changes as changes_module
from aioproxy.state import link as link_module
from aioproxy.state.changes import Change, Changes
from aioproxy.state.link import RedisLink
from aioproxy.state.shared import changes_key, deployments_key, link_key
from aioproxy.testing import FakeOpenAI
from tests.control.conftest import CHAT, Control
from tests.redis_server import RedisServer, redis_server, redis_url, tls_redis_server
from tests.support import MASTER_KEY

__all__ = ["redis_server", "redis_url", "tls_redis_server"]  # the fixtures, used here


async def post_chat(control: Control, key: str, **overrides: Any) -> tuple[int, dict[str, str]]:
    async with control.session.post(
        control.url("/v1/chat/completions"),
        json={**CHAT, **overrides},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        await response.read()
        return response.status, dict(response.headers)


async def two_instances(start_control: Any, redis_url: str, **state: Any) -> list[Control]:
    config = {
        "state": {"redis_url": redis_url, **state},
    }
    instances = []
    for _ in range(2):
        control = await start_control(**config)
        # No database poll: only Redis can carry a change from one instance to the other.
        control.plane._poller.cancel()
        instances.append(control)
    for control in instances:
        await control.server.app[changes_key].listening.wait()
    return instances


class CreateKeyMidStart:
    """Creates a key through ``other`` while this instance starts: after its control plane
    loaded the keys, before the state plugin subscribes (as when workers start one after
    another and the first already serves)."""

    def __init__(self, other: Control) -> None:
        self.other = other
        self.created: dict[str, Any] = {}

    @hookimpl(trylast=True)  # called after the state plugin's hook: its context is the last
    def register_contexts(self, register: Any, app: web.Application) -> None:
        async def create_key(app: web.Application) -> AsyncIterator[None]:
            app[plane_key]._poller.cancel()  # only Redis can carry the change here
            self.created = await self.other.new_key(rpm=100)
            yield

        # Just before the state plugin's context, so after the control plane's.
        app.cleanup_ctx.insert(len(app.cleanup_ctx) - 1, create_key)


async def test_change_while_starting_is_not_missed(start_control: Any, redis_url: str) -> None:
    first = await start_control(state={"redis_url": redis_url})
    mid_start = CreateKeyMidStart(first)
    second = await start_control(plugins=(mid_start,), state={"redis_url": redis_url})
    assert mid_start.created
    assert (await post_chat(second, mid_start.created["key"]))[0] == 200


async def test_listener_survives_a_failed_reload(redis_url: str) -> None:
    """Resubscribing after a lost connection reloads the keys; a database failure then is
    logged, and the listener keeps delivering changes."""
    link = RedisLink(StateConfig(redis_url=redis_url))
    reloads: list[int] = []
    cooled: asyncio.Queue[str] = asyncio.Queue()

    async def failing_reload() -> None:
        reloads.append(1)
        raise RuntimeError("the database is down")

    changes = Changes(link, failing_reload, lambda key, _seconds: cooled.put_nowait(key))
    killer = aioredis.Redis.from_url(redis_url)
    try:
        await changes.start()
        before = len(reloads)
        await killer.client_kill_filter(_type="pubsub")
        async with asyncio.timeout(30):  # safety net: it resubscribes within a second
            while len(reloads) == before or not changes.listening.is_set():
                await asyncio.sleep(0.01)
            change = Change(source="another", what="cooldown", deployment="d1", seconds=5.0)
            await killer.publish(changes.channel, msgspec.json.encode(change))
            assert await cooled.get() == "d1"
    finally:
        await killer.aclose()
        await changes.close()
        await link.close()


async def test_a_silent_channel_is_given_up_and_heard_again(
    redis_url: str, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis that stops answering without closing the connection (SIGSTOP here; a failover
    to another host or a dropped route look the same): the listener PINGs the quiet channel,
    hears nothing, and subscribes again once Redis answers. It listened to the dead connection
    for ever, every change after it missed."""
    monkeypatch.setattr(changes_module, "QUIET", 0.2)
    link = RedisLink(StateConfig(redis_url=Secret(redis_url)))
    cooled: asyncio.Queue[str] = asyncio.Queue()
    changes = Changes(link, _no_reload, lambda key, _seconds: cooled.put_nowait(key))
    publisher = aioredis.Redis.from_url(redis_url)
    process = redis_server.process
    assert process is not None
    try:
        await changes.start()
        process.send_signal(signal.SIGSTOP)
        try:
            async with asyncio.timeout(30):  # safety net: given up after two quiet spells
                while changes.listening.is_set():
                    await asyncio.sleep(0.05)
        finally:
            process.send_signal(signal.SIGCONT)
        async with asyncio.timeout(30):  # safety net: it subscribes again at once
            await changes.listening.wait()
        change = Change(source="another", what="cooldown", deployment="d1", seconds=5.0)
        await publisher.publish(changes.channel, msgspec.json.encode(change))
        assert await cooled.get() == "d1"
    finally:
        process.send_signal(signal.SIGCONT)
        await publisher.aclose()
        await changes.close()
        await link.close()


async def test_a_broken_cooldown_fails_alone(redis_url: str) -> None:
    """An entry of the cooldowns' hash that holds no end: an instance subscribing reads the
    others' cooldowns in force and listens (reading them failed, and it gave Redis up and
    subscribed again, every half second); with the hash of another type, a cooldown is still
    heard by the instances listening. Each counted as unusable, the link kept."""
    config = StateConfig(redis_url=Secret(redis_url), prefix="aioproxy-test-broken-cooling")
    cooling = "aioproxy-test-broken-cooling:cooling"
    client = aioredis.Redis.from_url(redis_url)
    seconds, _ = await client.time()
    await client.delete(cooling)
    await client.hset(cooling, mapping={"d0": "soon", "d1": seconds * 1000 + 60_000})
    cooled: asyncio.Queue[str] = asyncio.Queue()
    link, other_link = RedisLink(config), RedisLink(config)
    changes = Changes(link, _no_reload, lambda key, _seconds: cooled.put_nowait(key))
    other = Changes(other_link, _no_reload, lambda key, _seconds: None)
    try:
        await changes.start()
        assert changes.listening.is_set() and await cooled.get() == "d1"
        assert link.up and link.failures == 0 and link.unusable == 1
        await client.delete(cooling)
        await client.set(cooling, "not a hash")
        await other.start()
        other.announce_cooldown("d2", 5.0)
        assert await cooled.get() == "d2"  # heard, though not kept
        async with asyncio.timeout(30):  # safety net: its answer comes in milliseconds
            while other_link.unusable < 2:  # its catch-up's, and its cooldown's
                await asyncio.sleep(0.01)
        assert other_link.up and other_link.failures == 0
        assert await client.get(cooling) == b"not a hash"
    finally:
        await client.aclose()
        for instance in (changes, other):
            await instance.close()
        for each in (link, other_link):
            await each.close()


async def _no_reload() -> None:
    return None


async def test_rpm_is_shared_by_instances(start_control: Any, redis_url: str) -> None:
    first, second = await two_instances(start_control, redis_url)
    key = (await first.new_key(rpm=10))["key"]
    await second.plane.cache.reload()
    results = await asyncio.gather(*(post_chat((first, second)[i % 2], key) for i in range(40)))
    statuses = [status for status, _ in results]
    assert statuses.count(200) == 10 and statuses.count(429) == 30
    admitted_on = [i % 2 for i, (status, _) in enumerate(results) if status == 200]
    assert set(admitted_on) <= {0, 1}
    status, headers = await post_chat(second, key)
    assert status == 429 and headers["x-ratelimit-remaining-requests"] == "0"


async def test_one_round_trip_before_the_upstream_and_one_after(
    start_control: Any, redis_url: str, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot path's budget: a limited key's cacheable request sends its cache lookup and its
    reservation in one pipelined round trip before the upstream is called, and its settlement
    and its cache write in one after it. Even the first request after a Redis restart: the
    scripts are loaded at start-up, not after a NOSCRIPT on the way."""
    monkeypatch.setattr(link_module, "HEARTBEAT", 3600.0)  # the lease's renewal: once, first
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.script_flush()  # as a restarted Redis: no script known
        control = await start_control(state={"redis_url": redis_url}, cache={"enabled": True})
        link = control.server.app[link_key]
        created = await control.new_key(rpm=100, tpm=100_000)
        async with asyncio.timeout(30):  # safety net: the first renewal is sent at start-up
            while not await client.exists(f"aioproxy:alive:{link.instance}"):
                await asyncio.sleep(0.01)
        before = link.batcher.batches
        at_upstream: list[int] = []
        fake.on_request = lambda _request: at_upstream.append(link.batcher.batches)
        async with control.session.post(
            control.url("/v1/chat/completions"),
            json={**CHAT, "temperature": 0},
            headers={"Authorization": f"Bearer {created['key']}"},
        ) as response:
            used = (await response.json())["usage"]["total_tokens"]
        assert at_upstream == [before + 1]
        tokens = f"aioproxy:k:{created['id']}:t"
        async with asyncio.timeout(30):  # safety net: both are sent after the answer
            while not await client.keys("aioproxy:cache:*") or used != sum(
                int(value) for value in await client.hvals(tokens)
            ):
                await asyncio.sleep(0.01)
        assert link.batcher.batches == before + 2
    finally:
        await client.aclose()


async def test_headers_count_every_instance(start_control: Any, redis_url: str) -> None:
    first, second = await two_instances(start_control, redis_url)
    key = (await first.new_key(rpm=5, tpm=100_000))["key"]
    await second.plane.cache.reload()
    remaining = []
    for control in (first, second, first):
        status, headers = await post_chat(control, key)
        assert status == 200
        remaining.append(headers["x-ratelimit-remaining-requests"])
    assert remaining == ["4", "3", "2"]


async def test_revocation_reaches_the_other_instance(start_control: Any, redis_url: str) -> None:
    first, second = await two_instances(start_control, redis_url)
    created = await first.new_key(rpm=100)
    await second.plane.cache.reload()
    assert (await post_chat(second, created["key"]))[0] == 200
    await first.admin("PATCH", f"/admin/keys/{created['id']}", {"disabled": True})
    async with asyncio.timeout(30):  # safety net: the message arrives in milliseconds
        while (await post_chat(second, created["key"]))[0] != 401:
            await asyncio.sleep(0.01)


async def test_limits_and_changes_over_tls(
    start_control: Any, tls_redis_server: RedisServer
) -> None:
    """``rediss://``: the batched scripts, their connection and the change channel's all
    speak TLS (the server takes nothing else)."""
    first, second = await two_instances(start_control, tls_redis_server.url)
    created = await first.new_key(rpm=2)
    await second.plane.cache.reload()
    statuses = [(await post_chat(control, created["key"]))[0] for control in (first, second) * 2]
    assert statuses == [200, 200, 429, 429]
    await first.admin("PATCH", f"/admin/keys/{created['id']}", {"disabled": True})
    async with asyncio.timeout(30):  # safety net: the message arrives in milliseconds
        while (await post_chat(second, created["key"]))[0] != 401:
            await asyncio.sleep(0.01)


async def test_max_parallel_slot_is_released_in_redis(start_control: Any, redis_url: str) -> None:
    first, second = await two_instances(start_control, redis_url)
    key = (await first.new_key(max_parallel=1))["key"]
    await second.plane.cache.reload()
    for control in (first, second, first, second):  # each frees its slot when it ends
        assert (await post_chat(control, key))[0] == 200


async def test_redis_down_falls_back_then_resumes(
    start_control: Any, redis_url: str, redis_server: RedisServer
) -> None:
    first, second = await two_instances(start_control, redis_url)
    key = (await first.new_key(rpm=3))["key"]
    await second.plane.cache.reload()
    assert (await post_chat(first, key))[0] == 200
    redis_server.kill()
    # Per-process counters meanwhile: each instance admits the key's 3 on its own.
    statuses = [(await post_chat(second, key))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert second.server.app[link_key].failures == 1
    redis_server.start()
    link = second.server.app[link_key]
    async with asyncio.timeout(30):  # safety net: the probe pings every half second
        while not link.up:
            await asyncio.sleep(0.05)
    # Shared again, on a Redis that lost its counts: 3 more across both instances.
    statuses = [(await post_chat((first, second)[i % 2], key))[0] for i in range(4)]
    assert statuses == [200, 200, 200, 429]


async def test_on_error_closed_refuses_limited_keys(
    start_control: Any, redis_url: str, redis_server: RedisServer
) -> None:
    first, _ = await two_instances(start_control, redis_url, on_error="closed")
    key = (await first.new_key(rpm=100))["key"]
    redis_server.kill()
    status, headers = await post_chat(first, key)
    assert status == 429 and headers["Retry-After"] == "1"
    assert (await post_chat(first, "sk-test-master"))[0] != 500


async def test_deployment_caps_are_shared(
    start_control: Any, redis_url: str, upstream_base: str
) -> None:
    capped = {
        "name": "gpt-test",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "api_base": upstream_base,
        "api_key": "sk-upstream-secret",
        "rpm": 4,
    }
    models = [capped, {"name": "echo", "provider": "echo"}]
    instances = []
    for _ in range(2):
        control = await start_control(state={"redis_url": redis_url}, models=models)
        instances.append(control)
    first, second = instances
    for _ in range(3):
        assert (await post_chat(first, MASTER_KEY))[0] == 200
    await first.server.app[deployments_key].sync()  # what the background sync does
    await second.server.app[deployments_key].sync()
    assert (await post_chat(second, MASTER_KEY))[0] == 200  # the 4th of the shared 4
    status, _ = await post_chat(second, MASTER_KEY)
    assert status == 429


async def test_a_lost_redis_is_counted_in_metrics(
    start_control: Any, redis_url: str, redis_server: RedisServer
) -> None:
    control = await start_control(state={"redis_url": redis_url}, metrics={"enabled": True})
    key = (await control.new_key(rpm=100))["key"]
    redis_server.kill()
    for _ in range(3):  # served on per-process counters; the loss counted once
        assert (await post_chat(control, key))[0] == 200
    async with control.session.get(
        control.url("/metrics"), headers={"Authorization": f"Bearer {MASTER_KEY}"}
    ) as response:
        text = await response.text()
    assert "aioproxy_state_redis_lost_total 1.0" in text


async def test_only_counts_routing_reads_are_shared(
    start_control: Any, redis_url: str, upstream_base: str
) -> None:
    """A deployment with no caps, of a model not routed least-busy, is not counted in Redis
    (nothing reads its counts); a least-busy model's deployments are (their requests in flight)."""
    upstream = {"provider": "openai", "model": "gpt-4o-mini", "api_base": upstream_base}
    models = [
        {"name": "gpt-test", **upstream, "api_key": "sk-upstream-secret"},
        {"name": "gpt-busy", **upstream, "api_key": "sk-upstream-busy"},
    ]
    state = {"redis_url": redis_url, "prefix": "aioproxy-test-uncounted"}
    control = await start_control(
        state=state, models=models, router={"models": {"gpt-busy": {"strategy": "least-busy"}}}
    )
    for model in ("gpt-test", "gpt-busy"):
        assert (await post_chat(control, MASTER_KEY, model=model))[0] == 200
    await control.server.app[deployments_key].sync()  # what the background sync does
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        counted = set(await client.keys("aioproxy-test-uncounted:d:*"))
    finally:
        await client.aclose()
    assert counted and all("gpt-busy" in key for key in counted)
