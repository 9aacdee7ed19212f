"""Redis calls sent in batches: every script or command issued while the previous batch is on
its way (or during one turn of the event loop, when none is) goes out in one pipeline, on one
connection the batcher keeps: one write, its replies read in order. A thousand concurrent
requests cost a few round trips, not a thousand, and a request's own calls (its cache lookup
and its limits' reservation) share one. The busier the gateway, the bigger each batch.

The connection is driven directly (made and written by redis-py, calls packed and replies
parsed by hiredis, its C codec): a redis-py ``Pipeline`` per batch, with the pool's lock, its
retry wrapper and a timeout per reply, cost more than the round trip itself; so did redis-py's
per-word encoding and its layers around each write and reply (~1,800 Python bytecodes a
request, with a batch before its upstream call and one after)."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hashlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import redis
from hiredis import pack_command
from redis import exceptions as redis_errors
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis._parsers.socket import SERVER_CLOSED_CONNECTION_ERROR
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, DefaultParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, RedisError, ResponseError

__all__ = ["Batcher", "LuaScript", "script_failed"]


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
# command's words (str, int, float or bytes: what hiredis packs), and where its result goes.
_Entry = tuple["LuaScript | None", tuple[Any, ...], Reply]


# Refusals that say nothing of the script (Redis busy, loading, a replica, out of memory, its
# snapshots failing: MISCONF): the call may run once Redis is itself again.
_PASSING = tuple(
    getattr(redis_errors, name)
    for name in (
        "BusyLoadingError",
        "ClusterDownError",
        "MasterDownError",
        "NoScriptError",
        "OutOfMemoryError",
        "ReadOnlyError",
        "TryAgainError",
    )
)


def script_failed(error: BaseException) -> bool:
    """Whether Redis refused the call itself (a script that raised, a key of another type):
    an error of the call's own, not of Redis's state."""
    return (
        isinstance(error, ResponseError)
        and not isinstance(error, _PASSING)
        and not str(error).startswith(("BUSY", "NOREPLICAS", "MISCONF"))
        and "-MISCONF" not in str(error)  # Redis 6 wraps a script's: "ERR Error running script ..."
    )


class Batcher:
    def __init__(self, client: Redis, timeout: float) -> None:
        self.client = client
        self.timeout = timeout  # for a whole batch: its write and every reply
        self.batches = 0  # round trips made (tests and benchmarks count them)
        self._expired = False  # the batch on its way ran out of time (``_expire``)
        self._closed = False
        self._pending: list[_Entry] = []
        self._sender: asyncio.Task[None] | None = None  # sends the batches, once started
        self._idle: asyncio.Future[None] | None = None  # the sender waits on it for calls
        self._connection: AbstractConnection | None = None
        self._checked: Any = None  # what says whether the connection is stale (``_connect``)
        self._replies: _Replies | None = None  # where its replies arrive, driven directly
        # Batches packed by hiredis and read from its parser (``_round_trip``) where that is
        # what redis-py would do itself; else through redis-py's public connection methods.
        self._direct = _drivable(client)
        # Called as each batch is taken, to add calls merged while it waited (``wake``).
        self._sources: list[Callable[[list[_Entry]], None]] = []

    def run(self, script: LuaScript, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """The script's result, from the next batch (its exception if Redis failed)."""
        return self._queue(script, ("EVALSHA", script.sha, len(keys), *keys, *args))

    def command(self, *args: Any) -> asyncio.Future[Any]:
        """A plain command's result (GET, SET ...), from the next batch."""
        return self._queue(None, args)

    def add_source(self, source: Callable[[list[_Entry]], None]) -> None:
        """``source(batch)`` appends its calls to each batch as it is taken: calls it merged
        (e.g. one script for many requests) since the last one; ``wake`` says it has some."""
        self._sources.append(source)

    def wake(self) -> None:
        """Send a batch soon even if no call is queued: a source has something to add."""
        # The sender runs next turn: this turn's calls go with this batch. It waits for the
        # next call rather than ending (a task per batch: ~50 bytecodes more a batch).
        if self._idle is not None:
            self._idle.set_result(None)
            self._idle = None
        elif self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_all())

    def _queue(self, script: LuaScript | None, args: tuple[Any, ...]) -> asyncio.Future[Any]:
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
                if batch:
                    await self._execute(batch)
                elif self._closed:  # a call after close: sent, then no sender left waiting
                    break
                else:  # until ``wake``
                    self._idle = asyncio.get_running_loop().create_future()
                    await self._idle
        except BaseException as exc:  # a bug or a cancel (closing): no call waits for ever
            for _, _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:  # closing: cancelled, not a Redis failure (no fallback, no log)
                    future.cancel()
            if not isinstance(exc, Exception):
                raise
            # A bug, not Redis (whose failures _execute answers): said here, where it happened
            # (a task's exception no one awaits is only printed when it is collected); the next
            # call starts another sender.
            logging.getLogger("aioproxy").exception("the Redis batch sender failed")
        finally:
            self._sender = self._idle = None

    async def _execute(self, batch: list[_Entry]) -> None:
        """Send the batch and hand each call its result, within the timeout: asyncio.timeout's
        job (the sender cancelled at the deadline, a TimeoutError here) with one timer and no
        context manager, ~150 Python bytecodes a batch fewer; and in this one coroutine, not
        one more around the exchange: ~15 fewer."""
        task = self._sender  # the task running this
        assert task is not None
        try:
            timer = task.get_loop().call_later(self.timeout, self._expire, task)
            try:
                connection = self._connection
                if connection is None or not self._reusable():
                    connection = await self._connect()
                results, unknown = await self._round_trip(connection, batch)
                if unknown:
                    await self._load_and_retry(connection, batch, results)
            except asyncio.CancelledError:
                if self._expired and task.uncancel() == 0:  # the deadline's, not a close's
                    raise TimeoutError from None
                raise
            finally:
                timer.cancel()
                self._expired = False
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

    def _expire(self, task: asyncio.Task[None]) -> None:
        self._expired = True
        task.cancel()

    async def _load_and_retry(
        self, connection: AbstractConnection, batch: list[_Entry], results: list[Any]
    ) -> None:
        """Scripts Redis does not know (it restarted or flushed them, or they are new): load
        them and send their calls again, in one round trip. Only those: the batch's other
        calls ran, and a script run twice counts twice."""
        missed = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        scripts = {s.sha: s for i in missed if (s := batch[i][0]) is not None}
        loads = [(None, ("SCRIPT", "LOAD", script.text), None) for script in scripts.values()]
        again, _ = await self._round_trip(connection, [*loads, *(batch[i] for i in missed)])
        for i, result in zip(missed, again[len(loads) :], strict=True):
            results[i] = result

    def _reusable(self) -> bool:
        """Whether a batch may go on the connection as it is, told by its protocol where the
        batcher drives it (``_Replies``: what the parser's ``can_read`` and ``is_connected``
        read, in two coroutines and a property: ~60 bytecodes a batch fewer): connected, no
        EOF nor loss, nothing unread. Else ``_connect`` checks it, and replaces it if stale."""
        replies = self._replies
        return replies is not None and replies.open and not replies.reader.has_data()

    async def _connect(self) -> AbstractConnection:
        """The batcher's own connection, made like the pool's but with no socket timeout of
        its own (each write and read would pay for one): the batch's timeout bounds them.
        One the server closed (Redis restarted), or with bytes no call asked for, is replaced
        before anything is written to it, as the pool checks the connections it hands out."""
        connection = self._connection
        if connection is not None and connection.is_connected:
            try:
                stale = await self._checked.can_read()
            except (RedisError, OSError):  # closed (the parser raises what that layer wraps)
                stale = True
            if stale:
                await self._drop()
        if self._connection is None:
            pool = self.client.connection_pool
            kwargs = {**pool.connection_kwargs, "socket_timeout": None}
            self._connection = pool.connection_class(**kwargs)
            # Driven directly, its parser's check: redis-py's layer over it costs ~10
            # bytecodes a batch (and what it raises, OSError, is what it wraps). A hiredis
            # parser is the connection's for good (redis-py swaps only its own RESP parsers).
            self._checked = self._connection._parser if self._direct else self._connection
        return self._connection  # it connects on its first write

    async def _round_trip(
        self, connection: AbstractConnection, batch: list[tuple[Any, tuple[Any, ...], Any]]
    ) -> tuple[list[Any], bool]:
        """Each call's reply (an error reply as its exception), and whether a script was not
        known (NOSCRIPT). The replies are read from the connection's hiredis parser as they
        come (redis-py's ``read_response`` wraps each in layers meant for one command: ~130
        bytecodes a reply; here, not in a coroutine of their own: ~15 a batch fewer). An
        error reply is its call's result, except one that says the connection is unusable
        (as redis-py raises it)."""
        self.batches += 1
        if not self._direct:
            return await _round_trip_by_redis_py(connection, batch)
        packed = _packed(batch)
        writer = connection._writer
        try:
            if writer is None:  # not connected yet: redis-py connects, then writes
                await connection.send_packed_command([packed], check_health=False)
                self._replies = _Replies.install(connection)
            else:  # to its stream directly: send_packed_command's layers cost ~70 bytecodes
                writer.write(packed)
                if writer.transport.get_write_buffer_size():  # else all written: no drain's
                    await writer.drain()  # coroutine (a lost connection fails the read)
            arrived = self._replies
            assert arrived is not None
            gets = arrived.reader.gets
            replies: list[Any] = []
            unknown = False
            for _ in batch:
                reply = gets()
                while reply is NOT_ENOUGH_DATA:
                    await arrived.more()
                    reply = gets()
                if isinstance(reply, RedisError):
                    if isinstance(reply, RedisConnectionError):
                        raise reply
                    unknown = unknown or isinstance(reply, NoScriptError)
                elif type(reply) is list and reply and isinstance(reply[0], RedisConnectionError):
                    raise reply[0]
                replies.append(reply)
            return replies, unknown
        except OSError as exc:  # as redis-py names it (the log says which error)
            where = connection._host_error()
            raise RedisConnectionError(f"Error while talking to {where} : {exc.args}") from exc

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self._replies = None
        if connection is not None:
            with contextlib.suppress(RedisError, OSError):
                await connection.disconnect()

    async def close(self) -> None:
        self._closed = True
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        await self._drop()


