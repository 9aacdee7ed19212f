"""The Redis batcher on a real Redis: calls issued while a batch is on its way share the next
round trip, and a settle is queued, not waited for."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import make_mocked_request
from redis.exceptions import DataError

from aioproxy.config import Secret, StateConfig
from aioproxy.control.clock import ControlClock
from aioproxy.control.limits import RESERVATION
from aioproxy.control.meters import KeyLimits, Meter
from aioproxy.control.records import KeyEntry
from aioproxy.errors import RateLimited
from aioproxy.state import batch as batch_module
from aioproxy.state.batch import Batcher, LuaScript
from aioproxy.state.counters import SharedCounters, SharedReservation
from aioproxy.state.deployments import _SYNC
from aioproxy.state.link import RedisLink
from tests.redis_server import redis_server, redis_url

__all__ = ["redis_server", "redis_url"]  # the fixtures, used here

ECHO = LuaScript("return ARGV[1]")


@pytest.fixture(params=["direct", "by redis-py"])
def driven(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Batches packed and read by the batcher itself, or (a redis-py whose insides it does not
    know) through redis-py's public connection methods: both give the same results."""
    if request.param == "by redis-py":
        monkeypatch.setattr(batch_module, "_drivable", lambda client: False)
    return str(request.param)


async def test_calls_queued_during_a_round_trip_share_the_next(redis_url: str, driven: str) -> None:
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


async def test_a_connection_the_server_closed_is_replaced_before_a_batch(
    redis_url: str, driven: str
) -> None:
    """Its connection closed by Redis between two batches (a restart, a client kill): the next
    batch goes on a new one, not on the closed one (a failed batch: its requests on the
    fallback)."""
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(client, timeout=5.0)
    try:
        batcher_id = await batcher.command("CLIENT", "ID")
        assert await client.client_kill_filter(_id=batcher_id) == 1
        for _ in range(50):  # its end of the connection sees the close
            await asyncio.sleep(0.01)
            connection = batcher._connection
            assert connection is not None
            if connection._reader is not None and connection._reader.at_eof():
                break
        assert await batcher.command("SET", "aioproxy-test:after-kill", "1") == b"OK"
        assert await client.get("aioproxy-test:after-kill") == b"1"
    finally:
        await client.delete("aioproxy-test:after-kill")
        await batcher.close()
        await client.aclose()


async def test_only_the_scripts_redis_did_not_know_are_sent_again(
    redis_url: str, driven: str
) -> None:
    """A batch where one script is unknown to Redis (new, or its script cache was flushed
    since) and another is known: the known one ran; only the unknown one goes again, after
    its load. The whole batch went again: every other call ran twice (a reservation counted
    twice, its slot freed once: a max_parallel slot lost for good)."""
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(client, timeout=5.0)
    count = LuaScript("return redis.call('INCR', KEYS[1])")
    unknown = LuaScript(f"return '{os.urandom(8).hex()}'")  # never loaded before
    try:
        await client.script_load(count.text)
        counted, new = batcher.run(count, ["aioproxy-test:once"], []), batcher.run(unknown, [], [])
        assert await counted == 1 and await new
        assert await client.get("aioproxy-test:once") == b"1"
    finally:
        await client.delete("aioproxy-test:once")
        await batcher.close()
        await client.aclose()


async def test_an_error_reply_fails_only_its_call(redis_url: str, driven: str) -> None:
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


@pytest.mark.parametrize("encoding", ["", "?encoding=latin-1"])
async def test_words_are_sent_as_redis_py_encodes_them(redis_url: str, encoding: str) -> None:
    """Packed by hiredis, not redis-py's encoder: the same bytes (str as UTF-8, numbers as
    their repr; another encoding set in the URL is redis-py's to apply), and a word of no
    type Redis takes fails its batch (DataError), not the batcher: the next batch is sent."""
    client = aioredis.Redis.from_url(redis_url + encoding)
    batcher = Batcher(client, timeout=5.0)
    words: list[Any] = ["café", 42, -7, 0.1, 1e20, b"\x00\xff"]
    try:
        for i, word in enumerate(words):
            await batcher.command("SET", f"aioproxy-test:word:{i}", word)
        sent = [await client.get(f"aioproxy-test:word:{i}") for i in range(len(words))]
        assert sent == [client.get_encoder().encode(word) for word in words]
        with pytest.raises(DataError):
            await batcher.command("SET", "aioproxy-test:word:none", None)
        assert await batcher.command("GET", "aioproxy-test:word:1") == b"42"
    finally:
        await client.delete(*(f"aioproxy-test:word:{i}" for i in range(len(words))))
        await batcher.close()
        await client.aclose()


