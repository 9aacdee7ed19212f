"""Redis keeps what a Lua script wrote before it failed: each of aioproxy's scripts checks its
arguments before its first write, so a call given bad input fails whole and writes nothing;
on a real redis-server. A key a script meets of the wrong type, or holding what its commands
cannot take, fails what it is part of alone: the counters script's scope (its requests
answered unchecked, counted by their process), the deployments sync's deployment (counted by
each process alone), the cooldowns' entry; nothing written to it, the rest of the call made."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import ResponseError

from aioproxy.context import Deployment
from aioproxy.keys import runtime_key
from aioproxy.state import deployments as deployments_module
from aioproxy.state.changes import _COOL, _COOLING
from aioproxy.state.counters import _APPLY, _pack, _unpack
from aioproxy.state.deployments import _SYNC
from aioproxy.state.shared import deployments_key, link_key
from tests.control.conftest import CHAT, Control, FakeControlClock
from tests.control.test_state_shared import post_chat
from tests.redis_server import redis_server, redis_url
from tests.support import MASTER_KEY, UPSTREAM_KEY, upstream_model

__all__ = ["redis_server", "redis_url"]  # the fixtures, used here

PREFIX = "aioproxy-test-atomic"
ME = "instance-a"
LEASE = 15_000
ONE, TWO = f"{PREFIX}:k:key_one", f"{PREFIX}:k:key_two"  # two scopes' Redis keys


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


async def keyspace(client: aioredis.Redis) -> dict[bytes, Any]:
    """Every key under the prefix: its type and what it holds."""
    held: dict[bytes, Any] = {}
    for key in sorted(await client.keys(f"{PREFIX}*")):
        kind = (await client.type(key)).decode()
        readers: dict[str, Callable[[bytes], Awaitable[Any]]] = {
            "hash": client.hgetall,
            "string": client.get,
            "list": lambda key: client.lrange(key, 0, -1),
        }
        held[key] = (kind, await readers[kind](key))
    return held


def settle(
    base: str, delta: Any = 5, freed: Any = 1, cost: Any = 0.5, unheld: Any = 0
) -> list[Any]:
    """A settle's words, as ``SharedCounters.take`` sends them (period "ever", no TTL)."""
    return [base, delta, freed, cost, "ever", 0, unheld]


def reservation(base: str, scopes: int = 1, held: int = 0, budget: float = -1) -> list[Any]:
    """A reservation's words of 10 tokens: ``scopes`` says how many scopes follow (one does)."""
    return [10, held, scopes, base, 100, 10_000, 5, budget, 0.0, "ever"]


def counters_call(settles: list[Any], reservations: list[Any]) -> tuple[Any, ...]:
    """The arguments of one ``_APPLY`` call (no keys), numbered 1, no lost calls."""
    return (0, _pack([[], *settles]), _pack([1, *reservations]), ME, f"{PREFIX}:", LEASE)


def deployments_call(*counts: tuple[Any, Any, Any], number: int = 1) -> tuple[Any, ...]:
    """The arguments of one ``_SYNC`` call: per deployment its requests, tokens and flights."""
    keys = [f"{PREFIX}:d:{index}" for index in range(len(counts))]
    words = [word for count in counts for word in count]
    return (len(keys), *keys, ME, f"{PREFIX}:", LEASE, number, *words)


def cooldown_call(deployment: str, milliseconds: Any) -> tuple[Any, ...]:
    return (1, f"{PREFIX}:cooling", deployment, milliseconds, f"{PREFIX}:changes", "{}")


Setup = Callable[[aioredis.Redis], Awaitable[Any]]


async def nothing(client: aioredis.Redis) -> None:
    return None


