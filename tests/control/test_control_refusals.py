"""Requests refused for what they asked (a model their key may not use, or one not served) count
toward rpm as a refused body does; every ``before_refusal`` implementation runs; and values a
client or a budget period chooses cannot fail Redis's counters for everyone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from aioproxy import BadRequest, Call, hookimpl
from tests.control.conftest import Control
from tests.control.test_control_body_rpm import assert_over_rpm, limited, send
from tests.redis_server import redis_server, redis_url

__all__ = ["limited", "redis_server", "redis_url"]  # the fixtures


def chat(model: str) -> bytes:
    return f'{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}]}}'.encode()


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [("gpt-elsewhere", 404, "model_not_found"), ("gpt-test", 403, None)],
    ids=["not-served", "not-allowed"],
)
async def test_a_refused_model_counts_toward_rpm(
    limited: Control, model: str, status: int, code: str | None
) -> None:
    allowed = ["gpt-other"] if status == 403 else None  # gpt-test: not this key's
    key = (await limited.new_key(rpm=2, models=allowed))["key"]
    for remaining in ("1", "0"):
        got, headers, answer = await send(limited, key, chat(model))
        assert got == status, answer
        if code is not None:
            assert answer["error"]["code"] == code
        assert headers["x-ratelimit-remaining-requests"] == remaining  # counted
    got, _, answer = await send(limited, key, chat(model))
    assert_over_rpm(got, answer)  # over its rpm: the 429 first


class RefusingOnceRouted:
    """A plugin refusing a request after the limits counted it (``before_request``, last)."""

    @hookimpl(trylast=True)
    def before_request(self, call: Call) -> None:
        if call.get("user") == "refuse me":
            raise BadRequest("Refused once routed", code="refused_once_routed")


async def test_a_refusal_once_routed_is_not_counted_twice(start_control: Any) -> None:
    control = await start_control(plugins=(RefusingOnceRouted(),))
    key = (await control.new_key(rpm=3))["key"]
    status, headers, answer = await send(
        control, key, chat("gpt-test")[:-1] + b', "user": "refuse me"}'
    )
    assert status == 400 and answer["error"]["code"] == "refused_once_routed"
    status, headers, _ = await send(control, key)
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "1"  # 2, not 3


class OwnAnswer:
    """An operator's plugin answering a bad body its own way (as the hookspec allows)."""

    @hookimpl
    def before_refusal(self, call: Call, error: Exception) -> None:
        raise BadRequest("Your body is not JSON (our own wording)", code="our_own_code")


class Failing:
    """A plugin whose before_refusal has a bug."""

    @hookimpl(tryfirst=True)
    def before_refusal(self, call: Call) -> None:
        raise RuntimeError("a plugin's bug")


class Recorder:
    def __init__(self) -> None:
        self.heard: list[int] = []

    @hookimpl(trylast=True)
    def before_refusal(self, call: Call, error: Exception) -> None:
        self.heard.append(getattr(error, "status", 0))


async def test_every_before_refusal_runs_and_the_first_raised_answers(
    start_control: Any,
) -> None:
    recorder = Recorder()
    control = await start_control(plugins=(OwnAnswer(), Failing(), recorder))
    key = (await control.new_key(rpm=2))["key"]
    for _ in range(2):  # the operator's answer, and the limits still count each
        status, _, answer = await send(control, key, b"{")
        assert status == 400 and answer["error"]["code"] == "our_own_code"
    status, _, answer = await send(control, key, b"{")  # the limits' 429 is raised after it
    assert status == 400 and answer["error"]["code"] == "our_own_code"
    status, _, answer = await send(control, key)
    assert_over_rpm(status, answer)  # three refused requests counted against rpm = 2
    assert recorder.heard == [400, 400, 400]  # heard every one, the plugins' raising or not


