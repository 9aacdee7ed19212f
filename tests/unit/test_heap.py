"""Freed heap memory goes back to the system while serving (aioproxy.heap)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from aiohttp import web

from aioproxy.heap import malloc_trim, trim_forever
from aioproxy.server import _serve

# A burst's buffers freed around a few survivors: the heap's top stays in use, so glibc keeps
# every freed page resident until malloc_trim. Prints the RSS (KiB) after the burst, then after
# the trim.
_BURST = """
import sys
from aioproxy.heap import malloc_trim

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4

burst = [bytes(9000) for _ in range(4000)]  # ~35 MiB of bodies, each malloc'ed on the heap
kept = burst[::500]  # a few stay alive, the last one near the heap's top
del burst
print(rss())
trim = malloc_trim()
if trim is not None:
    trim()
print(rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_trim_returns_a_bursts_freed_pages() -> None:
    assert malloc_trim() is not None  # glibc
    done = subprocess.run(
        [sys.executable, "-c", _BURST], capture_output=True, text=True, check=True, timeout=60
    )
    after_burst, after_trim = map(int, done.stdout.split())
    assert after_burst - after_trim > 20 * 1024  # most of the ~35 MiB freed


async def test_the_trim_runs_every_interval_until_cancelled() -> None:
    waits: list[float] = []
    trims: list[int] = []
    third = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(trims) == 3:
            third.set()
            await asyncio.Event().wait()  # parked: the test cancels it here

    def trim() -> None:
        trims.append(len(waits))

    task = asyncio.create_task(trim_forever(trim, 1.5, sleep))
    await third.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert trims == [1, 2, 3]  # each trim after one wait
    assert waits == [1.5] * 4


async def test_a_served_app_trims_the_heap_while_it_serves() -> None:
    names: list[set[str]] = []
    ready = asyncio.Event()

    def on_ready(_port: int) -> None:
        names.append({task.get_name() for task in asyncio.all_tasks()})
        ready.set()

    serving = asyncio.create_task(_serve(web.Application(), "127.0.0.1", 0, False, on_ready))
    await ready.wait()
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert "aioproxy heap trim" in names[0]
    await asyncio.sleep(0)  # the cancelled trimmer's last step
    assert "aioproxy heap trim" not in {task.get_name() for task in asyncio.all_tasks()}