# Per case: the script, what is in Redis first, the call's arguments. In each, a part the
# script takes before the bad one is valid (the first scope's settle, the first deployment's
# counts, the cooldown's own entry): the older scripts wrote it, then failed.
CASES: dict[str, tuple[str, Setup, tuple[Any, ...]]] = {
    "a settle's token change not an integer": (
        _APPLY,
        nothing,
        counters_call([*settle(ONE), *settle(TWO, delta=1.5)], []),
    ),
    "a settle's cost not a number": (
        _APPLY,
        nothing,
        counters_call([*settle(ONE), *settle(TWO, cost="much")], []),
    ),
    "a reservation short of its scopes": (
        _APPLY,
        nothing,
        counters_call(settle(ONE), reservation(TWO, scopes=2)),
    ),
    "a deployment's count not an integer": (
        _SYNC,
        nothing,
        deployments_call((1, 10, 1), ("1.5", 10, 1)),
    ),
    "a cooldown not a number": (
        _COOL,
        nothing,
        cooldown_call("deployment-a", "long"),
    ),
}


# Per case: a key of scope TWO that the counters script cannot count, how it is made, and the
# call (ONE's settle first: counted whatever TWO holds).
UNUSABLE: dict[str, tuple[str, Setup, tuple[Any, ...]]] = {
    "a token window of another type": (
        f"{TWO}:t",
        lambda client: client.set(f"{TWO}:t", "x"),
        counters_call(settle(ONE), reservation(TWO)),
    ),
    "a request window with a count that is not one": (
        f"{TWO}:r",
        lambda client: client.hset(f"{TWO}:r", "1000", "many"),
        counters_call(settle(ONE), reservation(TWO)),
    ),
    "an in-flight count that is not one": (
        f"{TWO}:flights",
        lambda client: client.hset(f"{TWO}:flights", ME, "lots"),
        counters_call([*settle(ONE), *settle(TWO)], reservation(TWO)),
    ),
    "a spend that is not a number": (
        f"{TWO}:s:ever",
        lambda client: client.set(f"{TWO}:s:ever", "lots"),
        counters_call([*settle(ONE), *settle(TWO)], reservation(TWO, held=100, budget=10.0)),
    ),
    "a budget's spend of another type": (
        f"{TWO}:s:ever",
        lambda client: client.hset(f"{TWO}:s:ever", "not", "a number"),
        counters_call(settle(ONE), reservation(TWO, held=100, budget=10.0)),
    ),
}


@pytest.mark.parametrize("case", UNUSABLE)
async def test_a_key_that_cannot_be_counted_fails_its_scope_alone(
    client: aioredis.Redis, case: str
) -> None:
    """The call answers the broken scope's reservation unchecked ({2}: counted by its
    process), reports the key and writes nothing to it; ONE's settle is counted."""
    key, setup, arguments = UNUSABLE[case]
    await setup(client)
    before = await keyspace(client)
    packed, broken = await client.eval(_APPLY, *arguments)
    assert _unpack(packed) == [[2]]
    reported = msgspec.msgpack.decode(broken)
    assert reported[0] == key and reported[1]  # and why
    after = await keyspace(client)
    assert after[key.encode()] == before[key.encode()]
    assert float(await client.get(f"{ONE}:s:ever")) == 0.5  # the rest of the call counted
    assert await client.exists(f"{TWO}:r") == (key == f"{TWO}:r")  # no request counted in TWO


async def test_a_batch_counts_the_other_keys_requests_exactly(client: aioredis.Redis) -> None:
    """Key TWO's window is of another type: in one batch TWO's two requests are unchecked,
    ONE's three counted in Redis, each once."""
    await client.set(f"{TWO}:t", "x")
    words = [*reservation(ONE), *reservation(TWO), *reservation(ONE), *reservation(TWO)]
    packed, _ = await client.eval(_APPLY, *counters_call([], [*words, *reservation(ONE)]))
    assert [reply[:1] for reply in _unpack(packed)] == [[1], [2], [1], [2], [1]]
    assert [int(count) for count in await client.hvals(f"{ONE}:r")] == [3]
    assert [int(count) for count in await client.hvals(f"{ONE}:t")] == [30]
    assert await client.hgetall(f"{ONE}:flights") == {ME.encode(): b"3"}
    assert await client.exists(f"{TWO}:r", f"{TWO}:flights") == 0
    assert await client.get(f"{TWO}:t") == b"x"


