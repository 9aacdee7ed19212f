"""Limits under concurrency, end to end on SQLite and PostgreSQL, on one process and on a real
Redis. Budgets: each request reserves its estimated cost before its call, so requests in
flight at once cannot together spend past the budget; the real cost replaces the reservation
after, and an error or a client gone releases it. And a key over its tpm is still answered
from the response cache: a cached answer spends no tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.control.conftest import CHAT, PRICE, Control
from tests.redis_server import redis_server, redis_url
from tests.support import HeldUpstream

__all__ = ["redis_server", "redis_url"]  # the fixtures, used here

MAX_TOKENS = 10_000
# A request's reserved cost: its output cap at the output price, plus its prompt (a few
# dozen bytes: under 0.0001 USD), so between these two.
ESTIMATE_LOW = MAX_TOKENS * PRICE["output"] / 1e6
ESTIMATE_HIGH = ESTIMATE_LOW + 0.0001


@pytest.fixture
def fake() -> HeldUpstream:
    return HeldUpstream()


@pytest.fixture
async def released(fake: HeldUpstream) -> AsyncIterator[HeldUpstream]:
    """The held fake, released whatever the test did (no handler left waiting)."""
    yield fake
    fake.release.set()


StartInstances = Callable[..., Awaitable[list[Control]]]


@pytest.fixture(params=["one process", "redis"])
def start_instances(request: pytest.FixtureRequest, start_control: Any) -> StartInstances:
    """``n`` instances on one database: one process counting on its meters (the same one ``n``
    times), or ``n`` counting in one Redis. Upstream errors are not retried."""
    shared = request.param == "redis"
    state = {"redis_url": request.getfixturevalue("redis_url")} if shared else {}

    async def start(n: int, **overrides: Any) -> list[Control]:
        overrides["router"] = {"num_retries": 0}
        if not shared:
            return [await start_control(**overrides)] * n
        return [await start_control(state=state, **overrides) for _ in range(n)]

    return start


async def post_chat(control: Control, key: str, **overrides: Any) -> tuple[int, Any]:
    status, _, body = await post_chat_headers(control, key, **overrides)
    return status, body


async def post_chat_headers(
    control: Control, key: str, **overrides: Any
) -> tuple[int, dict[str, str], Any]:
    async with control.session.post(
        control.url("/v1/chat/completions"),
        json={**CHAT, "max_tokens": MAX_TOKENS, **overrides},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        return response.status, dict(response.headers), await response.json()


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(30):  # safety net: each step takes milliseconds
        while not condition():
            await asyncio.sleep(0.01)


def cost_of(usage: dict[str, int]) -> float:
    return (
        usage["prompt_tokens"] * PRICE["input"] + usage["completion_tokens"] * PRICE["output"]
    ) / 1e6


async def test_requests_in_flight_at_once_spend_within_the_budget(
    start_instances: StartInstances, released: HeldUpstream
) -> None:
    """20 requests at once against a budget worth 2.5 of their estimates: the first three are
    admitted (with 0, 1 and 2 estimates reserved in flight, each under the budget), the other
    17 refused (insufficient_quota) while those are in flight. Without the reservation all 20
    were admitted: nothing was spent yet when they came.

    The bound: spend < max_budget + one request's cost when no request costs more than its
    estimate (an output cap and a prompt not underestimated), as here."""
    fake = released
    budget = 2.5 * ESTIMATE_LOW
    instances = await start_instances(2)
    first = instances[0]
    created = await first.new_key(max_budget=budget)
    await instances[1].plane.cache.reload()
    tasks = [asyncio.create_task(post_chat(instances[i % 2], created["key"])) for i in range(20)]
    await until(lambda: fake.held + sum(task.done() for task in tasks) == 20)
    refused = [task.result() for task in tasks if task.done()]
    assert fake.held == 3 and len(refused) == 17
    assert all(status == 429 for status, _ in refused)
    assert {body["error"]["code"] for _, body in refused} == {"insufficient_quota"}
    # While they are in flight, the budget they hold refuses any other request.
    status, body = await post_chat(first, created["key"])
    assert status == 429 and body["error"]["code"] == "insufficient_quota"

    fake.holding = False
    fake.release.set()
    answers = [result for result in await asyncio.gather(*tasks) if result[0] != 429]
    assert [status for status, _ in answers] == [200] * 3
    spent = sum(cost_of(body["usage"]) for _, body in answers)
    # Finished under budget (each cost far less than its estimate): admitted again.
    status, body = await post_chat(instances[1], created["key"])
    assert status == 200
    spent += cost_of(body["usage"])
    for control in instances:
        await control.settle()
    await first.plane.cache.refresh()  # what the other instance wrote, as the poll reads it
    shown = await first.admin("GET", f"/admin/keys/{created['id']}")
    assert shown["spend"] == pytest.approx(spent)
    assert shown["spend"] < budget + max(cost_of(body["usage"]) for _, body in answers)


async def test_an_error_or_a_client_gone_releases_the_reservation(
    start_instances: StartInstances, released: HeldUpstream
) -> None:
    """A budget worth 1.5 estimates admits a second request while one is in flight, not a
    third. A request that fails upstream, or whose client leaves, gives its reservation back
    (and is not charged): the next is admitted."""
    fake = released
    (control,) = await start_instances(1)
    created = await control.new_key(max_budget=1.5 * ESTIMATE_LOW)
    key = created["key"]
    in_flight = asyncio.create_task(post_chat(control, key))
    await until(lambda: fake.held == 1)

    fake.holding = False
    fake.faults = ["status:500"]
    status, body = await post_chat(control, key)
    assert status >= 500 and body["error"]
    # Its reservation went back: one estimate in flight, under 1.5.
    fake.holding = True
    gone = asyncio.create_task(post_chat(control, key))
    await until(lambda: fake.held == 2)
    status, body = await post_chat(control, key)
    assert status == 429 and body["error"]["code"] == "insufficient_quota"

    gone.cancel()  # its client leaves while it is in flight
    await wait_released(control, created["id"], ESTIMATE_LOW)
    fake.holding = False
    status, _ = await post_chat(control, key)
    assert status == 200
    fake.release.set()
    status, body = await in_flight
    assert status == 200
    await control.settle()
    shown = await control.admin("GET", f"/admin/keys/{created['id']}")
    assert shown["spend"] == pytest.approx(2 * cost_of(body["usage"]))  # only the two answered


async def wait_released(control: Control, key_id: str, left: float) -> None:
    """Until the key's reserved cost is at most ``left`` USD: on this process's meter, or in
    Redis (a settle goes with the next batch)."""
    shared = control.plane.shared
    if shared is None:
        meter = control.plane.cache.key_meters[key_id]
        await until(lambda: meter.held * 1e-9 <= left + 0.0001)
        return
    client = aioredis.Redis.from_url(shared.link.config.redis_url)
    try:
        async with asyncio.timeout(30):  # safety net: the settle goes in milliseconds
            while True:
                held = await client.hvals(f"{shared.link.prefix}:k:{key_id}:held")
                if sum(int(value) for value in held) * 1e-9 <= left + 0.0001:
                    return
                await asyncio.sleep(0.01)
    finally:
        await client.aclose()


async def test_a_key_over_its_tpm_is_answered_from_the_cache(
    start_instances: StartInstances, released: HeldUpstream
) -> None:
    """A cached answer counts toward the key's rpm, not its tpm: a key whose tokens are used
    up is answered from the cache (it got 429 before the cache was asked), and refused for a
    request the cache cannot answer."""
    fake = released
    fake.holding = False
    (control,) = await start_instances(1, cache={"enabled": True})
    created = await control.new_key(tpm=100_000)
    asked = {"temperature": 0, "max_tokens": 20}  # deterministic: cacheable
    status, headers, _ = await post_chat_headers(control, created["key"], **asked)
    assert status == 200 and headers["x-aioproxy-cache"] == "miss"
    reserved = 100_000 - int(headers["x-ratelimit-remaining-tokens"])
    # Room for one reservation, not for it on top of the answer's usage still in the window.
    await control.admin("PATCH", f"/admin/keys/{created['id']}", {"tpm": reserved + 1})

    status, headers, body = await post_chat_headers(control, created["key"], **asked)
    assert status == 200, body
    assert headers["x-aioproxy-cache"] == "hit"
    other = {**asked, "messages": [{"role": "user", "content": "not cached"}]}
    status, headers, body = await post_chat_headers(control, created["key"], **other)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert "tokens a minute" in body["error"]["message"]
    assert len(fake.requests) == 1  # the upstream answered the first only
