"""Redis calls sent in batches: every script or command issued while the previous batch is on
its way (or during one turn of the event loop, when none is) goes out in one pipeline, on one
connection the batcher keeps: one write, its replies read in order. A thousand concurrent
requests cost a few round trips, not a thousand, and a request's own calls (its cache lookup
and its limits' reservation) share one. The busier the gateway, the bigger each batch.

The connection is driven directly (packed by redis-py, replies parsed by hiredis): a redis-py
``Pipeline`` per batch, with the pool's lock, its retry wrapper and a timeout per reply, cost
more than the round trip itself."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisError, ResponseError

__all__ = ["Batcher", "LuaScript"]


class LuaScript:
    """A script's text and its SHA1 (what EVALSHA names it by), computed once."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


class Reply(Protocol):
    """Where a call's result goes: an ``asyncio.Future``, or an object that hands one batched
    result on to many waiters at once (without a future and a loop turn of its own)."""

    def done(self) -> bool: ...
    def set_result(self, result: Any, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...
    def cancel(self) -> bool: ...


# One queued call: its script (to load after a NOSCRIPT; None for a plain command), the
# command's words, and where its result goes.
_Entry = tuple["LuaScript | None", list[Any], Reply]


class Batcher:
    def __init__(self, client: Redis, timeout: float) -> None:
        self.client = client
        self.timeout = timeout  # for a whole batch: its write and every reply
        self.batches = 0  # round trips made (tests and benchmarks count them)
        self._pending: list[_Entry] = []
        self._sender: asyncio.Task[None] | None = None  # sends batches while there are any
        self._connection: AbstractConnection | None = None
        # Called as each batch is taken, to add calls merged while it waited (``wake``).
        self._sources: list[Callable[[list[_Entry]], None]] = []

    def run(self, script: LuaScript, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """The script's result, from the next batch (its exception if Redis failed)."""
        return self._queue(script, ["EVALSHA", script.sha, len(keys), *keys, *args])

    def command(self, *args: Any) -> asyncio.Future[Any]:
        """A plain command's result (GET, SET ...), from the next batch."""
        return self._queue(None, list(args))

    def add_source(self, source: Callable[[list[_Entry]], None]) -> None:
        """``source(batch)`` appends its calls to each batch as it is taken: calls it merged
        (e.g. one script for many requests) since the last one; ``wake`` says it has some."""
        self._sources.append(source)

    def wake(self) -> None:
        """Send a batch soon even if no call is queued: a source has something to add."""
        if self._sender is None:  # it starts next turn: this turn's calls go with this one
            self._sender = asyncio.get_running_loop().create_task(self._send_all())

    def _queue(self, script: LuaScript | None, args: list[Any]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((script, args, future))
        self.wake()
        return future

    async def _send_all(self) -> None:
        batch: list[_Entry] = []
        try:
            while True:  # what queued (or merged) while the last batch was on its way
                batch, self._pending = self._pending, []
                for source in self._sources:
                    source(batch)
                if not batch:
                    break
                await self._execute(batch)
        except BaseException as exc:  # a bug or a cancel (closing): no call waits for ever
            for _, _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:  # closing: cancelled, not a Redis failure (no fallback, no log)
                    future.cancel()
            raise
        finally:
            self._sender = None

    async def _execute(self, batch: list[_Entry]) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                connection = await self._connect()
                results = await self._round_trip(connection, batch)
                if any(isinstance(result, NoScriptError) for result in results):
                    await self._load_and_retry(connection, batch, results)
        except (RedisError, OSError, TimeoutError) as exc:
            await self._drop()  # its stream may be mid-reply: never reused
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

    async def _load_and_retry(
        self, connection: AbstractConnection, batch: list[_Entry], results: list[Any]
    ) -> None:
        """Scripts Redis does not know (it restarted or flushed them, or they are new): load
        them and send their calls again, in one round trip. Only those: the batch's other
        calls ran, and a script run twice counts twice."""
        missed = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        scripts = {s.sha: s for i in missed if (s := batch[i][0]) is not None}
        loads = [(None, ["SCRIPT", "LOAD", script.text], None) for script in scripts.values()]
        again = await self._round_trip(connection, [*loads, *(batch[i] for i in missed)])
        for i, result in zip(missed, again[len(loads) :], strict=True):
            results[i] = result

    async def _connect(self) -> AbstractConnection:
        """The batcher's own connection, made like the pool's but with no socket timeout of
        its own (each write and read would pay for one): the batch's timeout bounds them.
        One the server closed (Redis restarted), or with bytes no call asked for, is replaced
        before anything is written to it, as the pool checks the connections it hands out."""
        connection = self._connection
        if connection is not None and connection.is_connected:
            try:
                stale = await connection.can_read()
            except (RedisError, OSError):
                stale = True
            if stale:
                await self._drop()
        if self._connection is None:
            pool = self.client.connection_pool
            kwargs = {**pool.connection_kwargs, "socket_timeout": None}
            self._connection = pool.connection_class(**kwargs)
        return self._connection  # it connects on its first write

    async def _round_trip(
        self, connection: AbstractConnection, batch: list[tuple[Any, list[Any], Any]]
    ) -> list[Any]:
        self.batches += 1
        packed = connection.pack_commands([args for _, args, _ in batch])
        await connection.send_packed_command(packed, check_health=False)
        results: list[Any] = []
        for _ in batch:
            try:
                results.append(await connection.read_response())
            except ResponseError as error:  # this call's error; the rest read on
                results.append(error)
        return results

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(RedisError, OSError):
                await connection.disconnect()

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        await self._drop()
