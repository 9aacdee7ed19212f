"""/metrics under ``run.py --workers 2``: whichever worker answers, it sums every worker's counts."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.mmap_dict import MmapedDict

from aioproxy.testing import FakeOpenAI
from tests.e2e.test_metrics import Samples, parse, value
from tests.support import clean_env, free_port, running

KEY = "sk-workers-master"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi there, workers"}]}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
PRICE = {"input": 1.5, "output": 4.0}  # USD per million tokens
COOLING = "aioproxy_deployment_cooling"
_MAX_ROUNDS = 50  # rounds until both workers have served; once both serve, all of them land
# on one worker with probability 2**-(2 * rounds - 1)


def requests_by_worker(
    folder: Path, ignored: tuple[str, ...] = ("health", "metrics")
) -> dict[str, float]:
    """Each worker's own count of finished requests from its file in the shared folder: by
    default API requests only (not health checks nor scrapes, which the readiness probe makes
    too); ``ignored=()`` counts every request."""
    counts: dict[str, float] = {}
    for path in folder.glob("counter_*.db"):
        total = 0.0
        for key, count, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _ = json.loads(key)
            if name == "aioproxy_requests_total" and labels.get("kind") not in ignored:
                total += count
        if total:
            counts[path.stem.removeprefix("counter_")] = total
    return counts


async def fresh(method: str, url: str, body: Any = None, seen: Counter[str] | None = None) -> int:
    """One request on a new connection (so that the kernel may hand it to either worker);
    the tokens of its answer's usage (a stream's usage chunk too) are added to ``seen``."""
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, json=body, headers=AUTH) as response:
            raw = await response.read()
    if seen is not None and response.status == 200:
        bodies = [raw] if not body.get("stream") else _events(raw)
        for usage in (json.loads(one).get("usage") for one in bodies):
            if usage:
                seen["input"] += usage["prompt_tokens"]
                seen["output"] += usage["completion_tokens"]
    return response.status


def _events(raw: bytes) -> list[bytes]:
    return [
        line.removeprefix(b"data: ")
        for line in raw.splitlines()
        if line.startswith(b"data: ") and line != b"data: [DONE]"
    ]


async def scrape(base: str) -> str:
    async with aiohttp.ClientSession() as http:  # a new connection: either worker may answer
        async with http.get(f"{base}/metrics", headers=AUTH) as response:
            assert response.status == 200
            return await response.text()


async def test_counts_summed_across_workers(tmp_path: Path, aiohttp_server: Any) -> None:
    fake = FakeOpenAI()
    upstream = await aiohttp_server(fake.app())
    config = tmp_path / "proxy.toml"
    base = upstream.make_url("/v1")
    price = f"{{input = {PRICE['input']}, output = {PRICE['output']}}}"
    model = f'provider = "openai", api_base = "{base}", api_key = "sk-up"'
    # cold: nothing listens at its address, so it fails each of its attempts and cools down.
    cold = f'provider = "openai", api_base = "http://127.0.0.1:{free_port()}/v1", api_key = "x"'
    models = ", ".join(
        (
            f'{{name = "gpt-test", {model}, price = {price}}}',
            f'{{name = "primary", {model}}}',
            f'{{name = "cold", {cold}}}',
        )
    )
    config.write_text(
        f'auth = {{master_key = "{KEY}"}}\n'
        "router = {retry_backoff = 0, cooldown_failures = 3, cooldown_seconds = 600, "
        'models = {primary = {num_retries = 0, fallbacks = ["gpt-test"]}, '
        "cold = {num_retries = 2}}}\n"
        f"metrics = {{enabled = true}}\nmodels = [{models}]\n",
        encoding="utf-8",
    )
    folder = tmp_path / "prometheus"
    folder.mkdir()
    (folder / "counter_999999.db").write_bytes(b"stale")  # an earlier run's: removed at start
    env = clean_env(PROMETHEUS_MULTIPROC_DIR=str(folder))
    # Workers share a port they each bind (SO_REUSEPORT): a fixed one, not --port 0's (which
    # would give each its own); the last --port given wins over running()'s.
    port = str(free_port())
    args = ("--config", str(config), "--workers", "2", "--log-level", "warning", "--port", port)
    async with running(*args, env=env) as (port, _):
        base = f"http://127.0.0.1:{port}"
        # The readiness probe waited for one worker: the other may still be starting (on a
        # loaded machine, for longer than the rounds below take). Both must serve first.
        async with asyncio.timeout(60):  # a safety net, never the assertion
            while len(requests_by_worker(folder, ignored=())) < 2:
                assert await fresh("GET", f"{base}/health") == 200
                await asyncio.sleep(0.05)
        rounds = 0
        seen: Counter[str] = Counter()  # the tokens the clients were told of
        chat = f"{base}/v1/chat/completions"
        while len(requests_by_worker(folder)) < 2 and rounds < _MAX_ROUNDS:
            rounds += 1
            assert await fresh("POST", chat, CHAT, seen) == 200
            assert await fresh("POST", chat, STREAM, seen) == 200
            assert await fresh("POST", chat, {**CHAT, "model": "nope"}) == 404
            fake.faults = ["status:500"]  # retried
            assert await fresh("POST", chat, CHAT, seen) == 200
        fake.faults = ["status:500"]  # primary fails (no retries): falls back to gpt-test
        assert await fresh("POST", chat, {**CHAT, "model": "primary"}, seen) == 200
        # cold fails its three attempts: cooling in the worker that tried it, which every
        # worker's scrape shows (the highest of the live workers' values).
        cold_requests = 0
        async with asyncio.timeout(60):  # a safety net, never the assertion
            while True:
                cold_requests += 1
                assert await fresh("POST", chat, {**CHAT, "model": "cold"}) >= 500
                if value(parse(await scrape(base)), COOLING, deployment="cold#0") == 1:
                    break
        api_requests = 4 * rounds + 1 + cold_requests
        # Each worker moves its counts into the shared folder once a second: wait for both.
        async with asyncio.timeout(30):  # a safety net, never the assertion
            while sum(requests_by_worker(folder).values()) < api_requests:
                await asyncio.sleep(0.05)
        by_worker = requests_by_worker(folder)
        assert len(by_worker) == 2, by_worker
        scrapes = [parse(await scrape(base)) for _ in range(4)]  # whichever worker answers
    assert "999999" not in by_worker
    for samples in scrapes:
        requests = "aioproxy_requests_total"
        chat = "chat_completions"
        assert value(samples, requests, kind=chat, model="gpt-test", status="200") == 3 * rounds
        assert value(samples, requests, kind=chat, model="unknown", status="404") == rounds
        upstream_total = "aioproxy_upstream_requests_total"
        # 3 a round, and the fallback's.
        assert value(samples, upstream_total, deployment="gpt-test#0", status="200") == (
            3 * rounds + 1
        )
        assert value(samples, upstream_total, deployment="primary#0", status="500") == 1
        assert value(samples, upstream_total, deployment="gpt-test#0", status="500") == rounds
        assert value(samples, "aioproxy_retries_total", model="gpt-test") == rounds
        assert value(samples, "aioproxy_fallbacks_total", model="primary") == 1
        assert value(samples, requests, kind=chat, model="primary", status="200") == 1
        ttft = "aioproxy_time_to_first_token_seconds_count"
        assert value(samples, ttft, model="gpt-test") == rounds
        _assert_tokens_and_spend(samples, seen)
        assert value(samples, COOLING, deployment="cold#0") == 1
        assert value(samples, COOLING, deployment="primary#0") == 0
        # Besides the API requests, only the health checks and earlier scrapes.
        others = sum(
            v
            for (name, labels), v in samples.items()
            if name == requests and (("kind", "metrics") in labels or ("kind", "health") in labels)
        )
        assert sum(v for (name, _), v in samples.items() if name == requests) == (
            api_requests + others
        )
        assert value(samples, "aioproxy_in_flight_requests") == 0  # a scrape does not count itself


def _assert_tokens_and_spend(samples: Samples, seen: Counter[str]) -> None:
    """Every token the clients were told of (the fallback's under the model that served it),
    and its price, summed over both workers."""
    assert seen["input"] > 0 and seen["output"] > 0
    tokens = "aioproxy_tokens_total"
    assert value(samples, tokens, model="gpt-test", type="input") == seen["input"]
    assert value(samples, tokens, model="gpt-test", type="output") == seen["output"]
    spend = (seen["input"] * PRICE["input"] + seen["output"] * PRICE["output"]) / 1e6
    assert value(samples, "aioproxy_spend_usd_total", model="gpt-test") == pytest.approx(spend)


async def test_one_process_given_the_folder_counts_only_its_own(tmp_path: Path) -> None:
    """PROMETHEUS_MULTIPROC_DIR set for one process (no --workers): the folder is emptied at
    start as for workers, so a gateway restarted on it does not report its last run's counts."""
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'auth = {{master_key = "{KEY}"}}\nmetrics = {{enabled = true}}\n'
        'models = [{name = "echo", provider = "echo"}]\n',
        encoding="utf-8",
    )
    folder = tmp_path / "prometheus"
    folder.mkdir()
    env = clean_env(PROMETHEUS_MULTIPROC_DIR=str(folder))
    echo = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    args = ("--config", str(config), "--log-level", "warning")
    for run, requests in enumerate((3, 1)):
        async with running(*args, env=env) as (port, _):
            base = f"http://127.0.0.1:{port}"
            for _ in range(requests):
                assert await fresh("POST", f"{base}/v1/chat/completions", echo) == 200
            samples = parse(await scrape(base))
        total = value(
            samples, "aioproxy_requests_total", kind="chat_completions", model="echo", status="200"
        )
        assert total == requests, f"run {run + 1}"