class _Replies(asyncio.Protocol):
    """The protocol of the batcher's connection once it is connected (driven directly): what
    Redis sends goes straight to the parser's hiredis reader, not through asyncio's
    StreamReader (its read, wait, feed and wake-up: ~140 bytecodes a batch); the rest (EOF,
    the connection lost, flow control) goes on to the stream's own protocol, so the stream
    says whether the connection is usable, and redis-py closes it, as before."""

    __slots__ = ("loop", "open", "reader", "stream", "streams", "waiter")

    def __init__(self, streams: Any, parser: Any) -> None:
        self.streams = streams  # the StreamReaderProtocol redis-py's connection made
        self.reader = parser._reader
        self.stream: asyncio.StreamReader = parser._stream
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future[None] | None = None
        self.open = True  # until EOF or the connection's loss (as its stream then tells)

    @classmethod
    def install(cls, connection: AbstractConnection) -> _Replies:
        transport = connection._writer.transport  # type: ignore[union-attr]
        replies = cls(transport.get_protocol(), connection._parser)
        transport.set_protocol(replies)
        buffered = replies.stream._buffer  # type: ignore[attr-defined]
        if buffered:  # arrived while redis-py drained the first write
            replies.reader.feed(bytes(buffered))
            buffered.clear()
        return replies

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiter = self.waiter  # ``_wake``, without its frame: most reads wake the sender
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def eof_received(self) -> bool | None:
        self.open = False
        try:
            return self.streams.eof_received()  # type: ignore[no-any-return]
        finally:
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.streams.connection_lost(exc)
        self._wake()

    def pause_writing(self) -> None:
        self.streams.pause_writing()

    def resume_writing(self) -> None:
        self.streams.resume_writing()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def more(self) -> asyncio.Future[None]:
        """Done when more has arrived, or the connection ended (raised as a read would)."""
        stream = self.stream
        error = stream.exception()
        if error is not None:
            raise error
        if stream.at_eof():
            raise RedisConnectionError(SERVER_CLOSED_CONNECTION_ERROR)
        waiter = self.waiter = self.loop.create_future()
        return waiter


