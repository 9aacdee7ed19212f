"""A batch whose replies are lost after Redis ran its scripts (a timeout, a dropped
connection): on a real redis-server behind a relay that drops the replies, what the scripts
reserved is freed when Redis is back, and what they settled is not applied twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Self

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import make_mocked_request

from aioproxy.config import Secret, StateConfig
from aioproxy.control.clock import ControlClock
from aioproxy.control.limits import RESERVATION
from aioproxy.control.meters import KeyLimits, Meter
from aioproxy.control.records import KeyEntry
from aioproxy.state import deployments as deployments_module
from aioproxy.state import link as link_module
from aioproxy.state.counters import SharedCounters, SharedReservation, _pack
from aioproxy.state.link import RedisLink
from aioproxy.state.shared import deployments_key, link_key
from tests.control.conftest import Control
from tests.control.test_state_shared import post_chat
from tests.redis_relay import LossyRelay
from tests.redis_server import RedisServer, redis_server, redis_url
from tests.support import MASTER_KEY, upstream_model

__all__ = ["redis_server", "redis_url"]  # the fixtures, used here

KEY = "key_lost"
# Redis's timeout here: a hang guard only, longer than the tests' own. A lost answer is told by
# its connection's cut (``LossyRelay``), not by the timeout: a short one (it was 1 s) also
# expired on a loaded machine while a call the test expects answered was on its way (the
# process not scheduled for a second), which failed the test at random.
TIMEOUT = 60.0


class _Call:
    """What ``reserve`` reads of a call: its request (for the headers) and its state."""

    def __init__(self) -> None:
        self.request = make_mocked_request("POST", "/v1/chat/completions")  # a real one
        self.state: dict[str, Any] = {}


def _limits(key_id: str = KEY, **limits: Any) -> KeyLimits:
    key = KeyEntry(id=key_id, name="lost", digest="d", key_prefix="sk-", created_at=0.0, **limits)
    return KeyLimits(key, Meter(), None, None)


async def _reserve(counters: SharedCounters, limits: KeyLimits, held: int = 0) -> Any:
    """One request of 10 tokens: its reservation (None: Redis failed and it fell back)."""
    call = _Call()
    await counters.reserve(call, limits, 10, held)  # type: ignore[arg-type]
    return call.state.get(RESERVATION)


@pytest.fixture
async def relay(redis_server: RedisServer) -> AsyncIterator[LossyRelay]:
    relay = LossyRelay(redis_server.port)
    await relay.start()
    yield relay
    await relay.close()


class _Instance:
    """One instance's counters, reaching Redis through the relay, and a client of its own."""

    def __init__(self, relay: LossyRelay, redis_url: str, prefix: str) -> None:
        self.relay = relay
        config = StateConfig(redis_url=Secret(relay.url), prefix=prefix, timeout=TIMEOUT)
        self.link = link = RedisLink(config)
        clock = ControlClock(time=lambda: 1_000.0, monotonic=lambda: 1_000.0)
        self.counters = SharedCounters(link, clock)
        self.client = aioredis.Redis.from_url(redis_url)
        self.base = f"{prefix}:k:{KEY}"  # the key's counters

    async def __aenter__(self) -> Self:
        await self.link.preload(self.counters.script)
        await self.link.batcher.command("PING")  # its connection made: a lost reply is a call's
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.counters.close()
        await self.link.close()
        await self.client.aclose()

    async def values(self, suffix: str) -> list[bytes]:
        """The fields of one of the key's hashes (``:flights``, ``:held``)."""
        return list(await self.client.hvals(self.base + suffix))

    async def spend(self) -> float:
        return float(await self.client.get(f"{self.base}:s:ever"))


async def _lose_replies(relay: LossyRelay, link: RedisLink) -> None:
    """Until the link gives Redis up (after Redis ran what it was sent), then let replies
    through again and wait until the link is back."""
    async with asyncio.timeout(30):  # safety net: the relay cuts the batch's connection at once
        await relay.dropped.wait()
    await _until_link(link, up=False)
    relay.dropping = False
    await _until_link(link, up=True)


async def _until_link(link: RedisLink, up: bool) -> None:
    async with asyncio.timeout(30):  # safety net: a cut connection fails its batch at once,
        while link.up is not up:  # the probe tries every half second
            await asyncio.sleep(0.01)


