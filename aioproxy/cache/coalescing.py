"""Identical cache misses coalesced, in one instance: the first miss of a key goes upstream;
the misses of that key while it is on its way wait for its answer and are served it as a hit.

The first one's answer reaches its waiters only if it is kept (it succeeded and is cacheable);
otherwise (it failed, its client went away, the answer is not cacheable) each waiter goes
upstream itself. A waiter waits at most its route's timeout, then goes upstream too (and the
next miss of the key goes first: a first one that never ends holds up no one after that).
Each instance coalesces its own misses: across instances, each one's first miss goes upstream.
"""

from __future__ import annotations

import asyncio

from .stores import Entry

__all__ = ["InFlight"]


class InFlight:
    """Per cache key, the answer of the miss on its way upstream (a future: the Entry kept,
    or None when there is none to share)."""

    __slots__ = ("_first", "waiting")

    def __init__(self) -> None:
        self._first: dict[str, asyncio.Future[Entry | None]] = {}
        self.waiting = 0  # requests waiting for another's answer now (tests wait on it)

    def first(self, key: str) -> asyncio.Future[Entry | None] | None:
        """The answer to wait for, when a miss of ``key`` is on its way upstream."""
        return self._first.get(key)

    def lead(self, key: str) -> asyncio.Future[Entry | None] | None:
        """Make this miss the one going upstream for ``key`` (None: one already is); whoever
        leads must :meth:`settle` its future, whatever happens."""
        if key in self._first:
            return None
        answer = self._first[key] = asyncio.get_running_loop().create_future()
        return answer

    def settle(self, key: str, answer: asyncio.Future[Entry | None], entry: Entry | None) -> None:
        """The first miss's answer (None: none to share) goes to its waiters."""
        if self._first.get(key) is answer:
            del self._first[key]
        if not answer.done():
            answer.set_result(entry)

    async def wait(
        self, key: str, answer: asyncio.Future[Entry | None], timeout: float
    ) -> Entry | None:
        """The first miss's entry, or None (go upstream) if there is none within ``timeout``.
        Shielded: a waiter whose client leaves cancels only its own wait."""
        self.waiting += 1
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(answer)
        except TimeoutError:
            self.settle(key, answer, None)  # stuck: the others go upstream, the next miss leads
            return None
        finally:
            self.waiting -= 1