# Keeps Redis busy for 0.3 s: a batch holding it outlives a short timeout.
BUSY = LuaScript(
    "local t = redis.call('TIME') local until_ = t[1] * 1e6 + t[2] + 300000 "
    "while true do local n = redis.call('TIME') if n[1] * 1e6 + n[2] > until_ then break end "
    "end return 1"
)


async def test_a_batch_past_the_timeout_fails_and_the_next_is_sent(
    redis_url: str, driven: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(client, timeout=0.1)
    try:
        await client.script_load(BUSY.text)
        with pytest.raises(TimeoutError):
            await batcher.run(BUSY, [], [])
        await asyncio.sleep(0.5)  # the script ends; its reply went with the dropped connection
        assert await batcher.command("PING") == b"PONG"
        assert batcher.batches == 2
    finally:
        await batcher.close()
        await client.aclose()


async def test_closing_cancels_the_calls_on_their_way(redis_url: str) -> None:
    """Cancelled (closing), not failed: no fallback, no 'Redis lost' for a shutdown."""
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(client, timeout=5.0)
    try:
        await client.script_load(BUSY.text)
        busy = batcher.run(BUSY, [], [])
        await asyncio.sleep(0.1)  # written; Redis runs it
        await batcher.close()
        assert busy.cancelled()
        await asyncio.sleep(0.5)  # the script ends before the next test uses Redis
    finally:
        await client.aclose()


async def test_an_idle_batcher_sends_the_next_call_and_closes(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(client, timeout=5.0)
    try:
        assert await batcher.command("PING") == b"PONG"
        await asyncio.sleep(0.05)  # its sender waits for calls
        assert await batcher.command("ECHO", "again") == b"again"
    finally:
        await batcher.close()
        await client.aclose()
    assert batcher._sender is None


async def test_a_call_after_close_is_sent_and_leaves_no_sender_waiting(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(client, timeout=5.0)
    try:
        assert await batcher.command("PING") == b"PONG"
        await batcher.close()
        assert await batcher.command("ECHO", "late") == b"late"  # still answered
        await asyncio.sleep(0)  # its sender ends with that batch, as before close it waited
        assert batcher._sender is None
    finally:
        await batcher.close()
        await client.aclose()


def _limits(**limits: Any) -> KeyLimits:
    key = KeyEntry(
        id="key_batch", name="batch", digest="d", key_prefix="sk-", created_at=0.0, **limits
    )
    return KeyLimits(key, Meter(), None, None)


class _Call:
    """What ``reserve`` reads of a call: its request (for the headers) and its state."""

    def __init__(self) -> None:
        self.request = make_mocked_request("POST", "/v1/chat/completions")  # a real one
        self.state: dict[str, Any] = {}


async def _reserve(counters: SharedCounters, limits: KeyLimits) -> SharedReservation | None:
    """One request of 10 tokens: its reservation (RateLimited if refused; None: Redis failed)."""
    call = _Call()
    await counters.reserve(call, limits, 10)  # type: ignore[arg-type]
    reservation: SharedReservation | None = call.state.get(RESERVATION)
    return reservation


def _counters(redis_url: str, prefix: str) -> tuple[RedisLink, SharedCounters]:
    link = RedisLink(StateConfig(redis_url=Secret(redis_url), prefix=prefix))
    clock = ControlClock(time=lambda: 1_000.0, monotonic=lambda: 1_000.0)
    return link, SharedCounters(link, clock)


async def test_a_settle_is_queued_not_awaited(redis_url: str) -> None:
    link, counters = _counters(redis_url, "aioproxy-test-settle")
    limits = _limits(max_parallel=1)
    try:
        reservation = await _reserve(counters, limits)
        assert reservation is not None
        assert reservation.settle(10, 0.0, 0.0) is None  # type: ignore[func-returns-value]  # nothing to await
        # Queued before the next reservation, so it is counted first: the slot is free.
        assert await _reserve(counters, limits) is not None
    finally:
        await counters.close()
        await link.close()


async def _script_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


class _Requests:
    """Requests of one key in flight: each reserves, then settles when its event is set."""

    def __init__(self, counters: SharedCounters, limits: KeyLimits) -> None:
        self.counters = counters
        self.limits = limits
        self.admitted: list[SharedReservation] = []
        self.refused = 0
        self.answered = asyncio.Event()  # set when ``expected`` requests have their answer
        self.expected = 0
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, count: int, settle: asyncio.Event) -> None:
        self.expected += count
        self.answered.clear()
        self.tasks += [asyncio.create_task(self._one(settle)) for _ in range(count)]

    async def _one(self, settle: asyncio.Event) -> None:
        try:
            reservation = await _reserve(self.counters, self.limits)
        except RateLimited:
            self.refused += 1
            reservation = None
        if reservation is not None:
            self.admitted.append(reservation)
        if len(self.admitted) + self.refused == self.expected:
            self.answered.set()
        if reservation is not None:
            await settle.wait()
            reservation.settle(7, 0.5, 1_000.0)


async def test_concurrent_requests_share_one_script_call(redis_url: str) -> None:
    """A batch's reservations are checked in one script call, in order and exactly, and the
    settles queued meanwhile go in the next as one merged settle, not one call per request."""
    client = aioredis.Redis.from_url(redis_url)
    link, counters = _counters(redis_url, "aioproxy-test-merge")
    requests = _Requests(counters, _limits(max_parallel=5))
    first, later = asyncio.Event(), asyncio.Event()
    try:
        await client.config_resetstat()
        requests.start(20, settle=first)
        await requests.answered.wait()
        assert (len(requests.admitted), requests.refused) == (5, 15)  # max_parallel, exactly
        requests.start(5, settle=later)
        first.set()  # the first 5 settle in the same turn: counted before the 5 new ones
        await requests.answered.wait()
        assert (len(requests.admitted), requests.refused) == (10, 15)
        assert await _script_calls(client) == 2  # was 30: 20 reserves, 5 settles, 5 reserves
        base = "aioproxy-test-merge:k:key_batch"
        assert await client.hvals(base + ":flights") == [b"5"]  # this instance's requests in flight
        tokens = await client.hvals(base + ":t")
        assert sum(int(value) for value in tokens) == 5 * 7 + 5 * 10
        assert await client.get(base + ":s:ever") == b"2.5"
    finally:
        later.set()
        await asyncio.gather(*requests.tasks)
        await counters.close()
        await link.close()
        await client.aclose()


async def test_a_request_cancelled_while_waiting_frees_its_slot(redis_url: str) -> None:
    """Counted in Redis after its request was gone (a client that hung up while the batch was
    on its way): its slot is freed at once, not held for ever."""
    link, counters = _counters(redis_url, "aioproxy-test-cancel")
    limits = _limits(max_parallel=1)
    try:
        gone = asyncio.create_task(_reserve(counters, limits))
        while counters.batcher.batches == 0:  # until its batch is on its way
            await asyncio.sleep(0)
        gone.cancel()
        assert await _reserve(counters, limits) is not None
    finally:
        await counters.close()
        await link.close()


async def test_close_sends_the_last_settles(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    link, counters = _counters(redis_url, "aioproxy-test-close")
    try:
        reservation = await _reserve(counters, _limits(max_parallel=1))
        assert reservation is not None
        reservation.settle(10, 0.0, 1_000.0)
        await counters.close()  # at once: the settle is still queued
        assert await client.hvals("aioproxy-test-close:k:key_batch:flights") == []  # none in flight
    finally:
        await link.close()
        await client.aclose()


async def test_settles_missed_while_down_are_sent_when_back(redis_url: str) -> None:
    link, counters = _counters(redis_url, "aioproxy-test-missed")
    limits = _limits(max_parallel=1)
    try:
        reservation = await _reserve(counters, limits)
        assert reservation is not None
        link.lost(OSError("gone"))  # the probe finds it back within half a second
        reservation.settle(10, 0.0, 1_000.0)  # kept: not sent while down
        async with asyncio.timeout(30):  # safety net: the probe pings every half second
            while not link.up:
                await asyncio.sleep(0.05)
        # The slot was freed in Redis when it came back, before this reservation.
        assert await _reserve(counters, limits) is not None
    finally:
        await counters.close()
        await link.close()


async def test_a_dead_instances_slots_are_freed(redis_url: str) -> None:
    """An instance killed with requests in flight holds their slots only as long as its
    lease: then the others stop counting them (they were held for an hour, locking a key
    with max_parallel out)."""
    client = aioredis.Redis.from_url(redis_url)
    killed_link, killed = _counters(redis_url, "aioproxy-test-dead")
    link, counters = _counters(redis_url, "aioproxy-test-dead")
    limits = _limits(max_parallel=1)
    try:
        assert await _reserve(killed, limits) is not None  # in flight when it dies
        with pytest.raises(RateLimited):  # alive: its slot counts on the other instance
            await _reserve(counters, limits)
        # It dies: nothing renews its lease, which runs out (as a DEL does at once).
        await killed_link.batcher.close()
        leases = await client.keys("aioproxy-test-dead:alive:*")
        assert len(leases) == 2
        await client.delete(f"aioproxy-test-dead:alive:{killed_link.instance}")
        assert await _reserve(counters, limits) is not None
    finally:
        await counters.close()
        await link.close()
        await client.aclose()


async def test_the_lease_lives_while_the_instance_does(redis_url: str) -> None:
    """Renewed from start-up (an idle instance's requests in flight keep counting), deleted
    on close (the others stop counting them at once)."""
    client = aioredis.Redis.from_url(redis_url)
    link = RedisLink(StateConfig(redis_url=Secret(redis_url), prefix="aioproxy-test-lease"))
    lease = f"aioproxy-test-lease:alive:{link.instance}"
    try:
        await link.start()
        async with asyncio.timeout(30):  # safety net: the first renewal is sent at once
            while not await client.exists(lease):
                await asyncio.sleep(0.01)
        assert 0 < await client.pttl(lease) <= link.lease_ms
        await link.close()
        assert not await client.exists(lease)
    finally:
        await link.close()
        await client.aclose()


async def test_a_dead_instances_deployment_flights_are_dropped(redis_url: str) -> None:
    """least-busy's requests in flight per deployment: a dead instance's stop counting when
    its lease runs out (they skewed routing away from the deployment for ever)."""
    client = aioredis.Redis.from_url(redis_url)
    dead = RedisLink(StateConfig(redis_url=Secret(redis_url), prefix="aioproxy-test-sync"))
    live = RedisLink(StateConfig(redis_url=Secret(redis_url), prefix="aioproxy-test-sync"))
    script = LuaScript(_SYNC)
    base = ["aioproxy-test-sync:d:deployment"]
    try:
        await dead.batcher.run(script, base, [*dead.lease, 1, 0, 0, 2])  # 2 sent, then it dies
        # The other instances' requests in flight, as the script answers them.
        assert (await live.batcher.run(script, base, [*live.lease, 1, 0, 0, 1]))[2] == 2
        await client.delete(f"aioproxy-test-sync:alive:{dead.instance}")  # its lease ran out
        assert (await live.batcher.run(script, base, [*live.lease, 2, 0, 0, 0]))[2] == 0
        assert await client.hgetall("aioproxy-test-sync:d:deployment:f") == {
            live.instance.encode(): b"1"
        }
    finally:
        await dead.close()
        await live.close()
        await client.aclose()


async def test_a_counter_left_by_an_earlier_version_is_no_error(redis_url: str) -> None:
    """Versions before the leases kept a plain counter (``:f``) where the hash is: a Redis
    they used (a rolling upgrade) must not fail every reservation with WRONGTYPE."""
    client = aioredis.Redis.from_url(redis_url)
    link, counters = _counters(redis_url, "aioproxy-test-upgrade")
    try:
        await client.set("aioproxy-test-upgrade:k:key_batch:f", 3)
        assert await _reserve(counters, _limits(max_parallel=1)) is not None
        assert link.up
    finally:
        await counters.close()
        await link.close()
        await client.aclose()


async def test_a_redis_refusing_writes_stays_lost_until_it_takes_them(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of memory under ``noeviction`` (or a read-only replica after a failover): Redis
    answers PING but refuses every script. It is lost once, logged once with its reason, and
    back only when it takes writes (a PING probe brought it back at once, and every request
    lost it again: a log line and a metric count each time)."""
    client = aioredis.Redis.from_url(redis_url)
    link, counters = _counters(redis_url, "aioproxy-test-oom")
    limits = _limits(max_parallel=100)
    try:
        await client.config_set("maxmemory", 1)  # the default policy: noeviction
        assert await _reserve(counters, limits) is None  # not counted in Redis: served
        async with asyncio.timeout(30):  # safety net: the probe tries every half second
            while link.probes < 2:
                await asyncio.sleep(0.05)
        for _ in range(3):
            assert await _reserve(counters, limits) is None
        assert not link.up and link.failures == 1
        lost = [r.getMessage() for r in caplog.records if "Redis is unreachable" in r.message]
        assert len(lost) == 1 and "used memory > 'maxmemory'" in lost[0]
        await client.config_set("maxmemory", 0)
        async with asyncio.timeout(30):  # safety net: likewise
            while not link.up:
                await asyncio.sleep(0.05)
        assert await _reserve(counters, limits) is not None
    finally:
        await client.config_set("maxmemory", 0)
        await counters.close()
        await link.close()
        await client.aclose()


async def test_a_stream_failing_midway_counts_its_usage_not_its_reservation(
    redis_url: str,
) -> None:
    """A stream that fails after it began gets ``on_error`` (its reserved tokens taken back),
    then ``after_response`` (its usage): the tokens counted are the usage alone. The taking
    back was dropped, so the reservation stayed counted toward tpm on top of the usage."""
    client = aioredis.Redis.from_url(redis_url)
    link, counters = _counters(redis_url, "aioproxy-test-midway")
    try:
        reservation = await _reserve(counters, _limits(max_parallel=1))  # 10 tokens
        assert reservation is not None
        reservation.count_tokens(0)  # on_error
        reservation.settle(7, 0.0, 1_000.0)  # after_response: the usage of what was sent
        await counters.close()  # the settle sent
        tokens = await client.hvals("aioproxy-test-midway:k:key_batch:t")
        assert sum(int(value) for value in tokens) == 7
    finally:
        await link.close()
        await client.aclose()


async def test_scripts_are_loaded_again_when_redis_is_back(redis_url: str) -> None:
    """A Redis restarted has no script: they are loaded as it is found back, before any
    request's batch (which paid a NOSCRIPT and a load round trip on its way upstream)."""
    client = aioredis.Redis.from_url(redis_url)
    link = RedisLink(StateConfig(redis_url=Secret(redis_url), prefix="aioproxy-test-reload"))
    script = LuaScript(f"return '{os.urandom(8).hex()}'")
    try:
        await link.preload(script)
        assert await client.script_exists(script.sha) == [True]
        await client.script_flush()  # as a restart does
        link.lost(OSError("gone"))
        async with asyncio.timeout(30):  # safety net: the probe tries every half second
            while not link.up:
                await asyncio.sleep(0.05)
        assert await client.script_exists(script.sha) == [True]
    finally:
        await link.close()
        await client.aclose()


async def _reserve_cost(counters: SharedCounters, limits: KeyLimits, held: int) -> Any:
    """One request reserving ``held`` nano-USD: its reservation (RateLimited if refused)."""
    call = _Call()
    await counters.reserve(call, limits, 10, held)  # type: ignore[arg-type]
    return call.state.get(RESERVATION)


async def test_the_cost_replaces_the_reservation_in_one_settle(redis_url: str) -> None:
    """The reserved cost counts toward the budget while in flight; the settle adds the cost
    and takes the reservation back in the same script."""
    client = aioredis.Redis.from_url(redis_url)
    link, counters = _counters(redis_url, "aioproxy-test-held")
    limits = _limits(max_budget=1.0)
    try:
        reservation = await _reserve_cost(counters, limits, 2_000_000_000)  # 2 USD > budget
        assert reservation is not None  # nothing in flight: admitted
        with pytest.raises(RateLimited) as refused:
            await _reserve_cost(counters, limits, 1)
        assert refused.value.code == "insufficient_quota"
        reservation.settle(10, 0.25, 1_000.0)  # it cost 0.25
        assert await _reserve_cost(counters, limits, 1) is not None  # 0.25 < 1
        assert await client.hvals("aioproxy-test-held:k:key_batch:held") == [b"1"]
    finally:
        await counters.close()
        await link.close()
        await client.aclose()


async def test_a_dead_instances_reserved_cost_is_dropped(redis_url: str) -> None:
    """The cost reserved by an instance killed with requests in flight counts only as long
    as its lease, as their slots do."""
    client = aioredis.Redis.from_url(redis_url)
    killed_link, killed = _counters(redis_url, "aioproxy-test-dead-held")
    link, counters = _counters(redis_url, "aioproxy-test-dead-held")
    limits = _limits(max_budget=1.0)
    try:
        assert await _reserve_cost(killed, limits, 2_000_000_000) is not None
        with pytest.raises(RateLimited):  # alive: its reservation counts on the other
            await _reserve_cost(counters, limits, 1)
        await killed_link.batcher.close()
        await client.delete(f"aioproxy-test-dead-held:alive:{killed_link.instance}")
        assert await _reserve_cost(counters, limits, 1) is not None
    finally:
        await counters.close()
        await link.close()
        await client.aclose()


class _DyingOnce:
    """The batcher's round trip, failing its first batch with an error that is not Redis's
    (a bug): once entered, it waits to be let go, so that the test queues beside it."""

    def __init__(self, batcher: Batcher) -> None:
        self.real = batcher._round_trip
        self.entered = asyncio.Event()
        self.go = asyncio.Event()
        self.calls = 0

    async def __call__(self, connection: Any, batch: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            await self.go.wait()
            raise RuntimeError("a bug in the batch's round trip")
        return await self.real(connection, batch)


async def test_a_reservation_queued_as_the_sender_died_is_sent_by_the_next(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The send task ended (a bug, not Redis) with a reservation queued behind its batch: the
    next request starts a new one, and both go (each reservation wakes the batcher, not the
    first of a batch alone, which would have left them waiting for the link's heartbeat)."""
    link, counters = _counters(redis_url, "aioproxy-test-sender-died")
    limits = _limits(max_parallel=10)
    try:
        assert await _reserve(counters, limits) is not None  # the script loaded, connected
        dying = counters.batcher._round_trip = _DyingOnce(counters.batcher)  # type: ignore[method-assign]
        first = asyncio.create_task(_reserve(counters, limits))
        await dying.entered.wait()  # its batch on its way
        sender = counters.batcher._sender
        assert sender is not None
        second = asyncio.create_task(_reserve(counters, limits))
        while not counters._waiting:  # queued behind it
            await asyncio.sleep(0)
        dying.go.set()
        with pytest.raises(RuntimeError):
            await first
        await sender  # it ended with the bug, said in the log
        assert counters.batcher._sender is None
        assert "the Redis batch sender failed" in caplog.text
        third = asyncio.create_task(_reserve(counters, limits))
        async with asyncio.timeout(60):  # hang guard only: both are sent at once
            assert await second is not None and await third is not None
    finally:
        await counters.close()
        await link.close()


async def test_a_settle_queued_as_the_sender_died_is_sent_by_the_next(redis_url: str) -> None:
    """The same for settles: the next one starts a sender, which sends both."""
    link, counters = _counters(redis_url, "aioproxy-test-settle-died")
    limits = _limits(max_parallel=10)
    try:
        one, two = await _reserve(counters, limits), await _reserve(counters, limits)
        assert one is not None and two is not None
        dying = counters.batcher._round_trip = _DyingOnce(counters.batcher)  # type: ignore[method-assign]
        first = asyncio.create_task(_reserve(counters, limits))
        await dying.entered.wait()
        sender = counters.batcher._sender
        assert sender is not None
        one.settle(10, 0.0, 1_000.0)  # merged behind the batch on its way
        dying.go.set()
        with pytest.raises(RuntimeError):
            await first
        await sender
        assert counters.batcher._sender is None and counters._settles  # waiting: no sender
        two.settle(10, 0.0, 1_000.0)
        async with asyncio.timeout(60):  # hang guard only
            while counters._settles or counters.batcher._sender is not None and dying.calls < 2:
                await asyncio.sleep(0.01)
        assert dying.calls == 2  # one batch sent them both
    finally:
        await counters.close()
        await link.close()
