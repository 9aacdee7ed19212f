"""Shared fixtures: a fake OpenAI upstream and the proxy in front of it, both real HTTP servers.
Constants and helpers the tests import are in tests/support.py."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import aiohttp
import aioproxy_echo
import aioproxy_openai
import openai
import pytest
from aiohttp.test_utils import TestServer

from aioproxy import create_app
from aioproxy.observability.access_log import ACCESS_LOG, JSONFormatter
from aioproxy.testing import FakeOpenAI
from tests.support import ServeProxy, gateway_config, sdk


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
def serve_proxy(aiohttp_server: Any) -> ServeProxy:
    """Serve a proxy app on 127.0.0.1 with the bundled plugins (entry points not scanned)."""

    async def serve(config: Any, plugins: Iterable[object] = ()) -> TestServer:
        app = create_app(
            config, plugins=[aioproxy_openai, aioproxy_echo, *plugins], load_entrypoints=False
        )
        return await aiohttp_server(app)

    return serve


@pytest.fixture
async def proxy(serve_proxy: ServeProxy, upstream_base: str) -> TestServer:
    return await serve_proxy(gateway_config(upstream_base))


@pytest.fixture
async def client(proxy: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk(proxy) as c:
        yield c


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    """What the access log writes, through the JSON formatter."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JSONFormatter())
    ACCESS_LOG.addHandler(handler)
    level = ACCESS_LOG.level
    ACCESS_LOG.setLevel(logging.INFO)
    try:
        yield out
    finally:
        ACCESS_LOG.removeHandler(handler)
        ACCESS_LOG.setLevel(level)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
