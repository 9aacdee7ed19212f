"""What observing a request costs in Python calls: the observer's share of each request stays a
handful of functions (on the request's own path the middleware and its one hook; in its
batch the counting and the access lines' write), with metrics and the JSON access log on,
as run.py writes it."""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import pytest

import aioproxy.observability
from aioproxy.observability import observer
from aioproxy.observability.access_log import ACCESS_LOG, AccessHandler
from tests.support import AUTH, ServeProxy, gateway_config

OBSERVABILITY = str(Path(aioproxy.observability.__file__).parent)
MESSAGES = [{"role": "user", "content": "hi"}]
BUDGET = 6  # observe, after_response; the batch, its write, flush and time
# What the request's own task runs: the rest waits for its batch (a request pays for an
# append). The attempt is no call: the batch learns of it from the router and the call.
ON_THE_REQUEST = {"observe", "after_response"}


@contextmanager
def access_stream() -> Iterator[io.BytesIO]:
    """run.py's access handler, alone (so written to directly), into a buffer. (In the test's
    body: pytest adds its capturing handlers to every logger as the test starts.)"""
    stream = io.BytesIO()
    handlers, propagate, level = list(ACCESS_LOG.handlers), ACCESS_LOG.propagate, ACCESS_LOG.level
    ACCESS_LOG.handlers[:] = [AccessHandler(stream, json=True)]
    ACCESS_LOG.propagate = False
    ACCESS_LOG.setLevel("INFO")
    try:
        yield stream
    finally:
        ACCESS_LOG.handlers[:] = handlers
        ACCESS_LOG.propagate = propagate
        ACCESS_LOG.setLevel(level)


async def _observed_calls(
    http: aiohttp.ClientSession, url: Any, body: dict[str, Any]
) -> list[tuple[str, bool]]:
    """The observability functions one request entered (each frame once, however often a
    coroutine resumed), up to its access line, each with whether a task ran it (the request's:
    the client's calls are not observability's) or the loop itself (a callback)."""
    frames: list[tuple[FrameType, bool]] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(OBSERVABILITY):
            frames.append((frame, asyncio.current_task() is not None))

    sys.setprofile(profile)
    try:
        async with http.post(url, json=body, headers=AUTH) as response:
            assert response.status == 200
            await response.read()
        await asyncio.sleep(0)  # the turn's lines written
    finally:
        sys.setprofile(None)
    unique = {id(frame): (frame, in_task) for frame, in_task in frames}.values()
    return [(frame.f_code.co_name, in_task) for frame, in_task in unique]


@pytest.mark.parametrize("stream", [False, True])
async def test_observing_a_request_takes_a_handful_of_calls(
    serve_proxy: ServeProxy, upstream_base: str, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    monkeypatch.setattr(observer, "FLUSH_INTERVAL", 3600.0)  # no metrics flush meanwhile
    monkeypatch.setattr(observer, "BATCH_WINDOW", 0.0)  # each request's batch as the loop turns
    config = gateway_config(
        upstream_base, metrics={"enabled": True}, logging={"access_log": True, "format": "json"}
    )
    body = {"model": "gpt-test", "messages": MESSAGES, "stream": stream}
    with access_stream() as lines:
        proxy = await serve_proxy(config)
        url = proxy.make_url("/v1/chat/completions")
        async with aiohttp.ClientSession() as http:
            await _observed_calls(http, url, body)  # the first request's one-off work
            calls = await _observed_calls(http, url, body)
    assert lines.getvalue().count(b"\n") == 2
    assert len(calls) <= BUDGET, calls
    assert {name for name, in_task in calls if in_task} == ON_THE_REQUEST, calls


class _Writes(io.BytesIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        return super().write(data)


async def test_requests_over_within_the_window_are_one_batch(
    serve_proxy: ServeProxy, upstream_base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests over while the batch's window is open wait for it: their access lines go out
    in one write, and a scrape counts them first (a window that never closes in the test, so
    nothing depends on the clock)."""
    monkeypatch.setattr(observer, "BATCH_WINDOW", 3600.0)
    config = gateway_config(
        upstream_base, metrics={"enabled": True}, logging={"access_log": True, "format": "json"}
    )
    stream = _Writes()
    with access_stream() as _:
        ACCESS_LOG.handlers[:] = [AccessHandler(stream, json=True)]
        proxy = await serve_proxy(config)
        url = proxy.make_url("/v1/chat/completions")
        body = {"model": "gpt-test", "messages": MESSAGES}
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.post(url, json=body, headers=AUTH) as response:
                    assert response.status == 200
                    await response.read()
            assert stream.writes == 0  # the window is open: none written yet
            async with http.get(proxy.make_url("/metrics"), headers=AUTH) as response:
                text = await response.text()
    assert (
        'aioproxy_requests_total{kind="chat_completions",model="gpt-test",status="200"} 3.0' in text
    )
    assert stream.writes == 1
    assert stream.getvalue().count(b"\n") == 3
