"""Fault-injection load (issue #4, item 9): many concurrent requests, half streaming, through two
deployments that misbehave at chosen rates and a healthy fallback. Every request must end in a
complete answer or a proper OpenAI error (nothing hung, nothing malformed), retries and fallbacks
must recover what they can, and afterwards the proxy must hold no upstream connection, task or
per-request object more than before."""

from __future__ import annotations

import asyncio
import gc
import json
import random
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

import aioproxy.context
import aioproxy.h1client
import aioproxy.keys
import aioproxy.providers
import aioproxy.router
from aioproxy.testing import FakeClock, FakeOpenAI, eventually
from tests.support import AUTH, UPSTREAM_MODEL, ServeProxy, gateway_config

# Subprocesses, signals or load: one xdist worker, not starved by parallel hypothesis tests.
pytestmark = pytest.mark.xdist_group("wallclock")

REQUESTS = 360
CONCURRENCY = 100
REQUEST_DEADLINE = 60.0  # a safety net: a request still unanswered then is counted hung
STREAM_FAULTS = ("cut_stream", "stall_stream")
# About 25% of upstream requests fail, every way we know.
FAULT_RATES = {
    "reset": 0.04,
    "hang": 0.015,
    "garbage": 0.025,
    "redirect": 0.01,
    "cut_stream": 0.03,  # a reset for a request that does not stream
    "stall_stream": 0.015,  # a hang for a request that does not stream
    "status:429": 0.04,
    "status:500": 0.04,
    "status:502:text": 0.01,
    "status:503": 0.025,
}


def check_json(i: int, status: int, content_type: str, raw: bytes) -> str:
    assert content_type == "application/json", (i, status, content_type, raw[:200])
    body = json.loads(raw)
    if status == 200:
        assert body["object"] == "chat.completion", body
        assert body["choices"][0]["message"]["content"] == f"fake reply to: request {i}", body
        assert body["model"] == UPSTREAM_MODEL
        return "ok"
    check_error(body)
    return f"error {status}"


def check_error(body: Any) -> None:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["code"] != "internal_error", error