async def test_a_record_that_is_not_one_is_replaced(client: aioredis.Redis) -> None:
    """This instance's record of calls, of another type: as if none were kept (as when it
    expired), reported and replaced; the call counted."""
    record = f"{PREFIX}:applied:{ME}:counters"
    await client.rpush(record, "x")
    packed, broken = await client.eval(_APPLY, *counters_call(settle(ONE), reservation(TWO)))
    assert [reply[0] for reply in _unpack(packed)] == [1]
    assert msgspec.msgpack.decode(broken)[0] == record
    assert await client.type(record) == b"string"
    assert await client.hvals(f"{TWO}:flights") == [b"1"]


# Per case: which hash of a deployment the sync cannot use, and how it is made so.
BROKEN_HASHES: dict[str, tuple[str, Callable[[aioredis.Redis, str], Awaitable[Any]]]] = {
    "a request window with a field that is not a second": (
        ":r",
        lambda client, key: client.hset(key, "soon", "1"),
    ),
    "a token window with a count that is not an integer": (
        ":t",
        lambda client, key: client.hset(key, "1000", "1.5"),
    ),
    "an in-flight hash of another type": (":f", lambda client, key: client.set(key, "3")),
}


@pytest.mark.parametrize("case", BROKEN_HASHES)
async def test_a_deployment_hash_that_cannot_be_used_fails_its_deployment_alone(
    client: aioredis.Redis, case: str
) -> None:
    """Deployment 1's hash is unusable: its answer names the hash and why, nothing is written
    for it (no count, no expiry, in none of its hashes); deployment 0 is synced, once when the
    same sync is sent again."""
    suffix, setup = BROKEN_HASHES[case]
    broken = f"{PREFIX}:d:1{suffix}"
    await setup(client, broken)
    before = await keyspace(client)
    call = deployments_call((1, 10, 1), (1, 10, 1))
    for _ in range(2):  # the second: the same sync again, its answer lost
        totals = await client.eval(_SYNC, *call)
        assert totals[:3] == [1, 10, 0]  # no other instance's in flight
        assert totals[3] == broken.encode() and totals[4] and totals[5] == 0
    after = await keyspace(client)
    assert {key: held for key, held in after.items() if b":d:1" in key} == before
    assert await client.ttl(broken) == -1
    assert [int(count) for count in await client.hvals(f"{PREFIX}:d:0:r")] == [1]
    assert await client.hgetall(f"{PREFIX}:d:0:f") == {ME.encode(): b"1"}
    await client.delete(broken)  # fixed: the next sync counts it
    totals = await client.eval(_SYNC, *deployments_call((0, 0, 0), (2, 20, 0), number=2))
    assert totals[3:] == [2, 20, 0]


async def test_a_sync_reads_each_hash_once_and_counts_as_before(client: aioredis.Redis) -> None:
    """The totals are what each hash held plus the sync's own change: a window's buckets
    older than a minute are dropped and the rest counted; the other instances' requests in
    flight counted while their lease lives, a dead one's dropped."""
    now = int((await client.time())[0])
    base = f"{PREFIX}:d:0"
    await client.hset(f"{base}:r", mapping={now - 120: 7, now - 30: 4})
    await client.hset(f"{base}:t", mapping={now - 120: 70, now - 30: 40})
    await client.hset(f"{base}:f", mapping={"dead": 3, "live": 2, ME: 5})
    await client.set(f"{PREFIX}:alive:live", 1)
    assert await client.eval(_SYNC, *deployments_call((1, 10, -1))) == [5, 50, 2]
    for name in ("r", "t"):  # the old bucket dropped, the other kept, this second's added
        seconds = sorted(int(field) for field in await client.hkeys(f"{base}:{name}"))
        assert len(seconds) == 2 and seconds[0] == now - 30 and seconds[1] >= now
    assert await client.hgetall(f"{base}:f") == {b"live": b"2", ME.encode(): b"4"}
    assert 0 < await client.ttl(f"{base}:t") <= 120 and 0 < await client.ttl(f"{base}:f") <= 600