async def test_a_lost_reservation_leaks_no_slot_nor_reserved_cost(
    relay: LossyRelay, redis_url: str
) -> None:
    """The script admitted the request (its slot and reserved cost counted under this
    instance's live lease) but its answer was lost: the request fell back to per-process
    counters. When Redis is back both are freed: the key's one slot and its budget serve the
    next request (they stayed taken: max_parallel refused, a budget "reserved by its requests
    in flight" with none in flight)."""
    limits = _limits(max_parallel=1, max_budget=1.0)
    async with _Instance(relay, redis_url, "aioproxy-test-lost-reserve") as instance:
        counters = instance.counters
        relay.dropping = True
        assert await _reserve(counters, limits, 2_000_000_000) is None  # fell back
        assert await instance.values(":flights") == [b"1"]  # Redis did count it
        await _lose_replies(relay, instance.link)
        reservation = await _reserve(counters, limits, 2_000_000_000)
        assert isinstance(reservation, SharedReservation)  # its slot and budget are free
        assert await instance.values(":flights") == [b"1"]  # this one only
        assert await instance.values(":held") == [b"2000000000"]
        reservation.settle(10, 0.0, 1_000.0)
        assert await _reserve(counters, limits) is not None  # after that settle
        await counters.close()
        assert await instance.values(":flights") == [b"1"]
        assert await instance.values(":held") == []  # idle: nothing reserved


async def test_a_lost_settle_counts_once(relay: LossyRelay, redis_url: str) -> None:
    """The script applied the settle (its cost added, its slot freed) but its answer was
    lost: sent again when Redis is back, it is not applied twice (the spend counted twice, a
    slot of another request freed)."""
    limits = _limits(max_parallel=2, max_budget=10.0)
    async with _Instance(relay, redis_url, "aioproxy-test-lost-settle") as instance:
        first = await _reserve(instance.counters, limits, 1_000_000_000)
        other = await _reserve(instance.counters, limits, 1_000_000_000)
        assert first is not None and other is not None
        relay.dropping = True
        first.settle(10, 0.25, 1_000.0)
        await _lose_replies(relay, instance.link)
        assert await _reserve(instance.counters, limits) is not None  # after the settle again
        assert await instance.spend() == 0.25  # once
        assert await instance.values(":flights") == [b"2"]  # the other and this one
        assert await instance.values(":held") == [b"1000000000"]  # the other's


async def test_a_settle_lost_before_redis_ran_it_is_applied(
    relay: LossyRelay, redis_url: str, redis_server: RedisServer
) -> None:
    """The other outcome: Redis never got the batch (it was down). Its settle is applied
    when Redis is back, once."""
    limits = _limits(max_parallel=1, max_budget=10.0)
    async with _Instance(relay, redis_url, "aioproxy-test-unsent-settle") as instance:
        link = instance.link
        reservation = await _reserve(instance.counters, limits, 1_000_000_000)
        assert reservation is not None
        redis_server.kill()
        reservation.settle(10, 0.25, 1_000.0)
        await _until_link(link, up=False)  # its batch refused
        redis_server.start()  # empty: it ran nothing
        await instance.client.hset(f"{instance.base}:flights", link.instance, 1)  # as before
        await instance.client.hset(f"{instance.base}:held", link.instance, 1_000_000_000)
        await _until_link(link, up=True)
        assert await _reserve(instance.counters, limits) is not None  # the settle freed it
        assert await instance.spend() == 0.25
        assert await instance.values(":held") == []


async def _post_chat(control: Control, key: str, **overrides: Any) -> int:
    return (await post_chat(control, key, **overrides))[0]