def check_stream(i: int, status: int, content_type: str, raw: bytes) -> str:
    if status != 200:
        check_error(json.loads(raw))
        return f"error {status}"
    assert content_type == "text/event-stream", (i, content_type, raw[:200])
    assert raw.endswith(b"\n\n"), (i, raw[-200:])
    data = []
    for block in raw.decode().split("\n\n")[:-1]:
        if block == ": keepalive":
            assert not data, "keep-alive comments only come before the first event"
            continue
        assert block.startswith("data: ") and "\n" not in block, (i, block)
        data.append(block[6:])
    assert data, (i, raw)
    if data[-1] == "[DONE]":
        chunks = [json.loads(d) for d in data[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == f"fake reply to: request {i}", (i, text)
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        return "ok"
    *chunks, last = (json.loads(d) for d in data)
    check_error(last)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "[DONE]" not in data
    return "stream error event"


async def one(http: aiohttp.ClientSession, proxy: TestServer, i: int, stream: bool) -> str:
    body = {
        "model": "gpt-test",
        "stream": stream,
        "messages": [{"role": "user", "content": f"request {i}"}],
    }
    async with asyncio.timeout(REQUEST_DEADLINE):
        async with http.post(
            proxy.make_url("/v1/chat/completions"), json=body, headers=AUTH
        ) as response:
            raw = await response.read()
            check = check_stream if stream else check_json
            return check(i, response.status, response.content_type, raw)


async def round_of_load(proxy: TestServer) -> tuple[Counter[str], Counter[str]]:
    """(outcomes of streamed requests, outcomes of the others); raises on any malformed answer."""
    semaphore = asyncio.Semaphore(CONCURRENCY)
    streamed: Counter[str] = Counter()
    plain: Counter[str] = Counter()

    async def limited(http: aiohttp.ClientSession, i: int) -> None:
        async with semaphore:
            stream = i % 2 == 0
            try:
                outcome = await one(http, proxy, i, stream)
            except TimeoutError:
                outcome = "hung"
            (streamed if stream else plain)[outcome] += 1

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as http:
        load = asyncio.gather(*(limited(http, i) for i in range(REQUESTS)))
        busy = 0
        while not load.done():  # the most requests the proxy served at once
            busy = max(busy, sum(1 for t in asyncio.all_tasks() if runs_aioproxy_code(t)))
            await asyncio.sleep(0.02)
        await load
    assert busy >= CONCURRENCY // 2, "the proxy was serving many requests at once"
    return streamed, plain


def live(kind: type, proxy: TestServer) -> int:
    """Objects of ``kind`` alive; for requests, only the proxy's (a fake's keep-alive connection
    holds on to its last request until the next one)."""
    return sum(
        1
        for obj in gc.get_objects()
        if type(obj) is kind and (kind is not aiohttp.web.Request or obj.app is proxy.app)
    )


def runs_aioproxy_code(task: asyncio.Task[Any]) -> bool:
    """Somewhere down its chain of awaits, the task is in the proxy's code (core or plugins)."""
    coro: Any = task.get_coro()
    while coro is not None:
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        if code is not None and "aioproxy" in code.co_filename:
            return True
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return False


def pair_and_backup(config: dict[str, Any], bases: list[str]) -> dict[str, Any]:
    """``config`` (of one gpt-test deployment, on ``bases[0]``) with a second gpt-test deployment
    on ``bases[1]`` and a "backup" model on ``bases[2]``."""
    first, *others = config["models"]
    backup = {**first, "name": "backup", "api_base": bases[2]}
    config["models"] = [first, {**first, "api_base": bases[1]}, *others, backup]
    return config


async def test_load_with_faults_on(aiohttp_server: Any, serve_proxy: ServeProxy) -> None:
    a, b = FakeOpenAI(fault_rates=FAULT_RATES, seed=1), FakeOpenAI(fault_rates=FAULT_RATES, seed=2)
    backup = FakeOpenAI()
    fakes = [a, b, backup]
    servers = [await aiohttp_server(fake.app()) for fake in fakes]
    bases = [str(server.make_url("/v1")) for server in servers]
    for fake in fakes:
        fake.stream_chunks, fake.stream_delay = 6, 0.005
    config = gateway_config(
        bases[0],
        router={
            "num_retries": 2,
            "retry_backoff": 0.01,
            "retry_backoff_max": 0.05,
            "cooldown_failures": 5,
            "cooldown_window": 1,
            "cooldown_seconds": 0.3,
            "fallbacks": {"gpt-test": ["backup"]},
        },
        # Safety nets, not part of the outcome: they end the fakes' hangs and stalls, and a
        # healthy answer (milliseconds) would have to be slowed 100-fold by a busy machine to
        # meet one, which would change what is asserted below.
        upstream={"timeouts": {"connect": 10, "first_byte": 2.0, "read": 2.0}},
        server={"keepalive_interval": 0.1},
    )
    proxy = await serve_proxy(pair_and_backup(config, bases))
    pool = proxy.app[aioproxy.keys.pool_key]
    gc.collect()
    app_tasks = set(asyncio.all_tasks())  # the app's own, for its life (e.g. the request log)
    baseline_tasks = len(app_tasks)
    per_request = (
        aioproxy.h1client.H1Response,
        aioproxy.context.Call,
        aioproxy.providers.StreamReply,
        aioproxy.providers.JSONReply,
        aiohttp.web.Request,
    )
    leftovers = []
    drawn = 0  # requests the faulty fakes had, each of which drew a fault (or none)

    for _ in range(2):
        for fake in fakes:
            fake.requests.clear()
        streamed, plain = await round_of_load(proxy)

        # Nothing hung, nothing malformed (the checks raise), and every request got an answer.
        assert streamed["hung"] == plain["hung"] == 0
        assert sum(streamed.values()) == sum(plain.values()) == REQUESTS // 2
        # The faults really struck, at about their rates.
        upstream = [r for fake in (a, b) for r in fake.requests]
        drawn += len(upstream)
        # Counted over every draw since the fakes started: each draws from its own seeded
        # sequence, so only how many requests each one got depends on timing. From the start,
        # any split of 60 or more draws each has 0.205-0.285 faults a draw (seeds 1 and 2); a
        # window of one round could hold as few as 0.15 on a loaded machine, where cooldown
        # moved fewer requests to the fallback (it failed so once).
        struck = a.faulted + b.faulted
        assert 0.15 < sum(struck.values()) / drawn < 0.35, (struck, drawn)
        assert len(set(struck)) >= len(FAULT_RATES) - 2, struck
        assert backup.requests, "some requests needed the fallback"
        # What can be recovered was: without streams cut after their first event, all of it.
        assert plain["ok"] == REQUESTS // 2, plain
        mid_stream = sum(
            1 for r in upstream if r.fault in STREAM_FAULTS and r.body.get("stream") is True
        )
        assert streamed["stream error event"] == mid_stream, (streamed, mid_stream)
        assert streamed["ok"] == REQUESTS // 2 - mid_stream, streamed
        assert streamed["ok"] + plain["ok"] >= 0.99 * (REQUESTS - mid_stream)

        # And afterwards: no upstream request or connection still held, no task left behind.
        await eventually(lambda: all(fake.in_flight == 0 for fake in fakes), within=30.0)
        await eventually(lambda: pool.busy_connections == 0, within=30.0)
        await eventually(lambda: not proxy.runner.server.connections, within=30.0)  # type: ignore[union-attr]
        runtime = proxy.app[aioproxy.keys.runtime_key]
        snapshot = runtime.router.snapshot(runtime.deployments)
        assert all(row["in_flight"] == 0 for row in snapshot), snapshot
        assert pool.idle_connections <= 2 * CONCURRENCY + 20
        upstream_conns = sum(
            len(s.runner.server.connections)
            for s in servers  # type: ignore[union-attr]
        )
        await asyncio.sleep(0.05)
        gc.collect()
        tasks = [t for t in asyncio.all_tasks() if not t.done()]
        stray = [t for t in tasks if runs_aioproxy_code(t) and t not in app_tasks]
        assert not stray, stray
        # One task per open connection into a fake (the proxy's idle pool), and the baseline.
        assert len(tasks) <= baseline_tasks + upstream_conns, (
            len(tasks),
            baseline_tasks,
            upstream_conns,
        )
        leftovers.append({kind.__name__: live(kind, proxy) for kind in per_request})

    # No per-request object outlives its request, in either round.
    assert leftovers[0] == leftovers[1] == {kind.__name__: 0 for kind in per_request}, leftovers


# -- a sustained fault rate on every upstream (issue #10.1) -----------------------------------

# 20% of upstream requests fail, every way that is worth a retry: resets, 5xx, 429, hangs,
# garbage and answers cut before the end. Each fake draws from its own seeded generator.
SUSTAINED_FAULTS = {
    "reset": 0.03,
    "cut_body": 0.02,
    "status:500": 0.03,
    "status:503": 0.03,
    "status:429": 0.03,
    "hang": 0.03,
    "garbage": 0.03,
}
SUSTAINED_REQUESTS = 400  # independent faults predict ~0.2% failures; 97% leaves room for 12
REQUEST_INTERVAL = 0.1  # fake seconds between requests: cooldowns start and end as under load


async def test_success_rate_under_a_sustained_fault_rate(
    aiohttp_server: Any, serve_proxy: ServeProxy, monkeypatch: Any
) -> None:
    """Two deployments, a fallback model and one retry, every upstream failing 20% of the time:
    at least 97% of requests succeed. Deterministic: the requests go one at a time, the faults,
    the router's choices and its clock are seeded or fake, hangs end at a small first-byte
    timeout."""
    monkeypatch.setattr(aioproxy.router, "random", random.Random(10))
    fakes = [FakeOpenAI(fault_rates=SUSTAINED_FAULTS, seed=seed) for seed in (1, 2, 3)]
    bases = [str((await aiohttp_server(fake.app())).make_url("/v1")) for fake in fakes]
    config = gateway_config(
        bases[0],
        router={
            "num_retries": 1,
            "cooldown_failures": 3,
            "cooldown_window": 10,
            "cooldown_seconds": 5,
            "fallbacks": {"gpt-test": ["backup"]},
        },
        upstream={"timeouts": {"connect": 2, "first_byte": 0.25, "read": 2}},
        server={"keepalive_interval": 0},
    )
    proxy = await serve_proxy(pair_and_backup(config, bases))
    clock = FakeClock().install(proxy)
    outcomes: Counter[str] = Counter()
    async with aiohttp.ClientSession() as http:
        for i in range(SUSTAINED_REQUESTS):
            outcomes[await one(http, proxy, i, stream=i % 2 == 0)] += 1
            clock.advance(REQUEST_INTERVAL)
    upstream = [r for fake in fakes for r in fake.requests]
    faulted = sum(1 for r in upstream if r.fault)
    assert 0.15 < faulted / len(upstream) < 0.25, (faulted, len(upstream))
    assert fakes[2].requests, "the fallback served some"
    assert outcomes["ok"] >= 0.97 * SUSTAINED_REQUESTS, outcomes
