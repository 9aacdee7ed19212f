"""What the root tests share besides fixtures (those are in conftest.py): keys, the config of a
proxy in front of the fake upstream, SDK clients, and run.py started as a real process."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Handler

from aioproxy import Call, Deployment, JSONReply, Secret, StreamReply
from aioproxy.testing import FakeOpenAI, eventually

__all__ = [
    "ALICE",
    "AUTH",
    "BOB",
    "CHAT",
    "HI_CHUNK",
    "MASTER_KEY",
    "MESSAGES",
    "ROOT",
    "UPSTREAM_KEY",
    "UPSTREAM_MODEL",
    "FakeChat",
    "ServeProxy",
    "alice_and_bob",
    "clean_env",
    "free_port",
    "gateway_config",
    "running",
    "sdk",
    "start_run_py",
    "wait_healthy",
]

ROOT = Path(__file__).parents[1]
MASTER_KEY = "sk-master-test"
UPSTREAM_KEY = "sk-upstream-secret"
UPSTREAM_MODEL = "gpt-4o-mini"
# What the openai SDK sends: its key, and a JSON Content-Type (bodies of any other are refused).
AUTH = {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}
CHAT = "/v1/chat/completions"
# A deployment with a key, for checking that what the proxy relays never shows it.
KEYED = Deployment(
    name="keyed", provider="chatonly", model="up-model", api_key=Secret(UPSTREAM_KEY)
)
MESSAGES = [{"role": "user", "content": "hi"}]
# Two client keys besides the master key, for what one key may see of the other's.
ALICE, BOB = "sk-alice-test", "sk-bob-test"


def alice_and_bob() -> dict[str, Any]:
    """An ``[auth]`` table with both keys: a new one each call, for a test may change its own."""
    return {
        "master_key": MASTER_KEY,
        "keys": [{"key": ALICE, "name": "alice"}, {"key": BOB, "name": "bob"}],
    }


# A minimal chat chunk, for fake upstreams that write their streams by hand.
HI_CHUNK = {
    "id": "c1",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
}

ServeProxy = Callable[..., Awaitable[TestServer]]
"""conftest's ``serve_proxy`` fixture: ``await serve_proxy(config, plugins)``."""


def upstream_model(
    name: str, api_base: str, provider: str = "openai", **entry: Any
) -> dict[str, Any]:
    """A ``[[models]]`` entry ``name``: ``provider`` on the fake upstream at ``api_base``, with
    the upstream's model id and key (``entry`` adds or replaces keys)."""
    return {
        "name": name,
        "provider": provider,
        "model": UPSTREAM_MODEL,
        "api_base": api_base,
        "api_key": UPSTREAM_KEY,
        **entry,
    }


def gateway_config(api_base: str, **overrides: Any) -> dict[str, Any]:
    """The issue's TOML shape, as a mapping: one model `gpt-test` on the fake upstream."""
    config: dict[str, Any] = {
        "auth": {"master_key": MASTER_KEY},
        "models": [upstream_model("gpt-test", api_base), {"name": "echo", "provider": "echo"}],
    }
    config.update(overrides)
    return config


def sdk(server: TestServer, key: str = MASTER_KEY, prefix: str = "/v1") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(server.make_url(prefix)), api_key=key, max_retries=0)


# -- run.py as a process -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(extra)
    return env


async def wait_healthy(port: int) -> None:
    """Wait until the process on ``port`` answers ``/health`` with 200 (30 s safety net)."""
    async with aiohttp.ClientSession() as http:

        async def healthy() -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{port}/health") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(healthy, within=30, interval=0.05, what=f"run.py healthy on {port}")


async def start_run_py(
    *args: str, env: dict[str, str] | None = None, stderr: int = asyncio.subprocess.DEVNULL
) -> tuple[asyncio.subprocess.Process, int, list[str]]:
    """``python run.py --port 0 ARGS``: (the process, the port it bound, its announce lines).

    The port comes from the process itself, which prints it once it listens and handles
    SIGTERM: a free port picked beforehand can be taken by another process meanwhile (whose
    /health would then answer for this one, still starting)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "run.py", "--port", "0", *args,
        cwd=ROOT, env=env or clean_env(), stdout=asyncio.subprocess.PIPE, stderr=stderr,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        first = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()  # safety net
        lines = [first, (await process.stdout.readline()).decode()]
    except BaseException:
        process.kill()
        await process.wait()
        raise
    match = re.search(r"serving on http://[^:]+:(\d+)", first)
    assert match, f"run.py did not announce its port: {first!r}"
    return process, int(match.group(1)), lines


@asynccontextmanager
async def running(
    *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[int, list[str]]]:
    """Start run.py, wait for /health, yield (port, its announce lines); stop it after."""
    process, port, lines = await start_run_py(*args, env=env)
    try:
        await wait_healthy(port)
        yield port, lines
    finally:
        process.terminate()
        await process.wait()


class HeldUpstream(FakeOpenAI):
    """The fake OpenAI upstream, holding the requests that reach it (while ``holding``) until
    the test sets ``release``: so that they are all in flight at once. ``arrived`` counts every
    request, ``held`` those waiting now."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = True
        self.release = asyncio.Event()
        self.arrived = 0
        self.held = 0

    def app(self) -> web.Application:
        app = super().app()
        app.middlewares.append(self._hold)
        return app

    @web.middleware
    async def _hold(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.arrived += 1
        if self.holding:
            self.held += 1
            try:
                await self.release.wait()
            finally:
                self.held -= 1
        return await handler(request)


class FakeChat:
    """A chat-completions provider method for the bridge tests: records each call and answers
    with ``answer(call)``: a reply, a body, or a list of stream events (bytes, an ``asyncio.Event``
    to wait for, or an exception to raise)."""

    def __init__(self, answer: Callable[[Call], Any]) -> None:
        self.answer = answer
        self.calls: list[Call] = []
        self.closed = 0

    async def __call__(self, call: Call) -> JSONReply | StreamReply:
        self.calls.append(call)
        answer = self.answer(call)
        if isinstance(answer, list):
            return StreamReply(self._events(answer), close=self._close)
        if isinstance(answer, (JSONReply, StreamReply)):
            return answer
        return JSONReply.of(answer)

    async def _events(self, events: list[Any]) -> AsyncIterator[bytes]:
        for event in events:
            if isinstance(event, asyncio.Event):
                await event.wait()
            elif isinstance(event, BaseException):
                raise event
            else:
                yield event

    def _close(self) -> None:
        self.closed += 1

    @property
    def body(self) -> dict[str, Any]:
        return self.calls[-1].json()