async def test_a_budget_key_is_served_after_a_lost_batch(
    start_control: Any, relay: LossyRelay, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the gateway: a request whose reservation's answer is lost is served on
    per-process counters; when Redis is back, the cost it reserved there is freed and the key
    is served (it was refused "reserved by its requests in flight", with none in flight)."""
    monkeypatch.setattr(link_module, "HEARTBEAT", 3600.0)  # the lease's renewal: once, first
    prefix = "aioproxy-test-lost-budget"
    control = await start_control(
        state={"redis_url": relay.url, "prefix": prefix, "timeout": TIMEOUT}
    )
    link = control.server.app[link_key]
    created = await control.new_key(max_budget=0.005)
    key, base = created["key"], f"{prefix}:k:{created['id']}"
    client = aioredis.Redis.from_url(redis_url)
    try:
        # 1,000 tokens out at $8 a million: $0.008 reserved, more than the whole budget.
        assert await _post_chat(control, key, max_tokens=1000) == 200
        await _idle(client, base)  # its settle sent: only the next request's batch is lost
        relay.dropping = True
        assert await _post_chat(control, key, max_tokens=1000) == 200  # on this process's
        await _lose_replies(relay, link)
        assert await _post_chat(control, key, max_tokens=1000) == 200
        await _idle(client, base)
    finally:
        await client.aclose()


async def _idle(client: aioredis.Redis, base: str) -> None:
    """Until nothing is held nor in flight for the scope ``base`` in Redis."""
    async with asyncio.timeout(30):  # safety net: a settle goes with the next batch
        while await client.hvals(f"{base}:held") or await client.hvals(f"{base}:flights"):
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("broken", [False, True], ids=["usable", "beside-a-broken-one"])
async def test_a_lost_deployment_sync_counts_once(
    start_control: Any,
    relay: LossyRelay,
    redis_url: str,
    upstream_base: str,
    monkeypatch: pytest.MonkeyPatch,
    broken: bool,
) -> None:
    """A deployment's counts synced to Redis, the answer lost: sent again when Redis is back,
    they count once (a capped deployment's requests counted twice, refusing early on every
    instance; its requests in flight counted twice, skewing least-busy for good). So they do
    beside a deployment whose in-flight hash is of another type (the sync was refused whole,
    every deployment's counts dropped): that one's hash left as it was, counted unusable."""
    monkeypatch.setattr(link_module, "HEARTBEAT", 3600.0)
    monkeypatch.setattr(deployments_module, "SYNC_INTERVAL", 3600.0)  # only the test's syncs
    prefix = "aioproxy-test-lost-sync"
    models = [
        upstream_model("gpt-test", upstream_base, rpm=100),  # capped: their counts are shared
        upstream_model("gpt-capped", upstream_base, rpm=100),
    ]
    control = await start_control(
        state={"redis_url": relay.url, "prefix": prefix, "timeout": TIMEOUT}, models=models
    )
    link, deployments = control.server.app[link_key], control.server.app[deployments_key]
    client = aioredis.Redis.from_url(redis_url)
    other = f"{prefix}:d:gpt-test#0"
    try:
        for left in await client.keys(f"{prefix}:d:*"):  # by the test's other cases
            await client.delete(left)
        if broken:
            await client.set(f"{other}:f", "3")
        for model in ("gpt-test", "gpt-capped"):
            assert await _post_chat(control, MASTER_KEY, model=model) == 200
        relay.dropping = True
        await deployments.sync()  # Redis counts the requests; the answer is lost
        await _lose_replies(relay, link)
        unusable = link.unusable
        await deployments.sync()
        assert sum(int(n) for n in await client.hvals(f"{prefix}:d:gpt-capped#0:r")) == 1
        assert sum(int(n) for n in await client.hvals(f"{other}:r")) == (0 if broken else 1)
        assert link.up and link.unusable == unusable + broken
        if broken:
            assert await client.get(f"{other}:f") == b"3"
            assert await client.exists(f"{other}:t") == 0
    finally:
        await client.aclose()


async def test_a_lost_call_reaching_redis_after_a_later_one_does_nothing(redis_url: str) -> None:
    """A lost call still on its way (held by the network) reaches Redis after a later call
    ran, which settled it: it changes nothing (its settle would count twice, its slot freed
    twice)."""
    prefix = "aioproxy-test-late-call"
    link = RedisLink(StateConfig(redis_url=Secret(redis_url), prefix=prefix))
    clock = ControlClock(time=lambda: 1_000.0, monotonic=lambda: 1_000.0)
    counters = SharedCounters(link, clock)
    client = aioredis.Redis.from_url(redis_url)
    base = f"{prefix}:k:{KEY}"
    limits = _limits(max_parallel=2, max_budget=10.0)
    try:
        first = await _reserve(counters, limits)  # call 1
        assert first is not None and await _reserve(counters, limits) is not None  # call 2
        first.settle(10, 0.25, 1_000.0)
        assert await _reserve(counters, limits) is not None  # call 3, with that settle
        # Call 1 again, as if it had been lost and arrived now: a settle of $1 freeing a slot.
        late = [[], base, 0, 1, 1.0, "ever", 0, 0]
        await link.batcher.run(counters.script, [], [_pack(late), _pack([1]), *link.lease])
        assert float(await client.get(f"{base}:s:ever")) == 0.25
        assert await client.hvals(f"{base}:flights") == [b"2"]
    finally:
        await counters.close()
        await link.close()
        await client.aclose()


async def test_a_call_the_script_fails_on_is_not_carried_for_ever(
    relay: LossyRelay, redis_url: str
) -> None:
    """A settle the script cannot apply (here its key's spend counter is a hash: every
    INCRBYFLOAT on it fails) is dropped, logged: the next calls, another key's, run (carried,
    it would fail each of them the same way, and the limits would stay on per-process
    counters for good)."""
    limits, other = _limits(max_budget=10.0), _limits("key_other", max_budget=10.0)
    async with _Instance(relay, redis_url, "aioproxy-test-refused-call") as instance:
        link = instance.link
        reservation = await _reserve(instance.counters, limits, 1_000)
        assert reservation is not None
        await instance.client.hset(f"{instance.base}:s:ever", "not", "a number")
        sent = link.batcher.batches
        reservation.settle(10, 0.25, 1_000.0)
        async with asyncio.timeout(30):  # safety net: its batch is answered in milliseconds
            while link.batcher.batches == sent or instance.counters._in_flight:
                await asyncio.sleep(0.01)
        assert link.up  # a refusal of the script's, not of Redis
        assert isinstance(await _reserve(instance.counters, other), SharedReservation)
        assert isinstance(await _reserve(instance.counters, other), SharedReservation)
        assert link.up
