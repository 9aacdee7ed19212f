"""Graceful shutdown (issue #4, item 7) of a real ``python run.py`` process: on SIGTERM it stops
accepting at once, lets in-flight streams finish within ``server.shutdown_grace``, and exits 0;
with a tiny grace it exits promptly anyway."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import aioproxy_echo
import aioproxy_openai
import pytest
from aiohttp import web
from aioproxy_otel import OTelPlugin
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from aioproxy import create_app
from aioproxy.keys import plugin_manager_key
from aioproxy.server import serve_with
from aioproxy.testing import FakeOpenAI, eventually
from tests.support import (
    AUTH,
    MASTER_KEY,
    UPSTREAM_KEY,
    gateway_config,
    start_run_py,
    wait_healthy,
)

# Subprocesses, signals or load: one xdist worker, not starved by parallel hypothesis tests.
pytestmark = pytest.mark.xdist_group("wallclock")

WORDS = [f"w{i}" for i in range(40)]
PROMPT = " ".join(WORDS)
DELAY = 0.04  # seconds per echoed token: a 40-token stream takes 1.6 s


def write_config(path: Path, grace: float, upstream: str = "http://127.0.0.1:1/v1") -> Path:
    path.write_text(f"""
[auth]
master_key = "{MASTER_KEY}"

[server]
shutdown_grace = {grace}

[[models]]
name = "slow-echo"
provider = "echo"
settings = {{ delay = {DELAY} }}

[[models]]
name = "gpt-test"
provider = "openai"
model = "gpt-4o-mini"
api_base = "{upstream}"
api_key = "{UPSTREAM_KEY}"
""")
    return path


@asynccontextmanager
async def running(config: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``python run.py --config F --port 0``, healthy; killed at the end if still running."""
    process, port, _ = await start_run_py("--config", str(config), "--log-level", "warning")
    try:
        await wait_healthy(port)
        yield process, port
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def wait_refused(port: int) -> None:
    """Until a new connection to ``port`` is refused (what the tests assert is the order of
    events around it; the 10 s is a safety net)."""
    await eventually(lambda: refused(port), within=10, what="new connections refused")


