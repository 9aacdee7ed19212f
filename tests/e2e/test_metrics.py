"""Prometheus /metrics: exact counts after a known mix of requests, read with prometheus_client's
own parser; the key it needs, its public and own-port forms."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from aioproxy import hookimpl
from aioproxy.testing import FakeOpenAI
from tests.support import AUTH, MASTER_KEY, UPSTREAM_MODEL, ServeProxy, gateway_config, sdk

MESSAGES = [{"role": "user", "content": "hi"}]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(proxy: TestServer, headers: dict[str, str] | None = None) -> Samples:
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.make_url("/metrics"), headers=headers or AUTH) as response:
            assert response.status == 200, await response.text()
            assert response.content_type == "text/plain"
            return parse(await response.text())


def mix_config(api_base: str, **overrides: Any) -> dict[str, Any]:
    """gpt-test and echo (conftest's), a capped model, and a model falling back to gpt-test."""
    base = gateway_config(api_base)
    model = {
        "provider": "openai",
        "model": UPSTREAM_MODEL,
        "api_base": api_base,
        "api_key": "sk-up",
    }
    base["models"] += [{"name": "capped", "rpm": 1, **model}, {"name": "primary", **model}]
    base["router"] = {
        "retry_backoff": 0,
        "models": {"primary": {"num_retries": 0, "fallbacks": ["gpt-test"]}},
    }
    base["metrics"] = {"enabled": True, **overrides.pop("metrics", {})}
    base.update(overrides)
    return base


async def run_mix(proxy: TestServer, fake: FakeOpenAI) -> dict[str, int]:
    """success, stream, 404 (unknown model), 401, 429 (rpm cap), a 500 retried, a fallback.
    Returns the tokens the SDK saw, by the model that served them."""
    tokens = {"input": 0, "output": 0}

    def add(usage: Any) -> None:
        tokens["input"] += usage.prompt_tokens
        tokens["output"] += usage.completion_tokens

    async with sdk(proxy) as client:
        add((await client.chat.completions.create(model="gpt-test", messages=MESSAGES)).usage)
        stream = await client.chat.completions.create(
            model="gpt-test", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in stream:
            if chunk.usage is not None:
                add(chunk.usage)
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="made-up-name-1234", messages=MESSAGES)
        await client.chat.completions.create(model="capped", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="capped", messages=MESSAGES)
        fake.faults = ["status:500"]  # retried on gpt-test
        add((await client.chat.completions.create(model="gpt-test", messages=MESSAGES)).usage)
        fake.faults = ["status:500"]  # primary fails, no retries: falls back to gpt-test
        add((await client.chat.completions.create(model="primary", messages=MESSAGES)).usage)
    async with sdk(proxy, key="sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    return tokens


def assert_mix(samples: Samples, tokens: dict[str, int], times: int = 1) -> None:
    requests = "aioproxy_requests_total"
    chat = "chat_completions"
    assert value(samples, requests, kind=chat, model="gpt-test", status="200") == 3 * times
    assert value(samples, requests, kind=chat, model="unknown", status="404") == 1 * times
    assert value(samples, requests, kind=chat, model="capped", status="200") == 1 * times
    assert value(samples, requests, kind=chat, model="capped", status="429") == 1 * times
    assert value(samples, requests, kind=chat, model="primary", status="200") == 1 * times
    assert value(samples, requests, kind=chat, model="none", status="401") == 1 * times
    assert sum(v for (name, _), v in samples.items() if name == requests) == 8 * times
    # Nothing a client sent became a label.
    assert not any("made-up" in str(labels) for _, labels in samples)

    upstream = "aioproxy_upstream_requests_total"
    assert value(samples, upstream, deployment="gpt-test#0", status="200") == 4 * times
    assert value(samples, upstream, deployment="gpt-test#0", status="500") == 1 * times
    assert value(samples, upstream, deployment="primary#0", status="500") == 1 * times
    assert value(samples, upstream, deployment="capped#0", status="200") == 1 * times
    assert value(samples, "aioproxy_retries_total", model="gpt-test") == 1 * times
    assert value(samples, "aioproxy_fallbacks_total", model="primary") == 1 * times
    assert value(samples, "aioproxy_rate_limited_total", scope="deployment") == 1 * times
    # Tokens by the model that served them (the fallback's too).
    assert (
        value(samples, "aioproxy_tokens_total", model="gpt-test", type="input") == tokens["input"]
    )
    assert (
        value(samples, "aioproxy_tokens_total", model="gpt-test", type="output") == tokens["output"]
    )
    assert (
        value(samples, "aioproxy_time_to_first_token_seconds_count", model="gpt-test") == 1 * times
    )
    duration = "aioproxy_request_duration_seconds_count"
    assert value(samples, duration, kind=chat, model="gpt-test") == 3 * times
    assert value(samples, "aioproxy_in_flight_requests") == 0  # a scrape does not count itself
    assert value(samples, "aioproxy_deployment_cooling", deployment="gpt-test#0") == 0


@pytest.mark.parametrize("timing_header", [False, True])
async def test_counts_after_a_known_mix(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI, timing_header: bool
) -> None:
    """The same counts whether the observer hears each attempt (the timing header needs
    their time) or learns of them from the router and the calls' failed attempts."""
    proxy = await serve_proxy(mix_config(upstream_base, server={"timing_header": timing_header}))
    tokens = await run_mix(proxy, fake)
    assert_mix(await scrape(proxy), tokens)


async def test_a_cooling_deployment_shows(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    config = mix_config(upstream_base)
    config["router"] = {"num_retries": 0, "cooldown_failures": 1, "cooldown_seconds": 600}
    proxy = await serve_proxy(config)
    fake.faults = ["status:500"]
    async with sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="primary", messages=MESSAGES)
    samples = await scrape(proxy)
    assert value(samples, "aioproxy_deployment_cooling", deployment="primary#0") == 1
    assert value(samples, "aioproxy_deployment_cooling", deployment="gpt-test#0") == 0


async def test_metrics_need_the_master_key(serve_proxy: ServeProxy, upstream_base: str) -> None:
    proxy = await serve_proxy(mix_config(upstream_base))
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
            async with http.get(proxy.make_url("/metrics"), headers=headers) as response:
                assert response.status == 401
                assert (await response.json())["error"]["type"] == "authentication_error"
    await scrape(proxy, {"Authorization": f"Bearer {MASTER_KEY}"})


async def test_public_metrics(serve_proxy: ServeProxy, upstream_base: str) -> None:
    proxy = await serve_proxy(mix_config(upstream_base, metrics={"public": True}))
    await scrape(proxy, {})


async def test_metrics_on_their_own_port(
    serve_proxy: ServeProxy, upstream_base: str, unused_tcp_port_factory: Any
) -> None:
    port = unused_tcp_port_factory()
    proxy = await serve_proxy(mix_config(upstream_base, metrics={"port": port}))
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.make_url("/metrics"), headers=AUTH) as response:
            assert response.status == 404  # not on the API's port
        async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            assert "aioproxy_requests_total" in await response.text()


async def test_metrics_off(serve_proxy: ServeProxy, upstream_base: str) -> None:
    proxy = await serve_proxy(mix_config(upstream_base, metrics={"enabled": False}))
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.make_url("/metrics"), headers=AUTH) as response:
            assert response.status == 404


