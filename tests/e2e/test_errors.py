"""Every failure answers with an OpenAI error object and the right status, and the proxy keeps serving."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from aioproxy import hookimpl
from aioproxy.testing import TRANSPORT_FAULTS, FakeOpenAI, assert_openai_error
from tests.support import (
    AUTH,
    CHAT,
    MASTER_KEY,
    MESSAGES,
    UPSTREAM_KEY,
    ServeProxy,
    gateway_config,
    sdk,
)


@pytest.fixture
async def proxy(serve_proxy: ServeProxy, upstream_base: str) -> TestServer:
    """Without retries, so that each upstream failure reaches the client (retries: test_reliability)."""
    return await serve_proxy(gateway_config(upstream_base, router={"num_retries": 0}))


async def post(
    http: aiohttp.ClientSession,
    server: TestServer,
    data: bytes | None = None,
    json: Any = None,
    path: str = CHAT,
) -> aiohttp.ClientResponse:
    response = await http.post(server.make_url(path), data=data, json=json, headers=AUTH)
    await response.read()
    return response


async def still_serving(server: TestServer) -> None:
    async with sdk(server) as client:
        done = await client.chat.completions.create(model="echo", messages=MESSAGES)
    assert done.choices[0].message.content


@pytest.mark.parametrize(
    ("data", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"", None, None),
        (b"[1, 2]", "invalid_body", None),
        (b'"just a string"', "invalid_body", None),
        (b'{"messages": []}', "missing_required_parameter", "model"),
        (b'{"model": 42, "messages": []}', "invalid_type", "model"),
        (b'{"model": null}', "invalid_type", "model"),
        (b'{"model": "gpt-test", "stream": "yes"}', "invalid_type", "stream"),
        (b'{"model": "gpt-test", "x": "\xff\xfe"}', "invalid_encoding", None),
        (b'{"model": "gpt-test", "x": ' + b"[" * 50000 + b"]" * 50000 + b"}", "invalid_json", None),
    ],
    ids=[
        "malformed",
        "empty",
        "array",
        "string",
        "no-model",
        "int-model",
        "null-model",
        "bad-stream",
        "bad-utf8",
        "deep-nesting",
    ],
)
async def test_bad_request_bodies(
    proxy: TestServer, http: aiohttp.ClientSession, data: bytes, code: str | None, param: str | None
) -> None:
    error = await assert_openai_error(await post(http, proxy, data=data), 400, code)
    assert error["param"] == param
    await still_serving(proxy)


async def test_unknown_model_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert "gpt-nope" in caught.value.message


async def test_body_over_the_limit_is_413(
    serve_proxy: ServeProxy, upstream_base: str, http: aiohttp.ClientSession
) -> None:
    proxy = await serve_proxy(gateway_config(upstream_base, server={"max_body_size": 4096}))
    big = {"model": "gpt-test", "messages": [{"role": "user", "content": "x" * 10_000}]}
    await assert_openai_error(await post(http, proxy, json=big), 413, "request_too_large")
    await still_serving(proxy)


async def test_unknown_route_and_wrong_method(
    proxy: TestServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(proxy.make_url("/v1/nothing-here"), headers=AUTH) as response:
        await assert_openai_error(response, 404, "not_found")
    async with http.get(proxy.make_url(CHAT), headers=AUTH) as response:
        await assert_openai_error(response, 405, "method_not_allowed")
        assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        *TRANSPORT_FAULTS,
        ("status:500:text", 500, None),
        ("status:503", 503, None),
        ("status:429", 429, None),
        ("status:400", 400, None),
        ("status:401", 502, "upstream_auth_failed"),
    ],
)
async def test_upstream_failures(
    proxy: TestServer,
    fake: FakeOpenAI,
    http: aiohttp.ClientSession,
    fault: str,
    status: int,
    code: str | None,
) -> None:
    fake.faults.append(fault)
    error = await assert_openai_error(
        await post(http, proxy, json={"model": "gpt-test", "messages": MESSAGES}), status, code
    )
    assert "gpt-test" in error["message"] or fault.startswith("status:4")
    assert UPSTREAM_KEY not in error["message"]
    await still_serving(proxy)


async def test_upstream_4xx_body_passes_through(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="missing-upstream", messages=MESSAGES)
    assert caught.value.code == "model_not_found"


async def test_upstream_unreachable_is_502(serve_proxy: ServeProxy) -> None:
    proxy = await serve_proxy(gateway_config("http://127.0.0.1:1/v1", router={"num_retries": 0}))
    async with sdk(proxy) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unreachable"
    assert "gpt-test" in caught.value.message


async def test_upstream_timeout_is_504(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    config = gateway_config(
        upstream_base, upstream={"timeouts": {"read": 0.3}}, router={"num_retries": 0}
    )
    proxy = await serve_proxy(config)
    fake.faults.append("hang")
    async with sdk(proxy) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert caught.value.status_code == 504 and caught.value.code == "upstream_timeout"
    await still_serving(proxy)


async def test_stream_cut_midway_ends_with_an_error_event(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.faults.append("cut_stream")
    stream = await client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    received = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            received.append(chunk)
    assert received, "the events before the cut reach the client"
    assert "gpt-test" in caught.value.message


class Boom:
    @hookimpl
    def before_request(self) -> None:
        raise RuntimeError("plugin bug with secret sk-should-not-leak")


async def test_unexpected_exception_is_logged_500(
    serve_proxy: ServeProxy, upstream_base: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await serve_proxy(gateway_config(upstream_base), plugins=[Boom()])
    async with aiohttp.ClientSession() as http:
        with caplog.at_level(logging.ERROR, logger="aioproxy"):
            response = await post(http, proxy, json={"model": "gpt-test", "messages": MESSAGES})
            error = await assert_openai_error(response, 500, "internal_error")
    assert "sk-should-not-leak" not in error["message"]
    assert any("unexpected error" in r.message for r in caplog.records)
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.make_url("/health")) as health:
            assert health.status == 200


async def test_errors_never_show_keys(
    proxy: TestServer, fake: FakeOpenAI, http: aiohttp.ClientSession
) -> None:
    fake.faults.append("status:400")
    response = await post(http, proxy, json={"model": "gpt-test", "messages": MESSAGES})
    text = await response.text()
    assert UPSTREAM_KEY not in text and MASTER_KEY not in text