async def published(listener: PubSub) -> bytes:
    """The next message heard on the channel."""
    async with asyncio.timeout(30):  # safety net: published before the script returned
        while True:
            message = await listener.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                return bytes(message["data"])


async def test_a_cooldown_entry_that_holds_no_end_fails_alone(client: aioredis.Redis) -> None:
    """Another deployment's entry in the cooldowns' hash holds no end: reported and left, the
    cooldown kept and read; the deployment's own such entry: replaced by its cooldown (kept,
    read and published), so that it is not without one until another's expires the hash."""
    cooling = f"{PREFIX}:cooling"
    await client.hset(cooling, mapping={"other": "soon", "deployment-b": "later"})
    listener = client.pubsub()
    await listener.subscribe(f"{PREFIX}:changes")
    try:
        reported = await client.eval(_COOL, *cooldown_call("deployment-a", 5_000))
        assert reported == [
            f"field other of {cooling}".encode(),
            b"holds no end",
            f"field deployment-b of {cooling}".encode(),
            b"holds no end",
        ]
        await client.eval(_COOL, *cooldown_call("deployment-b", 5_000))
        held = await client.hgetall(cooling)
        assert held[b"other"] == b"soon" and held[b"deployment-b"] != b"later"
        assert 0 < await client.pttl(cooling) <= 5_000  # it goes with the last cooldown
        (cooling_now, broken) = await client.eval(_COOLING, 1, cooling)
        assert dict(zip(cooling_now[::2], cooling_now[1::2], strict=True)).keys() == {
            b"deployment-a",
            b"deployment-b",
        }
        assert all(0 < left <= 5_000 for left in cooling_now[1::2]) and len(broken) == 2
        assert [await published(listener), await published(listener)] == [b"{}", b"{}"]
    finally:
        await listener.aclose()


async def test_cooldowns_of_another_type_are_published_not_kept(client: aioredis.Redis) -> None:
    """The cooldowns' hash is of another type: nothing kept (nor read), reported; the cooldown
    is still published to the instances listening."""
    cooling = f"{PREFIX}:cooling"
    await client.set(cooling, "x")
    listener = client.pubsub()
    await listener.subscribe(f"{PREFIX}:changes")
    try:
        what, why = await client.eval(_COOL, *cooldown_call("deployment-a", 5_000))
        assert what == f"key {cooling}".encode() and b"WRONGTYPE" in why
        assert await client.get(cooling) == b"x"
        assert await client.eval(_COOLING, 1, cooling) == [[], [what, why]]
        assert await published(listener) == b"{}"
    finally:
        await listener.aclose()


@pytest.mark.parametrize("case", CASES)
async def test_a_script_that_fails_writes_nothing(client: aioredis.Redis, case: str) -> None:
    script, setup, arguments = CASES[case]
    await setup(client)
    before = await keyspace(client)
    with pytest.raises(ResponseError):
        await client.eval(script, *arguments)
    assert await keyspace(client) == before


async def test_the_scripts_still_write_what_they_are_given(client: aioredis.Redis) -> None:
    """The checks refuse only what the scripts cannot take: valid calls count as before."""
    replies = await client.eval(_APPLY, *counters_call(settle(ONE), reservation(TWO)))
    assert replies  # one reply, for the one reservation
    assert float(await client.get(f"{ONE}:s:ever")) == 0.5
    assert await client.hvals(f"{TWO}:flights") == [b"1"]
    totals = await client.eval(_SYNC, *deployments_call((1, 10, 1), (-1, 0, -1)))
    assert totals[:3] == [1, 10, 0]  # no other instance's requests in flight
    await client.eval(_COOL, *cooldown_call("deployment-a", 5_000))
    await client.eval(_COOL, *cooldown_call("deployment-b", 5_000))  # reads what the first wrote
    assert set(await client.hkeys(f"{PREFIX}:cooling")) == {b"deployment-a", b"deployment-b"}


