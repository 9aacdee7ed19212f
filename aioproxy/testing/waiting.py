"""``eventually()``: wait for a condition the system under test reaches on its own.

A test that waits for something (a request to leave the upstream, a counter to settle) asserts
the condition, not how long it took: ``within`` is a generous safety net that turns a hang into
a failure naming ``what``, never the assertion itself.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    *,
    within: float = 2.0,
    interval: float = 0.01,
    what: str = "",
) -> None:
    """Return once ``check()`` (sync or async) is true; fail after ``within`` seconds.

    ``check`` runs at once, then every ``interval`` seconds on the running loop, so a condition
    that already holds costs no sleep.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            raise AssertionError(f"not so after {within} s: {what or check!r}")
        await asyncio.sleep(interval)
