"""Identical cache misses arriving together call the upstream once ([cache], per instance):
the first goes upstream, the others wait for its answer and get it as a hit; when the first
fails or its client leaves, they go upstream themselves. The fake upstream holds every request
at its door until the test opens it, so what waits where is known, not timed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from aioproxy.cache.response_cache import in_flight_key
from aioproxy.testing import eventually
from tests.redis_server import redis_server, redis_url
from tests.support import MASTER_KEY, HeldUpstream, ServeProxy, gateway_config

__all__ = ["redis_server", "redis_url"]  # the fixtures, used here

CHAT = {
    "model": "gpt-test",
    "messages": [{"role": "user", "content": "coalesce me"}],
    "temperature": 0,
}
SAFETY = 30.0  # seconds: a safety net only; each wait ends as soon as its condition holds


@pytest.fixture
def fake() -> HeldUpstream:  # the upstream of conftest's upstream_base
    return HeldUpstream()


@pytest.fixture(params=["memory", "redis"])
async def proxy(
    request: pytest.FixtureRequest, serve_proxy: ServeProxy, upstream_base: str
) -> TestServer:
    state = {}
    if request.param == "redis":
        state = {"state": {"redis_url": request.getfixturevalue("redis_url"), "timeout": 10.0}}
    config = gateway_config(
        upstream_base, cache={"enabled": True}, router={"num_retries": 0}, **state
    )
    return await serve_proxy(config)


async def post(proxy: TestServer, body: dict[str, Any]) -> tuple[int, str | None, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.make_url("/v1/chat/completions"),
            json=body,
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
        ) as response,
    ):
        return response.status, response.headers.get("x-aioproxy-cache"), await response.read()


async def held_at_once(
    proxy: TestServer, fake: HeldUpstream, body: dict[str, Any], count: int
) -> list[asyncio.Task[tuple[int, str | None, bytes]]]:
    """``count`` identical requests sent together: the first at the upstream's door, the
    others waiting for its answer."""
    first = asyncio.ensure_future(post(proxy, body))
    await eventually(lambda: fake.arrived == 1, within=SAFETY)
    others = [asyncio.ensure_future(post(proxy, body)) for _ in range(count - 1)]
    await eventually(lambda: proxy.app[in_flight_key].waiting == count - 1, within=SAFETY)
    return [first, *others]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_identical_misses_call_the_upstream_once(
    proxy: TestServer, fake: HeldUpstream, stream: bool
) -> None:
    requests = await held_at_once(proxy, fake, {**CHAT, "stream": stream}, 5)
    fake.release.set()
    answers = await asyncio.gather(*requests)
    assert fake.arrived == 1 and len(fake.requests) == 1
    assert [(status, result) for status, result, _ in answers] == [(200, "miss")] + [
        (200, "hit")
    ] * 4
    assert len({body for _, _, body in answers}) == 1  # the same answer, byte for byte
    if stream:
        assert answers[0][2].endswith(b"data: [DONE]\n\n")
    assert proxy.app[in_flight_key].waiting == 0


async def test_a_stream_s_waiters_may_ask_for_json(proxy: TestServer, fake: HeldUpstream) -> None:
    """A waiter gets the first's answer in the form it asked for, as a hit would."""
    first = asyncio.ensure_future(post(proxy, {**CHAT, "stream": True}))
    await eventually(lambda: fake.arrived == 1, within=SAFETY)
    waiter = asyncio.ensure_future(post(proxy, CHAT))
    await eventually(lambda: proxy.app[in_flight_key].waiting == 1, within=SAFETY)
    fake.release.set()
    (_, _, events), (status, result, body) = await asyncio.gather(first, waiter)
    assert (status, result) == (200, "hit") and fake.arrived == 1
    text = "".join(
        chunk["choices"][0]["delta"].get("content") or ""
        for line in events.split(b"\n\n")
        if line.startswith(b"data: {") and (chunk := json.loads(line[6:]))["choices"]
    )
    assert json.loads(body)["choices"][0]["message"]["content"] == text


async def test_a_failed_first_sends_each_waiter_upstream(
    proxy: TestServer, fake: HeldUpstream
) -> None:
    requests = await held_at_once(proxy, fake, CHAT, 4)
    fake.faults = ["status:500"]  # the first request through the door fails
    fake.release.set()
    answers = await asyncio.gather(*requests)
    assert answers[0][0] == 500 and json.loads(answers[0][2])["error"]["type"] == "server_error"
    assert [(status, result) for status, result, _ in answers[1:]] == [(200, "miss")] * 3
    assert fake.arrived == 4  # each waiter called the upstream itself


async def test_a_waiter_whose_client_leaves_does_not_break_the_first(
    proxy: TestServer, fake: HeldUpstream
) -> None:
    first, leaving, staying = await held_at_once(proxy, fake, CHAT, 3)
    leaving.cancel()  # its client goes away: its handler is cancelled while it waits
    await eventually(lambda: proxy.app[in_flight_key].waiting == 1, within=SAFETY)
    fake.release.set()
    assert (await first)[:2] == (200, "miss")
    assert (await staying)[:2] == (200, "hit")
    assert fake.arrived == 1


async def test_waiters_go_upstream_when_the_first_s_client_leaves(
    proxy: TestServer, fake: HeldUpstream
) -> None:
    first, *waiters = await held_at_once(proxy, fake, CHAT, 3)
    first.cancel()  # its client goes away while its answer is on the way
    # The waiters are at the upstream's door too, which never opened: nobody was left hanging.
    await eventually(lambda: fake.arrived == 3, within=SAFETY)
    assert proxy.app[in_flight_key].waiting == 0
    fake.release.set()
    assert [(await waiter)[:2] for waiter in waiters] == [(200, "miss")] * 2
