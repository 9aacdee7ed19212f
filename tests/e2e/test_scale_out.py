"""Several real ``run.py`` processes sharing one Redis and one database act as one gateway:
one rpm, one budget, one view of keys and of deployments' health; Redis may die meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from aioproxy.testing import FakeOpenAI
from tests.redis_server import RedisServer, redis_server, redis_url
from tests.support import ROOT, clean_env, free_port, running

__all__ = ["redis_server", "redis_url"]  # the fixtures, used here

MASTER = "sk-scale-out-master"
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
PRICE = "{input = 2.0, output = 8.0}"


def write_config(folder: Path, upstream: str, redis: str, extra: str = "") -> Path:
    path = folder / "proxy.toml"
    model = f'{{name = "gpt-test", provider = "openai", api_base = "{upstream}", api_key = "sk-up", price = {PRICE}}}'
    path.write_text(
        f'auth = {{master_key = "{MASTER}"}}\n'
        "router = {retry_backoff = 0, num_retries = 0, cooldown_failures = 1}\n"
        # An hour between database polls: only Redis carries key changes between instances.
        f'database = {{url = "sqlite:///{folder / "db.sqlite3"}", poll_interval = 3600}}\n'
        # A generous timeout: a loaded test machine's loop lag must not pass for a lost Redis.
        f'state = {{redis_url = "{redis}", timeout = 10.0}}\n'
        f"models = [{model}]\n{extra}",
        encoding="utf-8",
    )
    return path


class Gateway:
    def __init__(self, ports: list[int], session: aiohttp.ClientSession) -> None:
        self.ports = ports
        self.session = session

    def url(self, index: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[index % len(self.ports)]}{path}"

    async def call(
        self, index: int, method: str, path: str, key: str, body: Any = None
    ) -> tuple[int, Any]:
        async with self.session.request(
            method, self.url(index, path), json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            return response.status, await response.json(content_type=None)

    async def chat(self, index: int, key: str, **extra: Any) -> int:
        return (await self.call(index, "POST", "/v1/chat/completions", key, {**CHAT, **extra}))[0]

    async def new_key(self, **fields: Any) -> dict[str, Any]:
        status, created = await self.call(0, "POST", "/admin/keys", MASTER, {"name": "k", **fields})
        assert status == 201, created
        # Known everywhere (pub/sub): /v1/models says so, 30 times in a row on new connections,
        # which the kernel spreads over the workers sharing a port.
        known = 0
        async with asyncio.timeout(30):  # safety net
            while known < 30:
                status, _ = await self.call(known, "GET", "/v1/models", created["key"])
                known = known + 1 if status == 200 else 0
        return created


@contextlib.asynccontextmanager
async def gateway(config: Path, instances: int = 3, workers: int = 1) -> AsyncIterator[Gateway]:
    args = ("--config", str(config), "--log-level", "error")
    async with contextlib.AsyncExitStack() as stack:
        ports = []
        for _ in range(instances):
            extra: tuple[str, ...] = ()
            if workers > 1:  # workers share one fixed port (SO_REUSEPORT)
                extra = ("--workers", str(workers), "--port", str(free_port()))
            port, _ = await stack.enter_async_context(running(*args, *extra, env=clean_env()))
            ports.append(port)
        session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        )
        yield Gateway(ports, session)


@pytest.fixture
async def upstream(aiohttp_server: Any, fake: FakeOpenAI) -> str:
    return str((await aiohttp_server(fake.app())).make_url("/v1"))


@pytest.mark.parametrize("workers", [1, 3], ids=["3-instances", "workers-3"])
async def test_rpm_admits_exactly_the_limit(
    tmp_path: Path, upstream: str, redis_url: str, workers: int
) -> None:
    config = write_config(tmp_path, upstream, redis_url)
    async with gateway(config, instances=3 if workers == 1 else 1, workers=workers) as gw:
        key = (await gw.new_key(rpm=50))["key"]
        statuses = await asyncio.gather(*(gw.chat(i, key) for i in range(200)))
    assert statuses.count(200) == 50 and statuses.count(429) == 150


async def test_tpm_holds_within_one_reservation(
    tmp_path: Path, upstream: str, redis_url: str
) -> None:
    config = write_config(tmp_path, upstream, redis_url)
    async with gateway(config) as gw:
        key = (await gw.new_key(tpm=2000))["key"]
        replies = await asyncio.gather(
            *(gw.call(i, "POST", "/v1/chat/completions", key, {**CHAT, "max_tokens": 50})
              for i in range(60))
        )  # fmt: skip
    admitted = [body for status, body in replies if status == 200]
    used = sum(body["usage"]["total_tokens"] for body in admitted)
    reservation = 50 + len(str(CHAT)) // 4 + 10  # max_tokens and the prompt's estimate
    assert admitted and used <= 2000 + reservation
    assert {status for status, _ in replies} == {200, 429}


async def test_budget_spent_on_one_refuses_on_the_others(
    tmp_path: Path, upstream: str, redis_url: str
) -> None:
    config = write_config(tmp_path, upstream, redis_url)
    async with gateway(config) as gw:
        key = (await gw.new_key(max_budget=0.000001))["key"]
        assert await gw.chat(0, key) == 200  # costs more than the whole budget
        async with asyncio.timeout(30):  # safety net: the cost is settled after the answer
            while await gw.chat(1, key) == 200:
                await asyncio.sleep(0.01)
        status, body = await gw.call(2, "POST", "/v1/chat/completions", key, CHAT)
    assert status == 429 and body["error"]["code"] == "insufficient_quota"


async def test_revoked_key_refused_everywhere(
    tmp_path: Path, upstream: str, redis_url: str
) -> None:
    config = write_config(tmp_path, upstream, redis_url)
    async with gateway(config) as gw:
        created = await gw.new_key(rpm=1000)
        status, _ = await gw.call(0, "DELETE", f"/admin/keys/{created['id']}", MASTER)
        assert status == 200
        for index in (1, 2):
            async with asyncio.timeout(30):  # safety net: the database is not polled here
                while await gw.chat(index, created["key"]) != 401:
                    await asyncio.sleep(0.01)


async def test_failing_deployment_is_skipped_by_the_others(
    tmp_path: Path, upstream: str, redis_url: str, fake: FakeOpenAI
) -> None:
    config = write_config(tmp_path, upstream, redis_url)
    async with gateway(config) as gw:
        assert (await gw.call(1, "GET", "/health/readiness", MASTER))[0] == 200
        fake.faults = ["status:500"]
        assert await gw.chat(0, MASTER) >= 500  # fails through instance 0: it cools down
        for index in (1, 2):
            async with asyncio.timeout(30):  # safety net: the cooldown is published at once
                while (await gw.call(index, "GET", "/health/readiness", MASTER))[0] != 503:
                    await asyncio.sleep(0.01)
            _, body = await gw.call(index, "GET", "/health/readiness", MASTER)
            assert body["deployments"][0]["cooldown_remaining"] > 0


async def test_redis_killed_mid_load(
    tmp_path: Path, upstream: str, redis_url: str, redis_server: RedisServer
) -> None:
    config = write_config(tmp_path, upstream, redis_url)
    async with gateway(config) as gw:
        key = (await gw.new_key(rpm=100_000, tpm=10_000_000))["key"]
        done = 0

        async def one(index: int) -> int:
            nonlocal done
            status = await gw.chat(index, key)
            done += 1
            return status

        load = [asyncio.ensure_future(one(i)) for i in range(300)]
        async with asyncio.timeout(120):  # safety net: no request hangs on a dead Redis
            while done < 100:
                await asyncio.sleep(0.001)
            redis_server.kill()
            while done < 200:
                await asyncio.sleep(0.001)
            redis_server.start()
            statuses = await asyncio.gather(*load)
        assert statuses == [200] * 300  # no 5xx, no refusal: "open" serves meanwhile

        # Shared limits resume: a new key's rpm = 3 holds across the three instances.
        async def shared_again() -> bool:
            fresh = (await gw.new_key(rpm=3))["key"]
            return [await gw.chat(i, fresh) for i in range(4)] == [200, 200, 200, 429]

        async with asyncio.timeout(60):  # safety net: each instance probes every half second
            while not await shared_again():
                await asyncio.sleep(0.1)


async def refused(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "run.py", "--port", str(free_port()), *args,
        cwd=ROOT, env=clean_env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 60)  # safety net
    return process.returncode or 0, stderr.decode()


@pytest.mark.parametrize(
    "extra",
    [
        'models = [{name = "m", provider = "echo", rpm = 10}]\n',
        "cache = {enabled = true}\n",
        "database-key",
    ],
    ids=["deployment-cap", "cache", "database-key"],
)
async def test_workers_without_redis_refuse_limits(tmp_path: Path, extra: str) -> None:
    database = f'database = {{url = "sqlite:///{tmp_path / "db.sqlite3"}"}}\n'
    config = tmp_path / "proxy.toml"
    if extra == "database-key":
        config.write_text(f'auth = {{master_key = "{MASTER}"}}\n{database}', encoding="utf-8")
        async with running("--config", str(config), env=clean_env()) as (port, _):
            gw = Gateway([port], aiohttp.ClientSession())
            async with gw.session:
                status, _ = await gw.call(0, "POST", "/admin/keys", MASTER, {"name": "k", "tpm": 9})
                assert status == 201
        extra = ""
    config.write_text(f'auth = {{master_key = "{MASTER}"}}\n{database}{extra}', encoding="utf-8")
    code, stderr = await refused("--config", str(config), "--workers", "2")
    assert code == 2 and "[state] redis_url" in stderr


async def test_workers_without_limits_start(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    database = f'database = {{url = "sqlite:///{tmp_path / "db.sqlite3"}"}}\n'
    config.write_text(f'auth = {{master_key = "{MASTER}"}}\n{database}', encoding="utf-8")
    port = str(free_port())
    async with running("--config", str(config), "--workers", "2", "--port", port) as (bound, _):
        assert bound == int(port)
        gw = Gateway([bound], aiohttp.ClientSession())
        async with gw.session:
            # Nothing limited now, nor later: a limit set through the admin API is refused too.
            status, body = await gw.call(0, "POST", "/admin/keys", MASTER, {"name": "k", "rpm": 9})
            assert status == 409 and "[state] redis_url" in body["error"]["message"]
            status, _ = await gw.call(0, "POST", "/admin/keys", MASTER, {"name": "k"})
            assert status == 201
