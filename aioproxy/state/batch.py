"""Scripts sent to Redis in batches: every call made during one turn of the event loop goes
out in one pipeline (one connection, one write, one read), so that a thousand concurrent
requests cost a few round trips, not a thousand."""

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


class Batcher:
    def __init__(self, client: Redis) -> None:
        self.client = client
        self._pending: list[tuple[LuaScript, list[str], list[Any], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def run(self, script: LuaScript, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """The script's result, from the next batch (its exception if Redis failed)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._send)
        self._pending.append((script, keys, args, future))
        return future

    def _send(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._execute(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(
        self, batch: list[tuple[LuaScript, list[str], list[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            results = await self._pipeline(batch)
            if any(isinstance(result, NoScriptError) for result in results):
                # Redis restarted (or flushed its scripts): load them, then send the batch again.
                for script in {script.sha: script for script, _, _, _ in batch}.values():
                    await self.client.script_load(script.text)
                results = await self._pipeline(batch)
        except (RedisError, OSError) as exc:
            for _, _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _pipeline(
        self, batch: list[tuple[LuaScript, list[str], list[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for script, keys, args, _ in batch:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