class Hold:
    """Holds each request at its upstream attempt (``started``) until ``release``."""

    def __init__(self) -> None:
        self.started, self.release = asyncio.Event(), asyncio.Event()

    @hookimpl
    async def before_attempt(self) -> None:
        self.started.set()
        await self.release.wait()


async def test_in_flight_counts_a_request_being_served(
    serve_proxy: ServeProxy, upstream_base: str
) -> None:
    hold = Hold()
    started, release = hold.started, hold.release
    proxy = await serve_proxy(mix_config(upstream_base), plugins=[hold])
    async with sdk(proxy) as client:
        pending = asyncio.create_task(
            client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        )
        await started.wait()
        assert value(await scrape(proxy), "aioproxy_in_flight_requests") == 1
        release.set()
        await pending
    assert value(await scrape(proxy), "aioproxy_in_flight_requests") == 0


async def test_in_flight_on_the_metrics_port_counts_no_scrape(
    serve_proxy: ServeProxy, upstream_base: str, unused_tcp_port_factory: Any
) -> None:
    """A scrape on [metrics] port is no request of the API's: the gauge is the API's own."""
    hold = Hold()
    started, release = hold.started, hold.release
    port = unused_tcp_port_factory()
    proxy = await serve_proxy(mix_config(upstream_base, metrics={"port": port}), plugins=[hold])

    async def in_flight() -> float:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                return value(parse(await response.text()), "aioproxy_in_flight_requests")

    assert await in_flight() == 0
    async with sdk(proxy) as client:
        pending = asyncio.create_task(
            client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        )
        await started.wait()
        assert await in_flight() == 1
        release.set()
        await pending
    assert await in_flight() == 0