def open_stream(
    http: aiohttp.ClientSession, port: int, model: str
) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
    """POST a streamed chat request to the proxy on ``port`` (``async with`` the result)."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    return http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=AUTH)


async def read_events(response: aiohttp.ClientResponse) -> list[str]:
    """Every data payload until the stream ends (or breaks off: then what came before)."""
    events = []
    try:
        async for line in response.content:
            if line.startswith(b"data: "):
                events.append(line[6:].decode().strip())
    except aiohttp.ClientPayloadError:
        pass
    return events


def chat_text(events: list[str]) -> str:
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_sigterm_lets_the_stream_finish_and_refuses_new_connections(tmp_path: Path) -> None:
    async with running(write_config(tmp_path / "c.toml", grace=60)) as (process, port):
        async with aiohttp.ClientSession() as idle, aiohttp.ClientSession() as http:
            # An idle keep-alive connection must not hold the shutdown up.
            async with idle.get(f"http://127.0.0.1:{port}/health") as response:
                assert response.status == 200
            async with open_stream(http, port, "slow-echo") as response:
                assert response.status == 200
                first = [await response.content.readline() for _ in range(6)]  # a few events
                assert any(line.startswith(b"data: ") for line in first)

                process.send_signal(signal.SIGTERM)
                await wait_refused(port)
                assert process.returncode is None, "still running for the stream in flight"

                events = [line[6:].decode().strip() for line in first if line.startswith(b"data: ")]
                after_refusal = await read_events(response)
                events += after_refusal
        # The grace is 60 s: an exit within the 30 s safety net is an exit once the stream is done.
        code = await asyncio.wait_for(process.wait(), 30)
    assert events[-1] == "[DONE]", events[-3:]
    assert chat_text(events) == PROMPT  # the whole answer, none of it lost
    assert len(after_refusal) > 1, "the stream really was in flight after new ones were refused"
    assert code == 0


async def test_sigterm_lets_a_proxied_upstream_stream_finish(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    """The upstream session stays open until the in-flight streams through it are over."""
    fake = FakeOpenAI()
    fake.stream_chunks, fake.stream_delay = 20, 0.05  # one second of stream
    upstream = await aiohttp_server(fake.app())
    config = write_config(tmp_path / "c.toml", grace=10, upstream=str(upstream.make_url("/v1")))
    async with running(config) as (process, port):
        async with aiohttp.ClientSession() as http:
            async with open_stream(http, port, "gpt-test") as response:
                first = await response.content.readline()
                assert first.startswith(b"data: ")
                process.send_signal(signal.SIGTERM)
                await wait_refused(port)
                events = [first[6:].decode().strip(), *await read_events(response)]
        assert await asyncio.wait_for(process.wait(), 10) == 0
    assert events[-1] == "[DONE]"
    assert chat_text(events) == f"fake reply to: {PROMPT}"
    assert fake.in_flight == 0


@pytest.mark.parametrize(
    "grace",
    [
        0.3,
        0,
    ],
)
async def test_tiny_grace_exits_promptly_anyway(tmp_path: Path, grace: float) -> None:
    async with running(write_config(tmp_path / "c.toml", grace=grace)) as (process, port):
        async with aiohttp.ClientSession() as http:
            async with open_stream(http, port, "slow-echo") as response:
                await response.content.readline()
                process.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(process.wait(), 30)
                events = await read_events(response)
    assert code == 0
    assert "[DONE]" not in events, "cut short: it did not wait for the stream to finish"


async def test_sigterm_when_idle_exits_at_once(tmp_path: Path) -> None:
    async with running(write_config(tmp_path / "c.toml", grace=30)) as (process, port):
        process.send_signal(signal.SIGTERM)
        # The grace is 30 s: exiting within the 10 s safety net is exiting without waiting for it.
        assert await asyncio.wait_for(process.wait(), 10) == 0
        assert await refused(port)


def _counted(exposition: bytes, name: str, label: str) -> dict[str, float]:
    """The non-zero samples of counter ``name``, by the value of ``label``."""
    return {
        sample.labels[label]: sample.value
        for family in text_string_to_metric_families(exposition.decode())
        for sample in family.samples
        if sample.name == name and sample.value
    }


@pytest.mark.parametrize("case", ["answer", "stream", "keepalive"])
async def test_a_request_the_stop_cuts_short_is_logged_as_the_stops(
    tmp_path: Path, aiohttp_server: Any, access_lines: io.StringIO, case: str
) -> None:
    """The shutdown grace runs out with a request in flight (its upstream keeps it waiting):
    aiohttp cancels its handler, as when its client leaves, yet its access line, its
    aioproxy_requests_total count, its request-log row and its span say the stop cut it
    (``server_shutdown``; 503 before its answer began, the 200 a stream had sent after, be it
    with its first event or a keep-alive comment), never 499 ``client_disconnected``. Served
    as run.py serves it (server.serve_with), grace 0."""
    stream = case != "answer"
    fake = FakeOpenAI()
    fake.faults = ["stall_stream" if case == "stream" else "hang"]
    upstream = await aiohttp_server(fake.app())
    database = tmp_path / "control.sqlite3"
    config = gateway_config(
        str(upstream.make_url("/v1")),
        logging={"access_log": True},
        metrics={"enabled": True},
        database={"url": f"sqlite:///{database}"},
        server={"keepalive_interval": 0.01} if case == "keepalive" else {},
    )
    spans = InMemorySpanExporter()
    traces = TracerProvider()
    traces.add_span_processor(SimpleSpanProcessor(spans))
    plugins = [aioproxy_openai, aioproxy_echo, OTelPlugin(tracer_provider=traces)]
    app = create_app(config, plugins=plugins, load_entrypoints=False)
    observer = app[plugin_manager_key].get_plugin("aioproxy.observer")
    # As cli.serve runs it, with a grace of 0 (run.py's 0.001 s).
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.001)
    await runner.setup()
    serve_with(runner, app)
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"
    began = asyncio.Event()  # the stream's status and first event reached the client
    async with aiohttp.ClientSession() as http:

        async def ask() -> None:
            body = {
                "model": "gpt-test",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": stream,
            }
            async with http.post(url, json=body, headers=AUTH) as response:
                assert response.status == 200
                await response.content.readline()
                began.set()
                await response.read()

        asking = asyncio.create_task(ask())
        if stream:
            await began.wait()
        else:  # in flight: the upstream has it, and keeps it waiting
            await eventually(lambda: bool(fake.requests), within=30, what="upstream called")
        await runner.cleanup()  # the stop: its grace runs out at once
        with pytest.raises(aiohttp.ClientError):
            await asking
    status = 200 if stream else 503
    [line] = [json.loads(text) for text in access_lines.getvalue().splitlines()]
    assert (line["status"], line["error"]) == (status, "server_shutdown")
    observer.refresh()
    exposition = observer.metrics.exposition()
    assert _counted(exposition, "aioproxy_requests_total", "status") == {str(status): 1.0}
    # The attempt under way when the stop came is the stop's too (a stream's had answered),
    # counted with a status no upstream sends: not as an upstream's 503.
    attempts = _counted(exposition, "aioproxy_upstream_requests_total", "status")
    assert attempts == {"200" if case == "stream" else "shutdown": 1.0}
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT status, error_code FROM requests").fetchall()
    assert rows == [(status, "server_shutdown")]
    [server] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server.attributes is not None and server.status.status_code == StatusCode.ERROR
    assert (
        server.attributes["http.response.status_code"],
        server.attributes["error.type"],
    ) == (status, "server_shutdown")
