"""A request refused for its body counts one request toward its key's and team's rpm (no slot,
no tokens, no cost), on this process's counters and in Redis: a client over its limit cannot
keep the gateway busy with bad requests and never be refused."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import make_mocked_request

from aioproxy.config import Secret, StateConfig
from aioproxy.control.clock import ControlClock
from aioproxy.control.limits import REQUEST_ONLY, RESERVATION
from aioproxy.control.meters import KeyLimits, Meter
from aioproxy.control.records import KeyEntry
from aioproxy.errors import RateLimited
from aioproxy.state.counters import SharedCounters
from aioproxy.state.link import RedisLink
from aioproxy.testing import assert_error_object
from tests.control.conftest import CHAT, Control, FakeControlClock
from tests.redis_server import RedisServer, redis_server, redis_url

__all__ = ["redis_server", "redis_url"]  # the fixtures, for the Redis-counted case

# Bodies refused with a 400 before any hook but authenticate sees them: (body, error code).
BAD_BODIES = [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_body"),
    (b'{"messages": []}', "missing_required_parameter"),  # no model
    (b'{"model": "gpt-test", "messages": "hi"}', "invalid_type"),
    (b'{"model": "gpt-test", "messages": [], "stream": "yes"}', "invalid_type"),
    (b"\xff\xfe", "invalid_encoding"),
]


async def send(
    control: Control, key: str, body: bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    """POST a chat body as raw bytes (None: a good request); status, headers, JSON."""
    async with control.session.post(
        control.url("/v1/chat/completions"),
        data=body,
        json=CHAT if body is None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    ) as response:
        return response.status, dict(response.headers), await response.json()


def assert_over_rpm(status: int, answer: Any) -> None:
    assert status == 429
    assert_error_object(answer, "rate_limit_exceeded")


@pytest.fixture(params=["process", "redis"])
async def limited(request: pytest.FixtureRequest, start_control: Any) -> Control:
    """A control plane counting rates on this process, or in Redis."""
    state = {"redis_url": request.getfixturevalue("redis_url")} if request.param == "redis" else {}
    return await start_control(state=state)


@pytest.mark.parametrize(("body", "code"), BAD_BODIES, ids=[code for _, code in BAD_BODIES])
async def test_a_bad_body_counts_toward_rpm(
    control: Control, clock: FakeControlClock, body: bytes, code: str
) -> None:
    key = (await control.new_key(rpm=3))["key"]
    for remaining in ("2", "1"):
        status, headers, answer = await send(control, key, body)
        assert status == 400 and answer["error"]["code"] == code
        assert headers["x-ratelimit-remaining-requests"] == remaining  # counted
        assert headers["x-ratelimit-reset-requests"] == "1m0s"
    status, headers, _ = await send(control, key)
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "0"
    status, headers, answer = await send(control, key, body)
    assert_over_rpm(status, answer)
    assert "rate limit of 3 requests" in answer["error"]["message"]
    assert int(headers["Retry-After"]) >= 1 and headers["x-ratelimit-remaining-requests"] == "0"
    clock.advance(61)  # the window empties: the 400 again, counted
    status, headers, _ = await send(control, key, body)
    assert status == 400 and headers["x-ratelimit-remaining-requests"] == "2"


async def test_bad_bodies_fill_the_window_then_are_refused(limited: Control) -> None:
    """In either counter: bad bodies count (a good request is then refused too), and once the
    window is full a bad body gets the 429, not its 400, without being counted again."""
    key = (await limited.new_key(rpm=2, tpm=100_000))["key"]
    for remaining in ("1", "0"):
        status, headers, _ = await send(limited, key, b"{not json")
        assert status == 400 and headers["x-ratelimit-remaining-requests"] == remaining
        assert headers["x-ratelimit-limit-tokens"] == "100000"
        assert headers["x-ratelimit-remaining-tokens"] == "100000"  # no tokens counted
    for body in (b"[]", None):
        status, headers, answer = await send(limited, key, body)
        assert_over_rpm(status, answer)
        assert headers["x-ratelimit-remaining-requests"] == "0" and "Retry-After" in headers


async def test_a_bad_body_counts_toward_its_teams_rpm(limited: Control) -> None:
    team = await limited.admin("POST", "/admin/teams", {"name": "t", "rpm": 2}, status=201)
    sender = (await limited.new_key(team=team["id"]))["key"]
    other = (await limited.new_key(team=team["id"]))["key"]
    assert (await send(limited, sender, b"{"))[0] == 400
    assert (await send(limited, other))[0] == 200
    status, _, answer = await send(limited, sender, b"{")
    assert_over_rpm(status, answer)
    assert "team" in answer["error"]["message"]
    status, _, answer = await send(limited, other)
    assert status == 429 and "team" in answer["error"]["message"]


async def test_a_bad_body_takes_no_slot_tokens_nor_cost(start_control: Any) -> None:
    """It is held to rpm alone: a key at max_parallel or out of budget still gets its 400,
    and nothing it counted is left in flight or reserved."""
    control = await start_control()
    created = await control.new_key(rpm=10, max_parallel=1, max_budget=0.000001)
    key = created["key"]
    for _ in range(3):
        assert (await send(control, key, b"{"))[0] == 400
    meter = control.plane.cache.key_meters[created["id"]]
    assert (meter.requests.count, meter.tokens.count, meter.in_flight, meter.held) == (3, 0, 0, 0)
    assert (await send(control, key))[0] == 200  # the slot and the budget were free
    assert (await send(control, key, b"{"))[0] == 400  # spent: the budget does not refuse it


async def test_in_redis_a_bad_body_takes_no_slot_nor_cost(
    start_control: Any, redis_url: str
) -> None:
    prefix = "aioproxy-test-body"
    control = await start_control(state={"redis_url": redis_url, "prefix": prefix})
    created = await control.new_key(rpm=10, max_parallel=1, max_budget=10.0)
    for _ in range(3):
        assert (await send(control, created["key"], b"{"))[0] == 400
    base = f"{prefix}:k:{created['id']}"
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert sum(int(count) for count in await client.hvals(base + ":r")) == 3
        assert sum(int(count) for count in await client.hvals(base + ":t")) == 0
        assert await client.hvals(base + ":flights") == []
        assert await client.hvals(base + ":held") == []
    finally:
        await client.aclose()
    assert (await send(control, created["key"]))[0] == 200  # its one slot was free


@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_while_redis_is_away_a_bad_body_is_counted_here_or_refused(
    start_control: Any, redis_url: str, redis_server: RedisServer, on_error: str
) -> None:
    """As every request of a limited key: counted on this process's counters ("open"), or
    refused while the limits cannot be checked ("closed")."""
    control = await start_control(state={"redis_url": redis_url, "on_error": on_error})
    key = (await control.new_key(rpm=1))["key"]
    redis_server.kill()
    status, headers, answer = await send(control, key, b"{")
    if on_error == "open":
        assert status == 400 and headers["x-ratelimit-remaining-requests"] == "0"
    else:
        assert_over_rpm(status, answer)
        assert "cannot be checked" in answer["error"]["message"]


async def test_a_key_without_rpm_is_not_counted(control: Control) -> None:
    key = (await control.new_key(tpm=1000))["key"]
    status, headers, _ = await send(control, key, b"{")
    assert status == 400 and "x-ratelimit-remaining-requests" not in headers


async def test_the_refusal_in_place_of_the_400_is_logged(
    control: Control, clock: FakeControlClock
) -> None:
    created = await control.new_key(rpm=1)
    assert (await send(control, created["key"], b"{"))[0] == 400
    assert (await send(control, created["key"], b"{"))[0] == 429
    await control.settle()
    rows = (await control.admin("GET", f"/admin/requests?key={created['id']}"))["data"]
    assert sorted((row["status"], row["error_code"]) for row in rows) == [
        (400, "invalid_json"),
        (429, "rate_limit_exceeded"),
    ]


class _Call:
    """What ``SharedCounters.reserve`` reads of a call: its request (for the headers) and its
    state."""

    def __init__(self) -> None:
        self.request = make_mocked_request("POST", "/v1/chat/completions")  # a real one
        self.state: dict[str, Any] = {}


async def test_a_bad_body_gone_while_counted_in_redis_frees_no_slot(redis_url: str) -> None:
    """A request counted toward rpm alone whose client left while its batch was on its way
    took no slot: none is freed for it (that would be another request's)."""
    link = RedisLink(StateConfig(redis_url=Secret(redis_url), prefix="aioproxy-test-body-gone"))
    counters = SharedCounters(link, ControlClock(time=lambda: 1_000.0, monotonic=lambda: 1_000.0))
    key = KeyEntry(
        id="key_gone", name="gone", digest="d", key_prefix="sk-", created_at=0.0, rpm=10,
        max_parallel=1,
    )  # fmt: skip
    limits = KeyLimits(key, Meter(), None, None)
    try:
        holder = _Call()
        await counters.reserve(holder, limits, 10)  # type: ignore[arg-type]
        assert RESERVATION in holder.state  # the one slot, held
        sent = counters.batcher.batches
        bare = asyncio.create_task(counters.reserve(_Call(), limits, 0, REQUEST_ONLY))  # type: ignore[arg-type]
        while counters.batcher.batches == sent:  # until its batch is on its way
            await asyncio.sleep(0)
        bare.cancel()
        with pytest.raises(RateLimited, match="max_parallel"):
            await counters.reserve(_Call(), limits, 10)  # type: ignore[arg-type]
    finally:
        await counters.close()
        await link.close()