async def test_a_broken_key_falls_back_alone(
    start_control: Any,
    redis_url: str,
    client: aioredis.Redis,
    clock: FakeControlClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Key A's token window in Redis is of another type: its requests are served on this
    process's counters (its rpm held there), while key B's, in the same batches, are counted
    in Redis exactly; Redis is not given up, A's key is logged once a minute and counted in
    the metrics."""
    control: Control = await start_control(
        state={"redis_url": redis_url, "prefix": PREFIX}, metrics={"enabled": True}
    )
    link = control.server.app[link_key]
    broken, counted = await control.new_key(rpm=2), await control.new_key(rpm=100)
    broken_base = f"{PREFIX}:k:{broken['id']}"
    await client.set(f"{broken_base}:t", "not a hash")

    async def post(created: dict[str, Any]) -> int:
        auth = {"Authorization": f"Bearer {created['key']}"}
        async with control.session.post(
            control.url("/v1/chat/completions"), json=CHAT, headers=auth
        ) as response:
            return response.status

    def logged() -> int:
        return sum("cannot be counted" in record.getMessage() for record in caplog.records)

    with caplog.at_level(logging.ERROR, logger="aioproxy"):
        statuses = await asyncio.gather(*(post(key) for key in [broken, counted] * 3))
        assert sorted(statuses[0::2]) == [200, 200, 429]  # A: its rpm of 2 held here
        assert statuses[1::2] == [200] * 3
        counts = await client.hvals(f"{PREFIX}:k:{counted['id']}:r")
        assert sum(int(count) for count in counts) == 3  # B: each counted in Redis, once
        assert link.up and link.failures == 0
        assert logged() == 1 and broken_base in caplog.text
        assert (await post(broken)) == 429  # met again: not logged again within the minute
        assert logged() == 1
        clock.advance(61)  # a minute on: logged again (and A's window here moved on)
        assert (await post(broken)) == 200
        assert logged() == 2
    assert await client.get(f"{broken_base}:t") == b"not a hash"
    assert await client.exists(f"{broken_base}:r", f"{broken_base}:flights") == 0
    async with control.session.get(
        control.url("/metrics"), headers={"Authorization": f"Bearer {MASTER_KEY}"}
    ) as response:
        text = await response.text()
    assert f"aioproxy_state_redis_unusable_keys_total {float(link.unusable)}" in text
    assert link.unusable >= 3  # every call that met it


async def test_a_request_asking_for_huge_amounts_fails_no_call(client: aioredis.Redis) -> None:
    """A reservation's tokens and reserved cost (a client's max_tokens, a price) count as at
    most 10^12 in Redis: the batch it shares with other keys' requests is not refused, and no
    count grows past what HINCRBY takes."""
    huge = [10**16, 10**16, 1, ONE, -1, -1, -1, 1e9, 0.0, "ever"]
    replies = _unpack(await client.eval(_APPLY, *counters_call([], [*huge, *reservation(TWO)])))
    assert [reply[0] for reply in replies] == [1, 1]  # both admitted
    assert [int(v) for v in await client.hvals(f"{ONE}:t")] == [10**12]
    assert [int(v) for v in await client.hvals(f"{ONE}:held")] == [10**12]


@pytest.mark.parametrize("record", [b"not a number", None], ids=["not-a-number", "a-hash"])
async def test_a_sync_record_that_is_not_one_is_replaced(
    client: aioredis.Redis, record: bytes | None
) -> None:
    """This instance's record of syncs is no number, or of another type: as if none were kept
    (as when it expired), reported after the deployments' answers and replaced; the sync
    counted (it was refused whole, for every later sync of this instance, until deleted)."""
    key = f"{PREFIX}:applied:{ME}:deployments"
    await (client.set(key, record) if record else client.hset(key, "x", "1"))
    totals = await client.eval(_SYNC, *deployments_call((1, 10, 1)))
    assert totals[:3] == [1, 10, 0] and totals[3] == key.encode() and totals[4]
    assert await client.get(key) == b"1"
    assert await client.eval(_SYNC, *deployments_call((1, 10, 1))) == [1, 10, 0]  # sent again


async def test_a_sync_record_that_is_not_one_is_replaced_not_refused(
    start_control: Any,
    redis_url: str,
    upstream_base: str,
    client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the gateway: the sync meeting a record of another type counts what it
    carries, Redis not given up for it; the record counted as unusable, and replaced."""
    monkeypatch.setattr(deployments_module, "SYNC_INTERVAL", 3600.0)  # only the test's syncs
    capped = upstream_model("gpt-test", upstream_base, rpm=100)  # its counts are shared
    control: Control = await start_control(
        state={"redis_url": redis_url, "prefix": PREFIX}, models=[capped]
    )
    link, deployments = control.server.app[link_key], control.server.app[deployments_key]
    record = f"{PREFIX}:applied:{link.instance}:deployments"
    await client.hset(record, "not", "a number")
    for _ in range(2):
        assert (await post_chat(control, MASTER_KEY))[0] == 200
        await deployments.sync()
    requests = f"{PREFIX}:d:{deployment(control, 'gpt-test').key}:r"
    assert sum(int(count) for count in await client.hvals(requests)) == 2
    assert link.up and link.failures == 0 and link.unusable == 1
    assert await client.get(record) == b"2"


