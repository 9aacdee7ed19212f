"""Fallback fake upstream for machines without nginx: raw asyncio, canned bytes, keep-alive.

Serves the same docroot as nginx (files named by request path, laid out by
bench/harness/payloads.py).  Usage: fallback.py --port P --root DIR
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path


def load_responses(root: Path) -> dict[bytes, bytes]:
    """Pre-render each file as a full HTTP response so serving is a dict lookup and a write."""
    responses = {}
    for file in root.rglob("*"):
        if file.is_file():
            path = "/" + file.relative_to(root).as_posix()
            streamed = path.startswith(("/stream/", "/anthropic-stream/"))
            ctype = "text/event-stream" if streamed else "application/json"
            body = file.read_bytes()
            head = (
                f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            responses[path.encode()] = head.encode() + body
    return responses


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class Upstream(asyncio.Protocol):
    def __init__(self, responses: dict[bytes, bytes]) -> None:
        self.responses = responses
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return  # body not complete yet
            self.buffer = self.buffer[end + 4 + length :]
            path = head.split(b" ", 2)[1]
            self.transport.write(self.responses.get(path, NOT_FOUND))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args()
    responses = load_responses(args.root)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(responses), args.host, args.port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
