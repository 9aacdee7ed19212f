"""A TCP relay between aioproxy and a real redis-server on 127.0.0.1 that can lose replies:
while it drops them, what the client sends reaches Redis (its scripts run) but no answer
comes back: the relay cuts the client's connection as the answer arrives, so the client's
batch fails with its outcome unknown, as on a connection that dies after Redis ran the calls.
The client learns it from the cut, not from its timeout: a test's timeout is a hang guard,
never what a loss waits for (a short one also expires, on a loaded machine, on a call the
test expects answered)."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["LossyRelay"]


class LossyRelay:
    def __init__(self, port: int) -> None:
        self.port = port  # redis-server's
        self.dropping = False
        self.dropped = asyncio.Event()  # set once a reply was dropped: Redis ran its calls
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:  # Redis is down: the client told at once (not logged as a relay bug)
            writer.close()
            return
        tasks = [
            asyncio.create_task(self._pipe(reader, upstream_writer, replies=False)),
            asyncio.create_task(self._pipe(upstream_reader, writer, replies=True)),
        ]
        self._tasks.update(tasks)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
            self._tasks.discard(task)
        for stream in (writer, upstream_writer):
            stream.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if replies and self.dropping:
                    self.dropped.set()
                    return  # the connection cut (``_relay`` closes both ends)
                writer.write(data)
                await writer.drain()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
