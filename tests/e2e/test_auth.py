"""Master key, virtual keys limited to models, the three key headers, and the open proxy."""

from __future__ import annotations

import logging

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from aioproxy.testing import assert_openai_error
from tests.support import MASTER_KEY, MESSAGES, ServeProxy, gateway_config, sdk


@pytest.fixture
async def keyed_proxy(serve_proxy: ServeProxy, upstream_base: str) -> TestServer:
    config = gateway_config(
        upstream_base,
        auth={
            "master_key": MASTER_KEY,
            "keys": [
                {"key": "sk-alice", "name": "alice", "models": ["echo"]},
                {"key": "sk-bob", "name": "bob"},
            ],
        },
    )
    return await serve_proxy(config)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer sk-bob"},
        {"Authorization": "bearer   sk-bob"},
        {"api-key": "sk-bob"},
        {"x-api-key": "sk-bob"},
    ],
    ids=["bearer", "bearer-lowercase", "api-key", "x-api-key"],
)
async def test_key_headers(keyed_proxy: TestServer, headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            keyed_proxy.make_url("/v1/chat/completions"),
            headers=headers,
            json={"model": "gpt-test", "messages": MESSAGES},
        ) as response:
            assert response.status == 200


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer sk-wrong"}, "invalid_api_key"),
        ({"Authorization": "Basic c2stYm9i"}, "missing_api_key"),
        ({"x-api-key": "sk-bo"}, "invalid_api_key"),
    ],
)
async def test_missing_or_wrong_key_is_401(
    keyed_proxy: TestServer, headers: dict[str, str], code: str
) -> None:
    async with aiohttp.ClientSession() as http:
        for method, path in (
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
            ("POST", "/embeddings"),
        ):
            async with http.request(
                method, keyed_proxy.make_url(path), headers=headers, json={"model": "gpt-test"}
            ) as response:
                await assert_openai_error(response, 401, code)


async def test_sdk_sees_authentication_error(keyed_proxy: TestServer) -> None:
    async with sdk(keyed_proxy, key="sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)


async def test_key_limited_to_models(keyed_proxy: TestServer) -> None:
    async with sdk(keyed_proxy, key="sk-alice") as alice:
        await alice.chat.completions.create(model="echo", messages=MESSAGES)
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await alice.chat.completions.create(model="gpt-test", messages=MESSAGES)
        assert caught.value.status_code == 403 and caught.value.param == "model"
        assert [m.id for m in (await alice.models.list()).data] == ["echo"]
        with pytest.raises(openai.NotFoundError):
            await alice.models.retrieve("gpt-test")
    async with sdk(keyed_proxy, key="sk-bob") as bob:
        assert sorted(m.id for m in (await bob.models.list()).data) == ["echo", "gpt-test"]


async def test_health_needs_no_key(keyed_proxy: TestServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(keyed_proxy.make_url("/health")) as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok"}


async def test_no_auth_configured_is_open_and_loud(
    serve_proxy: ServeProxy, upstream_base: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="aioproxy"):
        proxy = await serve_proxy(gateway_config(upstream_base, auth={}))
    assert any("NO AUTHENTICATION" in r.message for r in caplog.records)
    async with sdk(proxy, key="anything") as client:
        completion = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert completion.choices