def _drivable(client: Redis) -> bool:
    """Whether the batcher may pack and read its batches itself: redis-py's encoder makes of a
    str what hiredis does (UTF-8, strict: its default; a URL's ?encoding= is left to it), and
    its connections are the ones ``_round_trip`` knows (redis-py's hiredis parser, whose
    reader and stream it uses, and a stream writer), speaking RESP2 (no push messages
    among the replies). Those are redis-py's insides, as of redis 8.x with hiredis 3, the
    versions tested; on any other, the batches go through redis-py's public connection methods
    (~1,000 bytecodes a request more)."""
    if not redis.__version__.startswith("8."):
        return False
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    encoding = codecs.lookup(kwargs.get("encoding", "utf-8")).name
    if encoding != "utf-8" or kwargs.get("encoding_errors", "strict") != "strict":
        return False
    if str(kwargs.get("protocol") or 2) != "2":  # RESP3 may interleave push messages
        return False
    parser_class = kwargs.get("parser_class", DefaultParser)
    connection_class = pool.connection_class
    return (
        isinstance(parser_class, type)
        and issubclass(parser_class, _AsyncHiredisParser)
        and all(
            hasattr(parser_class, name)
            for name in ("_stream", "_connected", "can_read", "on_connect")
        )
        and all(hasattr(connection_class, name) for name in ("_host_error", "can_read"))
    )


async def _round_trip_by_redis_py(
    connection: AbstractConnection, batch: list[tuple[Any, tuple[Any, ...], Any]]
) -> tuple[list[Any], bool]:
    """``_round_trip`` by redis-py's public connection methods: packed word by word, each reply
    read by ``read_response``."""
    packed = connection.pack_commands([args for _, args, _ in batch])
    await connection.send_packed_command(packed, check_health=False)
    results: list[Any] = []
    unknown = False
    for _ in batch:
        try:
            results.append(await connection.read_response())
        except ResponseError as error:  # this call's error; the rest read on
            results.append(error)
            unknown = unknown or isinstance(error, NoScriptError)
    return results, unknown


def _packed(batch: list[tuple[Any, tuple[Any, ...], Any]]) -> bytes:
    """The batch's calls in Redis's protocol, by hiredis at once: the words are ours (str,
    int, bytes), so redis-py's per-word encoder (~30 bytecodes a word) has nothing to do."""
    try:
        if len(batch) == 1:  # the usual batch: one script call for all its requests
            return pack_command(batch[0][1])  # type: ignore[no-any-return]
        return b"".join([pack_command(args) for _, args, _ in batch])
    except TypeError as exc:  # a word of no type Redis takes: as redis-py says it
        raise DataError(str(exc)) from exc
