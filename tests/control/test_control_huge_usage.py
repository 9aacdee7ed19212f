"""An upstream reporting an absurd usage (10**21 output tokens) fails nothing: the key's later
requests are counted (in Redis too: its running average of output tokens stays packable), and the
request log keeps writing rows and spend (a count past a column's range would refuse the batch
for ever). Such a usage is read as none, and estimated."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from tests.control.conftest import Control
from tests.control.test_control_body_rpm import send
from tests.redis_server import redis_server, redis_url

__all__ = ["redis_server", "redis_url"]  # the fixtures

HUGE = 10**21  # 0.2 of it (the learning rate) is past 2**64


async def _huge_usage(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": HUGE, "total_tokens": HUGE + 1},
        }
    )


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Any:
    """An upstream that reports a huge completion_tokens (overrides the fake OpenAI)."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _huge_usage)
    return await aiohttp_server(app)


async def test_a_huge_reported_usage_does_not_fail_the_keys_next_requests(
    start_control: Any, redis_url: str
) -> None:
    control: Control = await start_control(state={"redis_url": redis_url, "prefix": "learnt"})
    key = (await control.new_key(rpm=100))["key"]  # limited, but no tpm
    assert (await send(control, key))[0] == 200  # the upstream reports HUGE output tokens
    status, _, answer = await send(control, key)  # no max_tokens: reserves the learnt output
    assert status == 200, answer


async def test_a_huge_reported_usage_does_not_stop_the_request_log(start_control: Any) -> None:
    """Finding 1 (older than the reviewed commits): the request log's row keeps the
    upstream's raw usage; past the database's 64-bit INTEGER the whole batch fails and is
    retried for ever, so no row (nor spend) is written after it, another key's neither."""
    control: Control = await start_control()
    huge = (await control.new_key())["key"]
    other = (await control.new_key())["key"]
    assert (await send(control, huge))[0] == 200
    await control.settle()  # raised before: the batch holding that row cannot be written
    assert (await send(control, other))[0] == 200
    await control.settle()
    assert not control.plane.log.buffer  # every row written


def test_a_providers_own_usage_is_bounded_for_its_row() -> None:
    """A provider plugin that builds its Usage itself (no msgspec bound on the way): the row
    holds each count at most what PostgreSQL's INTEGER column takes."""
    from aioproxy.control.rows import _bounded
    from aioproxy.outcome import Usage

    assert _bounded(Usage(2**40, 5, 2**40 + 5, 2**33, 0)) == Usage(
        2**31 - 1, 5, 2**31 - 1, 2**31 - 1, 0
    )
