"""Redis calls sent in batches: every script or command issued during one turn of the event
loop goes out in one pipeline (one connection, one write, one read), so that a thousand
concurrent requests cost a few round trips, not a thousand, and a request's own calls (its
cache lookup and its limits' reservation) share one."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

__all__ = ["Batcher", "LuaScript"]


class LuaScript:
    """A script's text and its SHA1 (what EVALSHA names it by), computed once."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


# One queued call: its script (to load after a NOSCRIPT; None for a plain command), the
# command's words, and the future its result goes to.
_Entry = tuple["LuaScript | None", list[Any], "asyncio.Future[Any]"]


class Batcher:
    def __init__(self, client: Redis) -> None:
        self.client = client
        self._pending: list[_Entry] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def run(self, script: LuaScript, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """The script's result, from the next batch (its exception if Redis failed)."""
        return self._queue(script, ["EVALSHA", script.sha, len(keys), *keys, *args])

    def command(self, *args: Any) -> asyncio.Future[Any]:
        """A plain command's result (GET, SET ...), from the next batch."""
        return self._queue(None, list(args))

    def _queue(self, script: LuaScript | None, args: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._send)
        self._pending.append((script, args, future))
        return future

    def _send(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._execute(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[_Entry]) -> None:
        try:
            results = await self._pipeline(batch)
            if any(isinstance(result, NoScriptError) for result in results):
                # Redis restarted (or flushed its scripts): load them, then send the batch again.
                scripts = {script.sha: script for script, _, _ in batch if script is not None}
                for script in scripts.values():
                    await self.client.script_load(script.text)
                results = await self._pipeline(batch)
        except (RedisError, OSError) as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _pipeline(self, batch: list[_Entry]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for _, args, _ in batch:
                pipe.execute_command(*args)
            return list(await pipe.execute(raise_on_error=False))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
