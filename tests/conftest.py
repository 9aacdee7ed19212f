"""Shared fixtures: a fake OpenAI upstream and the proxy in front of it, both real HTTP servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import aiohttp
import aioproxy_echo
import aioproxy_openai
import openai
import pytest
from aiohttp.test_utils import TestServer

from aioproxy import create_app
from tests.fakes.openai_upstream import FakeOpenAI

MASTER_KEY = "sk-master-test"
UPSTREAM_KEY = "sk-upstream-secret"
UPSTREAM_MODEL = "gpt-4o-mini"

StartProxy = Callable[..., Awaitable[TestServer]]


def gateway_config(api_base: str, **overrides: Any) -> dict[str, Any]:
    """The issue's TOML shape, as a mapping: one model `gpt-test` on the fake upstream."""
    config: dict[str, Any] = {
        "auth": {"master_key": MASTER_KEY},
        "models": [
            {
                "name": "gpt-test",
                "provider": "openai",
                "model": UPSTREAM_MODEL,
                "api_base": api_base,
                "api_key": UPSTREAM_KEY,
            },
            {"name": "echo", "provider": "echo"},
        ],
    }
    config.update(overrides)
    return config


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
async def upstream(aiohttp_server: Any, fake: FakeOpenAI) -> TestServer:
    return await aiohttp_server(fake.app())


@pytest.fixture
def upstream_base(upstream: TestServer) -> str:
    return str(upstream.make_url("/v1"))


@pytest.fixture
def start_proxy(aiohttp_server: Any) -> StartProxy:
    """Start a proxy app on 127.0.0.1 with the bundled plugins (entry points not scanned)."""

    async def start(config: Any, plugins: Iterable[object] = ()) -> TestServer:
        app = create_app(
            config, plugins=[aioproxy_openai, aioproxy_echo, *plugins], load_entrypoints=False
        )
        return await aiohttp_server(app)

    return start


@pytest.fixture
async def proxy(start_proxy: StartProxy, upstream_base: str) -> TestServer:
    return await start_proxy(gateway_config(upstream_base))


def sdk(server: TestServer, key: str = MASTER_KEY, prefix: str = "/v1") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(server.make_url(prefix)), api_key=key, max_retries=0)


@pytest.fixture
async def client(proxy: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk(proxy) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# What the openai SDK sends: its key, and a JSON Content-Type (bodies of any other are refused).
AUTH = {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}


async def assert_openai_error(
    response: aiohttp.ClientResponse, status: int, code: str | None = None
) -> dict[str, Any]:
    """The response is an OpenAI error object with ``status`` (and ``code``); returns the error."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code
    return error