async def test_metrics_with_keys_but_no_master_key_are_not_open(
    serve_proxy: ServeProxy, upstream_base: str
) -> None:
    """Keys but no master key: /metrics is nobody's (a client key is no operator's) unless
    public; a gateway with no key at all is open everywhere, /metrics too."""
    keyed = mix_config(upstream_base, auth={"keys": [{"key": "sk-client-0001", "name": "app"}]})
    open_ = mix_config(upstream_base, auth={})
    for config, headers, status in (
        (keyed, {}, 401),
        (keyed, {"Authorization": "Bearer sk-client-0001"}, 401),
        (open_, {}, 200),
    ):
        proxy = await serve_proxy(config)
        async with aiohttp.ClientSession() as http:
            async with http.get(proxy.make_url("/metrics"), headers=headers) as response:
                assert response.status == status


async def test_one_process_counts_as_requests_gather_without_a_clock(
    serve_proxy: ServeProxy, upstream_base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alone (no --workers), the process flushes nothing on a timer: its scrapes flush. What
    requests hand over is counted once COUNT_AT gather, so that it never grows unscraped."""
    from aioproxy.keys import plugin_manager_key
    from aioproxy.observability import observer

    monkeypatch.setattr(observer, "COUNT_AT", 2)
    monkeypatch.setattr(observer, "BATCH_WINDOW", 0.0)  # each request its own batch
    proxy = await serve_proxy(mix_config(upstream_base))
    metrics = proxy.app[plugin_manager_key].get_plugin("aioproxy.observer").metrics
    assert not [ctx for ctx in proxy.app.cleanup_ctx if "_flushing" in repr(ctx)]
    async with sdk(proxy) as client:
        for _ in range(3):
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert len(metrics.finished) == 1
    assert metrics.requests.pending == {("chat_completions", "gpt-test", 200): 2}
    samples = await scrape(proxy)
    total = value(
        samples, "aioproxy_requests_total", kind="chat_completions", model="gpt-test", status="200"
    )
    assert total == 3


async def test_cache_lookups_by_result(
    serve_proxy: ServeProxy, upstream_base: str, tmp_path: Any
) -> None:
    """The response cache's miss, then its hit, then a lookup the client declined (bypass)."""
    config = mix_config(
        upstream_base,
        database={"url": f"sqlite:///{tmp_path / 'db.sqlite3'}"},
        cache={"enabled": True},
    )
    proxy = await serve_proxy(config)
    prompts = []
    async with sdk(proxy) as client:
        for headers in ({}, {}, {"Cache-Control": "no-cache"}):
            answer = await client.chat.completions.create(
                model="gpt-test", messages=MESSAGES, temperature=0, extra_headers=headers
            )
            assert answer.usage is not None
            prompts.append(answer.usage.prompt_tokens)
    samples = await scrape(proxy)
    cache = "aioproxy_cache_requests_total"
    assert [value(samples, cache, result=r) for r in ("miss", "hit", "bypass")] == [1, 1, 1]
    # The hit called no upstream, and its tokens are no upstream's: two calls, two answers'.
    upstream = "aioproxy_upstream_requests_total"
    assert value(samples, upstream, deployment="gpt-test#0", status="200") == 2
    assert value(samples, upstream, deployment="unknown", status="200") == 0
    tokens = value(samples, "aioproxy_tokens_total", model="gpt-test", type="input")
    assert tokens == prompts[0] + prompts[2]


async def test_streams_cut_after_their_200_are_counted_by_code(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    """Two streams the upstream breaks off after their 200 and one that ends well: requests
    say 200 for all three (what the clients got), aioproxy_stream_errors_total counts the two
    cut ones by their code; a code of the upstream's own is "other" (no client text a label)."""
    from aioproxy.keys import plugin_manager_key

    proxy = await serve_proxy(mix_config(upstream_base))
    body = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
    fake.faults = ["cut_stream", "cut_stream"]
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(
                proxy.make_url("/v1/chat/completions"), json=body, headers=AUTH
            ) as response:
                assert response.status == 200
                await response.read()
    metrics = proxy.app[plugin_manager_key].get_plugin("aioproxy.observer").metrics
    metrics.stream_error("made-up-name-1234", "overloaded_error")  # as an upstream's would be
    samples = await scrape(proxy)
    errors = {
        labels: count
        for (name, labels), count in samples.items()
        if name == "aioproxy_stream_errors_total"
    }
    assert errors == {
        (("code", "upstream_disconnected"), ("model", "gpt-test")): 2,
        (("code", "other"), ("model", "unknown")): 1,
    }
    requests = value(
        samples, "aioproxy_requests_total", kind="chat_completions", model="gpt-test", status="200"
    )
    assert requests == 3
