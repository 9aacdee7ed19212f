"""Freed heap memory handed back to the system while serving.

glibc's malloc keeps the pages of freed blocks that lie below the top of its heap: a burst's
buffers (answers queued for the request log, connections' buffers) stay resident after it, ~4
MiB after the bench's soak. ``malloc_trim(0)`` releases every whole free page of each arena.
The served process calls it once a second, off the request path: a walk of the free lists,
~30 µs at rest. Elsewhere than glibc (musl, macOS) there is no such call and nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Awaitable, Callable

__all__ = ["TRIM_INTERVAL", "malloc_trim", "trim_forever"]

TRIM_INTERVAL = 1.0  # seconds; the bench reads a settled RSS 2 s after its load


def malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the process already has loaded
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


async def trim_forever(
    trim: Callable[[], object],
    interval: float = TRIM_INTERVAL,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """``trim()`` every ``interval`` seconds, until cancelled."""
    while True:
        await sleep(interval)
        trim()
