"""Routing must not be a way around a key's limits nor a lever on other keys' traffic (issue #9):
fallbacks of every kind pass the key's model check, and only upstream failures cool a
deployment down."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from aioproxy_openai import OpenAIProvider

from aioproxy import BadRequest, hookimpl
from aioproxy.context import Call
from aioproxy.providers import Reply
from aioproxy.testing import FakeOpenAI, assert_openai_error
from tests.support import CHAT, MASTER_KEY, ServeProxy, gateway_config

LIMITED = "sk-limited-to-gpt-a"
OTHER = "sk-another-team"
EXPENSIVE_UPSTREAM = "gpt-4.1-mini"  # what gpt-expensive is upstream: no message may name it either
FORBIDDEN_WORDS = ("gpt-expensive", "echo-expensive", EXPENSIVE_UPSTREAM)


def limited_config(base_a: str, base_e: str, **router: Any) -> dict[str, Any]:
    """gpt-a on fake a; gpt-expensive (fake e) and echo-expensive (another provider) as its
    fallbacks of every kind; a key that may only use gpt-a."""
    config = gateway_config(base_a)
    config["models"][0]["name"] = "gpt-a"
    config["models"] += [
        {
            **config["models"][0],
            "name": "gpt-expensive",
            "api_base": base_e,
            "model": EXPENSIVE_UPSTREAM,
        },
        {"name": "echo-expensive", "provider": "echo"},
    ]
    config["auth"]["keys"] = [{"key": LIMITED, "name": "limited", "models": ["gpt-a"]}]
    config["router"] = {
        "num_retries": 1,
        "retry_backoff": 0,
        "fallbacks": {"gpt-a": ["gpt-expensive", "echo-expensive"]},
        "context_window_fallbacks": {"gpt-a": ["gpt-expensive", "echo-expensive"]},
        **router,
    }
    return config


async def post(proxy: TestServer, key: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.make_url(CHAT), json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            raw = await response.read()
            if response.status != 200:
                await assert_openai_error(response, response.status)
            return response.status, raw


def body_for(model: str = "gpt-a", stream: bool = False) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def two(aiohttp_server: Any) -> tuple[FakeOpenAI, FakeOpenAI, str, str]:
    a, e = FakeOpenAI(), FakeOpenAI()
    server_a, server_e = await aiohttp_server(a.app()), await aiohttp_server(e.app())
    return a, e, str(server_a.make_url("/v1")), str(server_e.make_url("/v1"))


def assert_unnamed(raw: bytes) -> None:
    text = raw.decode()
    for word in FORBIDDEN_WORDS:
        assert word not in text, text


async def test_the_limited_key_may_not_ask_for_the_fallback(
    serve_proxy: ServeProxy, two: tuple[FakeOpenAI, FakeOpenAI, str, str]
) -> None:
    _a, e, base_a, base_e = two
    proxy = await serve_proxy(limited_config(base_a, base_e))
    status, _ = await post(proxy, LIMITED, body_for("gpt-expensive"))
    assert status == 403 and e.requests == []


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("fault", ["status:500", "reset", "context_length_exceeded"])
async def test_fallbacks_the_key_may_not_use_are_skipped(
    serve_proxy: ServeProxy, two: tuple[FakeOpenAI, FakeOpenAI, str, str], fault: str, stream: bool
) -> None:
    a, e, base_a, base_e = two
    proxy = await serve_proxy(limited_config(base_a, base_e, cooldown_seconds=0))
    a.fault_rates = {fault: 1.0}
    status, raw = await post(proxy, LIMITED, body_for(stream=stream))
    assert status == (
        400 if fault == "context_length_exceeded" else 500 if fault == "status:500" else 502
    ), raw
    assert e.requests == [], "served by a model the key may not use"
    assert_unnamed(raw)
    # The master key may use them all: the same failure is served by the fallback.
    status, raw = await post(proxy, MASTER_KEY, body_for(stream=stream))
    assert status == 200 and len(e.requests) == 1, raw


async def test_a_cooling_model_is_not_a_way_to_its_fallbacks(
    serve_proxy: ServeProxy, two: tuple[FakeOpenAI, FakeOpenAI, str, str]
) -> None:
    a, e, base_a, base_e = two
    proxy = await serve_proxy(
        limited_config(base_a, base_e, num_retries=0, cooldown_failures=1, cooldown_seconds=600)
    )
    a.faults = ["status:500"]
    status, raw = await post(proxy, LIMITED, body_for())  # gpt-a now cools down
    assert status == 500 and e.requests == []
    assert_unnamed(raw)
    for stream in (False, True):  # plain requests while it cools: still gpt-a, never the others
        status, raw = await post(proxy, LIMITED, body_for(stream=stream))
        assert status == 200, raw
        assert_unnamed(raw)
    assert len(a.requests) == 3 and e.requests == []
    a.faults = ["status:503"]
    status, raw = await post(proxy, LIMITED, body_for())
    assert status == 503 and e.requests == []
    assert_unnamed(raw)
    # The master key, meanwhile, goes to the first fallback.
    status, raw = await post(proxy, MASTER_KEY, body_for())
    assert status == 200 and len(e.requests) == 1 and json.loads(raw)["model"] == EXPENSIVE_UPSTREAM


# -- what cools a deployment down --------------------------------------------------------------


class Fragile(OpenAIProvider):
    """The openai provider with a translator that breaks on what a client may send: a bug of
    ours (``"stop": 5`` raises TypeError) or the request's fault (``"tools": 5``, a 400)."""

    async def chat_completions(self, call: Call) -> Reply:
        if call.get("stop") == 5:
            raise TypeError("'int' object is not iterable")
        if call.get("tools") == 5:
            raise BadRequest("'tools' must be an array", param="tools")
        return await super().chat_completions(call)


class FragilePlugin:
    @hookimpl
    def register_providers(self, register: Any) -> None:
        register(Fragile)


@pytest.mark.parametrize(("field", "status"), [("stop", 500), ("tools", 400)])
async def test_requests_that_break_a_translator_do_not_cool_it_down(
    serve_proxy: ServeProxy, two: tuple[FakeOpenAI, FakeOpenAI, str, str], field: str, status: int
) -> None:
    a, backup, base_a, base_backup = two
    config = gateway_config(
        base_a,
        router={"num_retries": 0, "cooldown_failures": 3, "fallbacks": {"gpt-test": ["backup"]}},
    )
    config["models"][0]["provider"] = "fragile"
    config["models"].append({**config["models"][0], "name": "backup", "api_base": base_backup})
    config["auth"]["keys"] = [{"key": LIMITED, "name": "attacker"}, {"key": OTHER, "name": "other"}]
    proxy = await serve_proxy(config, plugins=[FragilePlugin()])
    for _ in range(4):
        answer, raw = await post(proxy, LIMITED, {**body_for("gpt-test"), field: 5})
        assert answer == status, raw
        if status == 500:
            assert json.loads(raw)["error"]["code"] == "internal_error"
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.make_url("/health/readiness")) as response:
            assert response.status == 200, await response.text()
            rows = (await response.json())["deployments"]
    assert all(row["available"] and row["failed"] == 0 for row in rows), rows
    for _ in range(3):  # another key's requests still go where they belong
        assert (await post(proxy, OTHER, body_for("gpt-test")))[0] == 200
    assert len(a.requests) == 3 and backup.requests == []