async def test_the_limits_429_reaches_a_later_before_refusal(start_control: Any) -> None:
    recorder = Recorder()
    control = await start_control(plugins=(recorder,))
    key = (await control.new_key(rpm=1))["key"]
    assert (await send(control, key, b"{"))[0] == 400
    assert (await send(control, key, b"{"))[0] == 429
    assert recorder.heard == [400, 400]


async def test_a_huge_max_tokens_fails_no_other_request_in_redis(
    start_control: Any, redis_url: str
) -> None:
    """A max_tokens past what msgpack packs (2**64) is counted as the most a request counts:
    neither its batch's other requests nor any later one fail or hang."""
    control = await start_control(state={"redis_url": redis_url, "prefix": "huge"})
    huge = (await control.new_key(rpm=100))["key"]
    other = (await control.new_key(rpm=100))["key"]
    asking = asyncio.create_task(
        send(control, huge, chat("gpt-test")[:-1] + b', "max_tokens": 100000000000000000000}')
    )
    counters = control.plane.shared
    async with asyncio.timeout(30):  # a hang guard only
        while not counters._waiting:  # the huge reservation waits for its batch
            await asyncio.sleep(0)
    async with asyncio.timeout(30):  # a hang guard only (a wedged batcher answers nobody)
        (status, _, _), (other_status, _, _) = await asyncio.gather(asking, send(control, other))
    assert (status, other_status) == (200, 200)
    assert (await send(control, other))[0] == 200


async def test_a_long_budget_period_keeps_the_shared_limits(
    start_control: Any, redis_url: str
) -> None:
    """A budget period of 30000 days (its spend's TTL past 2**31 s) settles in Redis: the
    request's slot is freed, so the next request of a max_parallel = 1 key is served."""
    prefix = "long"
    control = await start_control(state={"redis_url": redis_url, "prefix": prefix})
    created = await control.new_key(max_parallel=1, max_budget=100.0, budget_duration="30000d")
    flights = f"{prefix}:k:{created['id']}:flights"
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert (await send(control, created["key"]))[0] == 200
        async with asyncio.timeout(30):  # a hang guard only
            while sum(int(count) for count in await client.hvals(flights)) != 0:
                await asyncio.sleep(0.01)  # until the release's settle has run in Redis
        assert (await send(control, created["key"]))[0] == 200
        spent = await client.keys(f"{prefix}:k:{created['id']}:s:*")
        assert len(spent) == 1 and 0 < await client.ttl(spent[0]) <= 2**31 - 1
    finally:
        await client.aclose()


async def test_a_call_that_cannot_be_packed_fails_alone(
    start_control: Any, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Should a number past what msgpack packs reach the counters anyway (a bug: the limits
    bound every one), its call fails alone and logs; the next batch is counted in Redis."""
    control = await start_control(state={"redis_url": redis_url, "prefix": "unpacked"})
    key = await control.new_key(rpm=100)
    assert (await send(control, key["key"]))[0] == 200
    counters = control.plane.shared
    scopes = counters._prepared[key["id"]].scopes
    counters.settle(scopes, 2**70, 0, 0.0, None)  # a delta no word can carry
    async with asyncio.timeout(30):  # a hang guard only
        while counters._settles:  # until its batch took it (a request then would share it)
            await asyncio.sleep(0)
        status, headers, _ = await send(control, key["key"])
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "98"  # in Redis
    assert "could not be packed" in caplog.text


class AiohttpAnswer:
    """A plugin answering with aiohttp's own HTTP error, which the error middleware renders."""

    @hookimpl
    def before_refusal(self, call: Call) -> None:
        raise web.HTTPPaymentRequired(text="pay first")


async def test_an_aiohttp_error_a_before_refusal_raises_answers(start_control: Any) -> None:
    control = await start_control(plugins=(AiohttpAnswer(),))
    key = (await control.new_key(rpm=5))["key"]
    status, headers, answer = await send(control, key, b"{")
    assert status == 402 and answer["error"]["message"]
    assert headers["x-ratelimit-remaining-requests"] == "4"  # the limits counted it still
