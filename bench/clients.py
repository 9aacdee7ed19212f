#!/usr/bin/env python3
"""Upstream client cost: CPU per request of aiohttp's ClientSession vs aioproxy's H1Pool.

Both POST the bench's chat request to the nginx fake upstream over keep-alive connections
(16 concurrent callers, the client pinned to one core) and read the answer whole. The
difference is what aioproxy saves per proxied call by not going through ClientSession.
Usage: .venv/bin/python bench/clients.py [--requests 16000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from harness import payloads, procs
from harness.servers import start_upstream

from aioproxy.config import Timeouts
from aioproxy.h1client import H1Pool

CALLERS = 16


async def _cpu_per_request(one: Callable[[], Awaitable[bytes]], requests: int) -> float:
    """µs of this process's CPU per request, with CALLERS callers in turn."""

    async def caller(count: int) -> None:
        for _ in range(count):
            assert await one()

    await asyncio.gather(*[caller(50) for _ in range(CALLERS)])  # warm the connections up
    started = time.process_time()
    await asyncio.gather(*[caller(requests // CALLERS) for _ in range(CALLERS)])
    return (time.process_time() - started) / requests * 1e6


async def measure(port: int, requests: int) -> dict[str, float]:
    kind = payloads.KINDS["chat"]
    url = f"http://127.0.0.1:{port}{kind.upstream_path}"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    timeouts = Timeouts(connect=10, read=600)
    results: dict[str, float] = {}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:

        async def via_session() -> bytes:
            async with session.post(url, data=kind.body, headers=headers) as response:
                return await response.read()

        results["aiohttp ClientSession"] = await _cpu_per_request(via_session, requests)
    pool = H1Pool(asyncio.get_running_loop())

    async def via_pool() -> bytes:
        response = await pool.post(url, kind.body, headers, timeouts)
        body = await response.read()
        response.release()
        return body

    try:
        results["aioproxy H1Pool"] = await _cpu_per_request(via_pool, requests)
    finally:
        await pool.close()
    return results


def _run(main: Coroutine[Any, Any, dict[str, float]]) -> dict[str, float]:
    """On uvloop when installed, as aioproxy and the reference run by default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16000)
    args = parser.parse_args()
    cores = procs.cpu_layout()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx workers run unprivileged
        (work / "upstream").mkdir()
        upstream = start_upstream("nginx", work / "upstream", procs.free_port(), cores.load)
        try:
            if cores.sut is not None:
                os.sched_setaffinity(0, {cores.sut})
            results = _run(measure(upstream.port, args.requests))
        finally:
            upstream.proc.stop()
    for name, micros in results.items():
        print(f"{name:24} {micros:6.1f} µs CPU/request")


if __name__ == "__main__":
    main()