@pytest.mark.parametrize("case", BROKEN_HASHES)
async def test_a_broken_deployment_key_fails_its_deployment_alone(
    start_control: Any,
    redis_url: str,
    upstream_base: str,
    client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    """Two instances: a hash of deployment gpt-test's in Redis cannot be used. gpt-capped's
    counts are still shared (they all were not: the sync failed whole); gpt-test is counted by
    each instance alone (the others' share 0), nothing written for it, Redis not given up, the
    key counted and logged (named; no secret). Once it is deleted, gpt-test syncs again."""
    monkeypatch.setattr(deployments_module, "SYNC_INTERVAL", 3600.0)  # only the test's syncs
    models = [
        upstream_model("gpt-test", upstream_base, rpm=100),  # capped: its counts are shared
        upstream_model("gpt-capped", upstream_base, rpm=100),
    ]
    state = {"redis_url": redis_url, "prefix": PREFIX}
    first: Control = await start_control(state=state, models=models, metrics={"enabled": True})
    second: Control = await start_control(state=state, models=models)
    link = first.server.app[link_key]
    suffix, setup = BROKEN_HASHES[case]
    broken = f"{PREFIX}:d:{deployment(first, 'gpt-test').key}{suffix}"
    await setup(client, broken)

    async def held_for_it() -> dict[bytes, Any]:  # what Redis holds for gpt-test
        return {
            key: held for key, held in (await keyspace(client)).items() if b":d:gpt-test" in key
        }

    before = await held_for_it()

    async def post(model: str) -> None:
        assert (await post_chat(first, MASTER_KEY, model=model))[0] == 200

    async def synced() -> None:  # what the background syncs do
        await first.server.app[deployments_key].sync()
        await second.server.app[deployments_key].sync()

    with caplog.at_level(logging.ERROR, logger="aioproxy"):
        for model in ("gpt-test", "gpt-capped", "gpt-capped"):
            await post(model)
        await synced()
    assert shared_requests(second, "gpt-capped") == 2
    assert shared_requests(second, "gpt-test") == 0
    assert await held_for_it() == before  # nothing written for it: its one key as it was
    assert await client.ttl(broken) == -1  # nor an expiry
    assert link.up and link.failures == 0 and link.unusable == 1
    assert second.server.app[link_key].unusable == 1  # met by its sync too
    logged = [r.getMessage() for r in caplog.records if "deployment's counts" in r.getMessage()]
    assert len(logged) == 2 and all(broken in message for message in logged)
    assert UPSTREAM_KEY not in caplog.text
    async with first.session.get(
        first.url("/metrics"), headers={"Authorization": f"Bearer {MASTER_KEY}"}
    ) as response:
        assert "aioproxy_state_redis_unusable_keys_total 1.0" in await response.text()
    await client.delete(broken)
    await post("gpt-test")
    await synced()
    assert shared_requests(second, "gpt-test") == 1  # the one after (the one before dropped)
    assert shared_requests(second, "gpt-capped") == 2


def deployment(control: Control, model: str) -> Deployment:
    (only,) = control.server.app[runtime_key].deployments[model]
    return only


def shared_requests(control: Control, model: str) -> int:
    """The other instances' requests to ``model``'s deployment in the last minute, as this
    instance's router mirrors them."""
    runtime = control.server.app[runtime_key]
    return runtime.router.health(deployment(control, model)).shared_requests


async def test_each_key_read_once_counts_as_before(client: aioredis.Redis) -> None:
    """The script reads each key once and computes on what it read: a window's buckets older
    than a minute are dropped and the rest counted, a dead instance's requests in flight are
    dropped and a live one's counted, the settle's change lands in this second's bucket."""
    now = int((await client.time())[0])
    await client.hset(f"{ONE}:r", mapping={now - 120: 7, now - 30: 4})
    await client.hset(f"{ONE}:t", mapping={now - 120: 70, now - 30: 40})
    await client.hset(f"{ONE}:flights", mapping={"dead": 3, "live": 2, ME: 1})
    await client.set(f"{PREFIX}:alive:live", 1)
    call = counters_call(settle(ONE, delta=-4), reservation(ONE))
    ((admitted, _, requests, tokens),) = _unpack(await client.eval(_APPLY, *call))
    # 4 + this one; 40 + the settle's -4 + this one's 10 (the dead instance's 3 slots not held)
    assert (admitted, requests, tokens) == (1, 5, 46)
    for name in ("r", "t"):  # the old bucket dropped, the other kept, this second's added
        seconds = sorted(int(field) for field in await client.hkeys(f"{ONE}:{name}"))
        assert len(seconds) == 2 and seconds[0] == now - 30 and seconds[1] >= now
    # this instance: its one freed by the settle, one taken by the reservation
    assert await client.hgetall(f"{ONE}:flights") == {b"live": b"2", ME.encode(): b"1"}


async def test_an_in_flight_change_met_by_a_broken_hash_is_not_lost_for_good(
    start_control: Any,
    redis_url: str,
    upstream_base: str,
    client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deployment whose hash the sync cannot use has its change since the last sync dropped.
    For requests and tokens (windows of a minute) that is a loss that passes;
    the in-flight change is a level kept by deltas: one dropped stays in this instance's field of
    ``<prefix>:d:<deployment>:f`` for good once the key is fixed (its EXPIRE renewed by every
    sync, its field dropped only when this instance's lease runs out), and every other instance
    counts it in its "others' requests in flight" (least-busy's figure off for as long)."""
    monkeypatch.setattr(deployments_module, "SYNC_INTERVAL", 3600.0)  # only the test's syncs
    models = [upstream_model("gpt-test", upstream_base, rpm=100)]
    control = await start_control(state={"redis_url": redis_url, "prefix": PREFIX}, models=models)
    link, deployments = control.server.app[link_key], control.server.app[deployments_key]
    key = deployment(control, "gpt-test").key
    base = f"{PREFIX}:d:{key}"
    await client.set(f"{base}:r", "not a hash")  # broken while a request starts
    deployments._add(key, 1, 0, 1)  # what the router's count of a request that starts does
    await deployments.sync()
    assert link.unusable == 1
    await client.delete(f"{base}:r")  # deleted, as the log asks
    deployments._add(key, 0, 10, -1)  # the request ends
    await deployments.sync()
    # Nothing is in flight on this instance: its share of the in-flight hash is 0, not -1
    # (which the other instances would add to their figure until this one stops).
    assert int(await client.hget(f"{base}:f", link.instance) or 0) == 0
